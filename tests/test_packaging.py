"""The install is reproducible: every dependency pyproject.toml names is pinned in constraints.txt, and the pin
lies inside pyproject's range, so the README's install line, .ci/run and the Dockerfiles get tested versions."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
UNPINNED = {"torch", "torchvision"}  # pinned on the install line: wheel and index differ by machine


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [Requirement(r) for r in names]


def test_every_declared_dependency_is_pinned_inside_its_range():
    pins = _pins()
    for requirement in _declared():
        name = canonicalize_name(requirement.name)
        if name in UNPINNED:
            assert name not in pins, f"{name} is pinned on the install line, not in constraints.txt"
            continue
        assert name in pins, f"{name} (pyproject.toml) has no pin in constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"


def test_the_pinned_pytest_is_one_the_pinned_schemathesis_works_with():
    # schemathesis 4.32's pytest plugin reads request.node._nodeid, which pytest 9.2 removed
    from packaging.version import Version

    assert Version(_pins()["pytest"]) < Version("9.2")


def test_install_line_ci_and_images_use_the_constraints():
    readme = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[dev]" -c constraints.txt' in readme
    assert "-c constraints.txt" in (ROOT / ".ci" / "run").read_text()
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):  # the dependencies stage installs under the constraints
        assert re.search(r"pip install .*-c \S*constraints\.txt", (ROOT / "deploy" / dockerfile).read_text())


def test_the_fast_default_leaves_out_slow_tests_and_ci_runs_them_all():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r'^python -m pytest -q -m "not slow"(\s|$)', readme, re.MULTILINE)
    assert re.search(r"^python -m pytest -q(\s+#.*)?$", readme, re.MULTILINE)  # the whole suite, as CI runs it
    assert re.search(r"^python -m pytest -q$", (ROOT / ".ci" / "run").read_text(), re.MULTILINE)
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert any(marker.startswith("slow:") for marker in options["markers"])
    assert "slow" not in options["addopts"]  # nothing deselects them by default: CI's command runs everything
