"""`python -m service.cli` (how the stack starts its processes)."""

import sys

from service.cli.main import main

sys.exit(main())
