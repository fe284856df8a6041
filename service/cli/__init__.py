"""The `dscguard` command line (`service/cli/main.py`), its experiment commands (`experiments.py`), its
service commands (`services.py`) and its bundle commands (`bundles.py`), over the options they share (`options.py`).

The command line is the one layer that imports both the core (`service`) and the adversary (`attacker_sim`);
the import contract in pyproject.toml (`lint-imports`) keeps it so.
"""

from service.cli.main import build_parser, main, subcommands
from service.cli.options import CommandLineError, build_config

__all__ = ["CommandLineError", "build_config", "build_parser", "main", "subcommands"]
