"""Escaping what goes into a log line, so that no logged value can forge another line.

A request path, an image id, a header or an origin's error message may carry
CR, LF or other control characters (``%0a`` in a path decodes to a newline).
Written as they are, a caller could add lines of its own to the log, such as a
fake management call. ``escape`` turns every such character into a visible
escape; ``EscapingFilter`` applies it to the arguments of every record that
passes a handler, so a log call cannot forget it.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator, Mapping

__all__ = ["EscapingFilter", "escape", "escaped_traceback"]

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _table() -> dict[int, str]:
    table = {ord(char): shown for char, shown in _NAMED.items()}
    # C0, DEL and C1; then the Unicode line and paragraph separators, which
    # some log viewers and JSON-lines tools also break lines on.
    for code in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]:
        table.setdefault(code, f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return table


_TABLE = _table()


def escape(value: object) -> str:
    """``value`` as text on one line: control characters and backslashes escaped."""
    text = value if isinstance(value, str) else str(value)
    return text.translate(_TABLE)


def _escaped_arg(value: object) -> object:
    # Numbers keep their type so that %d and %.3f still format them.
    if value is None or isinstance(value, int | float):
        return value
    return escape(value)


def escaped_traceback(exc: BaseException) -> str:
    """``exc``'s traceback as the logging module prints it, each message on one line.

    The frames come from our own source files; the messages (``str(exc)``,
    which may quote a path or an origin's answer) are what could carry a
    newline, so each message line is escaped and the layout kept.
    """
    parts = list(_traceback_lines(traceback.TracebackException.from_exception(exc)))
    return "".join(parts).rstrip("\n")


def _traceback_lines(te: traceback.TracebackException) -> Iterator[str]:
    if te.__cause__ is not None:
        yield from _traceback_lines(te.__cause__)
        yield "\nThe above exception was the direct cause of the following exception:\n\n"
    elif te.__context__ is not None and not te.__suppress_context__:
        yield from _traceback_lines(te.__context__)
        yield "\nDuring handling of the above exception, another exception occurred:\n\n"
    if te.stack:
        yield "Traceback (most recent call last):\n"
        yield from te.stack.format()
    yield escape("".join(te.format_exception_only()).rstrip("\n")) + "\n"


class EscapingFilter(logging.Filter):
    """A handler filter that escapes the arguments of every record it sees.

    The format string is the program's own and is left alone (a message built
    with an f-string from outside data would escape this: log with arguments).
    Records marked ``escaped`` (the access log, which escapes its fields
    itself) pass untouched, so nothing is escaped twice.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            # Set here, the formatter uses it as is instead of formatting its own.
            record.exc_text = escaped_traceback(record.exc_info[1])
        if getattr(record, "escaped", False) or not record.args:
            return True
        if isinstance(record.args, Mapping):
            record.args = {key: _escaped_arg(value) for key, value in record.args.items()}
        else:
            record.args = tuple(_escaped_arg(value) for value in record.args)
        record.escaped = True
        return True
