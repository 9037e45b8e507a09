"""Docs that name code must name code that exists.

Every ``path.py:name`` reference and every ``sealedml`` command line written in
``README.md``, ``docs/``, ``benchmarks/`` and ``deploy/`` is resolved against the code: the file
must exist and define the name (a class, function, constant, method or
attribute), and the command, its subcommands and each ``--flag`` must be
accepted by the real parser. A renamed function or a removed flag fails here,
not in a reader's terminal.
"""

from __future__ import annotations

import argparse
import ast
import re
from functools import cache
from pathlib import Path

import pytest

from sealedml.cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "src" / "sealedml"
DOCS = sorted(
    [
        REPO / "README.md",
        *(REPO / "docs").rglob("*.md"),
        *(REPO / "benchmarks").glob("*.md"),
        *(p for p in (REPO / "deploy").rglob("*") if p.is_file()),
    ]
)

# `runtime/worker.py:Worker.load`, `protocol/keyservice.py:service_key_binding`, `tests/x.py::test_y`
_REFERENCE = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w-]+\.py)(?:::?([A-Za-z_][\w.]*))?")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_FENCE = re.compile(r"^```.*?$(.*?)^```", re.MULTILINE | re.DOTALL)


def _code_texts(path: Path) -> list[str]:
    """Inline code spans and fenced blocks of a markdown file; whole text of other files."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".md":
        return [text]
    blocks = [m.group(1) for m in _FENCE.finditer(text)]
    outside = _FENCE.sub("", text)
    return blocks + [m.group(1) for m in _CODE_SPAN.finditer(outside)]


def _resolve_files(ref: str) -> list[Path]:
    """The file a reference names: under the package or the repository, or — for a bare
    file name, written where the surrounding text says which folder — any file of that name."""
    for base in (PACKAGE, REPO):
        candidate = base / ref
        if candidate.is_file():
            return [candidate]
    if "/" not in ref:
        return sorted(PACKAGE.rglob(ref))
    return []


@cache
def _names(path: Path) -> dict[str, set[str]]:
    """Top-level names of a module, and the attributes each top-level class defines."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: dict[str, set[str]] = {}
    for node in tree.body:
        targets: list[str] = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            targets = [node.name]
        elif isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        elif isinstance(node, ast.ImportFrom):
            targets = [a.asname or a.name for a in node.names]
        for name in targets:
            members: set[str] = set()
            if isinstance(node, ast.ClassDef):
                for item in ast.walk(node):
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                        members.add(item.name)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        members.add(item.target.id)
                    elif isinstance(item, ast.Assign):
                        members |= {t.id for t in item.targets if isinstance(t, ast.Name)}
                    elif isinstance(item, ast.Attribute) and isinstance(item.value, ast.Name):
                        if item.value.id == "self":
                            members.add(item.attr)
            names[name] = members
    # Names defined inside functions (closures such as an app's route handlers).
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name not in names:
            names.setdefault(node.name, set())
    return names


def _references() -> list[tuple[str, str, str | None]]:
    found: set[tuple[str, str, str | None]] = set()
    for doc in DOCS:
        for text in _code_texts(doc):
            for match in _REFERENCE.finditer(text):
                ref, name = match.group(1), match.group(2)
                if ref.startswith(("/", "http")) or "*" in ref:
                    continue
                if text[: match.start()].endswith(("python ", "python3 ")):
                    continue  # a user's own program in an example (`sealedml run … -- python app.py`)
                found.add((str(doc.relative_to(REPO)), ref, name.rstrip(".") if name else None))
    return sorted(found, key=lambda t: (t[0], t[1], t[2] or ""))


REFERENCES = _references()


def test_the_docs_name_code_at_all() -> None:
    """The scan finds references (a broken pattern must not make every test below vacuous)."""
    assert len(REFERENCES) > 100
    assert any(ref == "runtime/worker.py" for _, ref, _ in REFERENCES)


@pytest.mark.parametrize(("doc", "ref", "name"), REFERENCES, ids=lambda v: str(v))
def test_code_reference_resolves(doc: str, ref: str, name: str | None) -> None:
    paths = _resolve_files(ref)
    assert paths, f"{doc} names {ref}, which does not exist"
    if name is None:
        return
    head, _, rest = name.partition(".")
    member = rest.split(".")[0] if rest else None
    defined = [p for p in paths if head in _names(p) and (member is None or member in _names(p)[head])]
    assert defined, f"{doc} names {ref}:{name}, which {ref} does not define"


# ---------------------------------------------------------------------------- command lines

_COMMAND = re.compile(r"(?<![\w/.-])sealedml((?:[ \t]+(?:\\\n\s*)?[^\s|;&)`]+)+)")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def _commands() -> list[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for doc in DOCS:
        for text in _code_texts(doc):
            for match in _COMMAND.finditer(text):
                line = " ".join(match.group(1).replace("\\\n", " ").split())
                found.add((str(doc.relative_to(REPO)), line))
    return sorted(found)


COMMANDS = _commands()


def test_the_docs_show_command_lines_at_all() -> None:
    assert len(COMMANDS) > 30
    assert any(line.startswith("keyservice serve") for _, line in COMMANDS)


@pytest.mark.parametrize(("doc", "line"), COMMANDS, ids=lambda v: str(v)[:80])
def test_command_line_resolves(doc: str, line: str) -> None:
    parser = build_parser()
    tokens = line.split()
    path: list[str] = []
    # Walk the subcommands as far as the tokens name them.
    while tokens and (choices := _subparsers(parser)):
        word = tokens[0].strip("[]")
        if word in choices:
            parser = choices[word]
            path.append(word)
            tokens.pop(0)
            continue
        # A choice written as alternatives (`serve|info`) or a placeholder (`COMMAND`, `…`).
        alternatives = [w for w in re.split(r"[|/]", word) if w]
        if alternatives and all(w in choices for w in alternatives):
            return  # every alternative is a real command; their flags are checked where written alone
        if not path and not word.startswith("-"):
            if word.isupper() or not doc.endswith(".md"):
                return  # a placeholder (`sealedml COMMAND --help`), or prose in a script's comment
            pytest.fail(f"{doc}: `sealedml {line}`: {word!r} is not a sealedml command")
        break
    known = _options(parser)
    if "--" in tokens:  # what follows `--` is another program's command line (`sealedml run … -- python app.py`)
        tokens = tokens[: tokens.index("--")]
    for token in tokens:
        flag = re.match(r"^\[?(--[a-z0-9][a-z0-9-]*)", token)
        if flag is None:
            continue
        assert flag.group(1) in known, (
            f"{doc}: `sealedml {line}`: `sealedml {' '.join(path)}` has no flag {flag.group(1)}"
        )
