"""One exception tree: every exception class of src/ is in imagecache/errors.py, as drawn there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import imagecache.errors as errors
from imagecache.errors import ImageCacheError

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "imagecache"
# Exception classes still defined outside errors.py, each with why (issue 13).
PENDING_OUTSIDE: dict[tuple[str, str], str] = {}
# Bases that make a class an exception; click's own errors stay the CLI's (cli.py).
_EXCEPTION_BASE = re.compile(r"(Exception|Error|Failed|Gone|Refused)$")


def _drawn_tree() -> dict[str, str]:
    """Each class drawn in errors.py's docstring, with the class drawn as its parent."""
    assert errors.__doc__ is not None
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in errors.__doc__.splitlines():
        match = re.match(r"^(\s*)(?:[│ ]*[├└]── )?([A-Z]\w+)(?:\s|$)", line)
        if match is None or ("──" not in line and match.group(2) != "ImageCacheError"):
            continue
        depth = line.index(match.group(2))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parents[match.group(2)] = stack[-1][1]
        stack.append((depth, match.group(2)))
    return parents


def test_the_drawn_tree_is_the_class_tree() -> None:
    classes = {
        name: value
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, ImageCacheError)
    }
    actual = {
        name: next(base.__name__ for base in cls.__bases__ if issubclass(base, ImageCacheError))
        for name, cls in classes.items()
        if cls is not ImageCacheError
    }
    assert _drawn_tree() == actual


def test_no_exception_class_outside_errors_py() -> None:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = [ast.unparse(base) for base in node.bases]
            if any(_EXCEPTION_BASE.search(base) for base in bases) and not any(
                base.startswith("click.") for base in bases
            ):
                found.add((str(path.relative_to(PACKAGE)), node.name))
    assert found - set(PENDING_OUTSIDE) == set(), "put exception classes in imagecache/errors.py"
    assert set(PENDING_OUTSIDE) - found == set(), "moved: remove from PENDING_OUTSIDE"
