"""The package's shape, as issue 13 set it: small modules, wire knowledge in one place, a runtime
that stands on its own. A change that breaks one of these should be a decision, not an accident."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sealedml

SRC = Path(sealedml.__file__).resolve().parent
MODULES = sorted(SRC.rglob("*.py"))
MAX_LINES = 800


def _package(path: Path) -> str:
    return ".".join(("sealedml", *path.relative_to(SRC).parent.parts))


def _imports(source: str, package: str) -> set[str]:
    """Every module ``source`` (a module of ``package``) imports, at the top or inside functions."""
    tree = ast.parse(source)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.add(node.module)
    return found


def test_the_walk_finds_the_package() -> None:
    assert len(MODULES) > 50 and SRC / "runtime" / "worker.py" in MODULES


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_exceeds_800_lines(path: Path) -> None:
    lines = path.read_text().count("\n")
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines: split it by responsibility"


def test_only_the_request_envelope_knows_the_binary_magic() -> None:
    knowing = [p.relative_to(SRC).as_posix() for p in MODULES if "SMLQ" in p.read_text()]
    assert knowing == ["envelope/request.py"], "use envelope.request.is_binary(body) instead of matching the magic"


def test_the_runtime_imports_nothing_from_client_or_keyservice() -> None:
    offending = {
        path.relative_to(SRC).as_posix(): sorted(
            name
            for name in _imports(path.read_text(), _package(path))
            if name.startswith(("sealedml.client", "sealedml.keyservice"))
        )
        for path in MODULES
        if path.relative_to(SRC).parts[0] == "runtime"
    }
    assert {path: names for path, names in offending.items() if names} == {}


def test_the_import_walk_sees_relative_and_lazy_imports() -> None:
    """The check above cannot pass vacuously: lazy, relative and plain imports are all found."""
    source = (
        "import sealedml.keyservice.store\n"
        "from ..client import gateway\n"
        "from . import cache\n"
        "def f():\n"
        "    from sealedml.client.identity import Identity\n"
    )
    assert _imports(source, "sealedml.runtime") == {
        "sealedml.keyservice.store",
        "sealedml.client",
        "sealedml.runtime",
        "sealedml.client.identity",
    }
    worker = SRC / "runtime" / "worker.py"
    assert "sealedml.runtime.engine" in _imports(worker.read_text(), _package(worker))
