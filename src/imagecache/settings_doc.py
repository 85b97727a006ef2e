"""Write docs/settings.md from the settings model: ``python -m imagecache.settings_doc``.

The reference is generated, not written, so it cannot drift from
``settings.py``: each setting's name, type, default, unit, environment variable
and description come from the model (the description is the docstring under
the field, read from the class's source here: the model itself does not keep
it, see settings.py). ``make settings-doc`` regenerates the file; a test fails when the
committed one is out of date.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from imagecache.settings import Settings, Unit
from imagecache.units import DURATION_FORMS, SIZE_FORMS, format_duration, format_size

__all__ = ["render"]

_HEADER = f"""\
# Settings reference

<!-- Generated from src/imagecache/settings.py by `make settings-doc`
     (python -m imagecache.settings_doc > docs/settings.md). Do not edit by hand:
     change the setting's docstring and regenerate. -->

Every setting can be given in three places; the first one that has it wins:

1. a command-line flag where one exists (`imagecache serve --port 9393`);
2. the environment: `IMAGECACHE_` and the name in capitals
   (`IMAGECACHE_IMAGE_CACHE_MAX_SIZE=20GiB`);
3. the TOML file given with `--config` (`image_cache_max_size = "20GiB"`);

else the default below applies. Unknown names and bad values are refused at
start-up with the setting's name. An annotated example that loads as it is:
[etc/imagecache.toml](../etc/imagecache.toml).

**Sizes** (type *size*, in bytes) are {SIZE_FORMS}. In TOML write a unit in
quotes (`"10GiB"`); a bare number is bytes.

**Durations** (type *duration*, in seconds) are {DURATION_FORMS}. In TOML
write a unit in quotes (`"5m"`); a bare number is seconds.

| setting | type | default | unit | environment variable | what it does |
|---|---|---|---|---|---|
"""


_TABLE_HEAD = """\
| setting | type | default | unit | environment variable | what it does |
|---|---|---|---|---|---|
"""


def render() -> str:
    """The whole of docs/settings.md: the top-level settings, then each table."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    docs = docstrings(Settings)
    rows = [
        _row(name, field, prefix, docs.get(name)) for name, field in Settings.model_fields.items()
    ]
    out = _HEADER + "".join(rows)
    delimiter = str(Settings.model_config.get("env_nested_delimiter") or "__")
    for name, field in Settings.model_fields.items():
        table = _table_model(field)
        if table is None:
            continue
        nested = f"{prefix}{name}{delimiter}"
        out += f"\n## The `[{name}]` table\n\n{_paragraph(table.__doc__)}\n\n{_TABLE_HEAD}"
        table_docs = docstrings(table)
        out += "".join(
            _row(key, sub, nested, table_docs.get(key)) for key, sub in table.model_fields.items()
        )
    return out


def docstrings(cls: type) -> dict[str, str]:
    """Each field's docstring: the string literal right under its annotated assignment.

    The rule pydantic's ``use_attribute_docstrings`` follows, applied to the
    class's own body (a field inherited from a base is looked up in the base).
    """
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__ != cls.__module__:
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
        for statement, following in itertools.pairwise(body):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                found[statement.target.id] = inspect.cleandoc(following.value.value)
    return found


def _table_model(field: FieldInfo) -> type[BaseModel] | None:
    annotation, _ = _strip_none(field.annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _paragraph(doc: str | None) -> str:
    return " ".join((doc or "").split())


def _row(name: str, field: FieldInfo, prefix: str, description: str | None = None) -> str:
    description = description or field.description
    if not description:
        raise ValueError(f"setting {name!r} has no description: give it a docstring")
    unit = next((m.name for m in field.metadata if isinstance(m, Unit)), "")
    cells = [
        f"`{name}`",
        _type(field, unit),
        _default(field.default, unit),
        unit,
        f"`{(prefix + name).upper()}`",
        " ".join(description.split()),
    ]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |\n"


def _type(field: FieldInfo, unit: str) -> str:
    annotation, optional = _strip_none(field.annotation)
    if unit == "bytes":
        kind = "size"
    elif unit == "bytes per second":
        kind = "size per second (`/s` optional)"
    elif unit == "seconds":
        kind = "duration" if annotation is float else "duration in whole seconds"
    elif typing.get_origin(annotation) is Literal:
        kind = " or ".join(f"`{value}`" for value in typing.get_args(annotation))
    elif annotation is SecretStr:
        kind = "secret string"
    elif _table_model(field) is not None:
        kind = "table"
    elif typing.get_origin(annotation) is tuple:
        kind = "list of strings"
    elif isinstance(annotation, type):
        kind = {"str": "string", "Path": "path"}.get(annotation.__name__, annotation.__name__)
    else:
        kind = str(annotation)
    bounds = _bounds(field)
    return kind + (f", {bounds}" if bounds else "") + (", optional" if optional else "")


def _strip_none(annotation: Any) -> tuple[Any, bool]:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _bounds(field: FieldInfo) -> str:
    """``0 ≤ x ≤ 65535``, or ``≥ 0`` / ``> 0`` / ``≤ 1`` for one bound.

    Read by attribute from pydantic's constraint objects (``Ge(ge=0)``...).
    """
    limits = {
        name: getattr(item, name)
        for item in field.metadata
        for name in ("ge", "gt", "le", "lt")
        if getattr(item, name, None) is not None
    }
    low = f"{limits['ge']} ≤" if "ge" in limits else f"{limits['gt']} <" if "gt" in limits else ""
    high = f"≤ {limits['le']}" if "le" in limits else f"< {limits['lt']}" if "lt" in limits else ""
    if low and high:
        return f"{low} x {high}"
    if low:
        number, relation = low.split()
        return f"{'≥' if relation == '≤' else '>'} {number}"
    return high


def _default(value: Any, unit: str) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if unit in {"bytes", "bytes per second"} and isinstance(value, int):
        return f"`{format_size(value)}`"
    if unit == "seconds" and isinstance(value, int | float):
        return f"`{format_duration(value)}`"
    if isinstance(value, str | Path):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return "`[" + ", ".join(f'"{item}"' for item in value) + "]`"
    return f"`{value}`"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
