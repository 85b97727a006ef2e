"""Sizes and durations as operators write them: ``10GiB``, ``500MB``, ``30s``, ``1h30m``.

Pure functions, so the settings, the CLI and the docs share one spelling.

Sizes: a whole number of bytes, or a number (fractions allowed: ``1.5G``) and
a unit. ``KiB``/``MiB``/``GiB``/``TiB`` and the bare ``K``/``M``/``G``/``T``
are powers of 1024: the bare letters mean what they mean to Glance's
``image_cache_max_size`` habits, systemd and ``dd``, and an operator writing
``10G`` for a disk cache means GiB. ``KB``/``MB``/``GB``/``TB`` are SI powers of
1000, as a disk vendor writes them. ``B`` is bytes. Units ignore case
(``10gib``); a fraction of a byte is rounded down.

Durations: a number of seconds (``90``, ``2.5``), or one or more number-unit
pairs from ``ms``, ``s``, ``m`` (minutes), ``h``, ``d``, ``w``, largest first or
not (``1h30m``, ``250ms``). Plain numbers are seconds because every such
setting is in seconds and was always given that way.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "DURATION_FORMS",
    "SIZE_FORMS",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
]

SIZE_FORMS = (
    "bytes (1073741824) or a number with a unit: K, M, G, T or KiB, MiB, GiB, TiB "
    "(powers of 1024), KB, MB, GB, TB (powers of 1000), e.g. 10GiB, 500MB, 1.5G"
)
DURATION_FORMS = (
    "seconds (30, 2.5) or numbers with units ms, s, m, h, d, w, e.g. 250ms, 30s, 5m, 1h30m, 1d"
)

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    **{p: 1024**n for n, p in enumerate("kmgt", start=1)},
    **{f"{p}ib": 1024**n for n, p in enumerate("kmgt", start=1)},
    **{f"{p}b": 1000**n for n, p in enumerate("kmgt", start=1)},
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)

_DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1,
    "m": 60,
    "h": 3600,
    "d": 86400,
    "w": 7 * 86400,
}
_NUMBER = r"(?:\d+(?:\.\d+)?|\.\d+)"
_DURATION_PART = re.compile(rf"({_NUMBER})\s*(ms|s|m|h|d|w)", re.IGNORECASE)
_DURATION_RE = re.compile(rf"\s*(?:{_NUMBER}\s*(?:ms|s|m|h|d|w)\s*)+", re.IGNORECASE)


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as ``10GiB``; ``ValueError`` names the forms."""
    if isinstance(value, bool):  # True is an int to Python, never a size to an operator
        raise ValueError(f"not a size; use {SIZE_FORMS}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value)
        if match is not None:
            number: str = match[1]
            unit: str = match[2]
            factor = _SIZE_UNITS.get(unit.lower())
            if factor is not None:
                return math.floor(float(number) * factor) if "." in number else int(number) * factor
    raise ValueError(f"not a size; use {SIZE_FORMS}")


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``1h30m``; ``ValueError`` names the forms."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration; use {DURATION_FORMS}")
    if isinstance(value, int | float):
        if math.isfinite(value):
            return float(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(_NUMBER, text):
            return float(text)
        if _DURATION_RE.fullmatch(value):
            return sum(
                float(number) * _DURATION_UNITS[unit.lower()]
                for number, unit in _DURATION_PART.findall(value)
            )
    raise ValueError(f"not a duration; use {DURATION_FORMS}")


def format_size(size: int) -> str:
    """The shortest exact spelling: ``10GiB``, ``1536KiB``, ``1000`` (bytes)."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: ``1d``, ``5m``, ``1h30m``, ``250ms``, ``0``."""
    if seconds == 0:
        return "0"
    millis = round(seconds * 1000)
    if not math.isclose(millis, seconds * 1000, abs_tol=1e-6):
        return repr(seconds)
    parts = []
    for unit, factor in (("w", 604_800_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000)):
        if millis >= factor:
            count, millis = divmod(millis, factor)
            parts.append(f"{count}{unit}")
    if millis:
        parts.append(f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms")
    return "".join(parts)
