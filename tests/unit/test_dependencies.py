"""Serving needs no scikit-learn, SciPy or matplotlib: not as dependencies of ``pip install sealedml``
(no extras), and not imported by the KeyService, platform, runtime or executor."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"scikit-learn", "scipy", "matplotlib", "scikit-image", "torch"}


def _name(requirement: str) -> str:
    return Requirement(requirement).name.lower().replace("_", "-")


def _closure(requirements: list[str]) -> set[str]:
    """Every distribution ``requirements`` pull in, from installed metadata (markers without extras)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = requirement.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            todo.extend(Requirement(r) for r in metadata.requires(name) or [])
        except metadata.PackageNotFoundError:
            pass  # not installed here: its own dependencies cannot be followed (none of ours is)
    return seen


def test_a_plain_install_pulls_no_heavy_library():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = {_name(r) for r in project["dependencies"]}
    assert direct & HEAVY == set()
    closure = _closure(project["dependencies"])
    assert len(closure) > len(direct)  # the walk followed the installed metadata
    assert closure & HEAVY == set(), sorted(closure & HEAVY)
    assert {"scikit-learn", "matplotlib"} <= {_name(r) for r in project["optional-dependencies"]["demo"]}


def test_the_services_import_no_heavy_library():
    code = (
        "import sys\n"
        "import sealedml.keyservice.server, sealedml.platform.server, sealedml.runtime.server\n"
        "import sealedml.runtime.worker, sealedml.platform.executor, sealedml.cli.main\n"
        "from sealedml.cli.main import build_parser\n"
        "build_parser()\n"
        "from sealedml import zoo\n"
        "zoo.get('mobilenetv2')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy', 'matplotlib', 'skimage', 'torch'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_without_scikit_learn_the_digits_models_say_which_extra():
    code = (
        "import sys\n"
        "sys.modules['sklearn'] = None  # as if it were not installed\n"
        "from sealedml import zoo\n"
        "from sealedml.errors import ConfigurationError\n"
        "zoo.get('toy')\n"
        "try:\n"
        "    zoo.get('digits')\n"
        "except ConfigurationError as exc:\n"
        "    print(exc.message)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "needs sklearn: pip install 'sealedml[demo]'" in out.stdout
