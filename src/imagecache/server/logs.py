"""The service's log output: a level and a format, ``text`` or ``json`` (settings ``log_*``).

Both formats carry the same fields: the time, the process id, the level, the
logger's name and the message; an access line (``imagecache.access``) also
its own fields (server/delivery.py), which JSON gives as keys of their own.

Text lines are escaped by ``logsafe.EscapingFilter`` so that no logged value
can forge a line. JSON lines need no such filter: ``json.dumps`` escapes every
control character itself, and with ``ensure_ascii`` also U+2028/9 and the
rest of non-ASCII, so one record is always one line. Escaping the text first
would show a caller's newline as ``\\\\n`` there.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from typing import Any

from imagecache.logsafe import EscapingFilter
from imagecache.settings import LogFormat

__all__ = ["TEXT_FORMAT", "JsonFormatter", "configure"]

TEXT_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            # ISO 8601 with the local offset: the instant of the text format's
            # asctime, in a form log tools parse without being told the zone.
            "timestamp": datetime.fromtimestamp(record.created)
            .astimezone()
            .isoformat(timespec="milliseconds"),
            "pid": record.process,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            document.update(access)
        if record.exc_info and record.exc_info[1] is not None:
            document["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, ensure_ascii=True, default=str)


def configure(level: str, log_format: LogFormat) -> None:
    """Log to stderr at ``level`` in ``log_format``, unless logging was set up already.

    An embedding program (or a test) that configured logging keeps its own
    handlers; only the escaping filter is added to them.
    """
    # Python's warnings become records too: printed on their own they would be
    # lines of neither format (a JSON reader would choke on them).
    logging.captureWarnings(True)
    # Alembic announces each of its plugins at INFO on every start of a central
    # node (seven lines that say nothing to an operator); its warnings still show.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    root = logging.getLogger()
    if not root.handlers:
        stderr = logging.StreamHandler(sys.stderr)
        json_lines = log_format == "json"
        stderr.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
        root.addHandler(stderr)
        root.setLevel(level)
        if json_lines:
            return
    for handler in root.handlers:
        # Request paths, ids and origin messages reach these lines: escaped, they
        # cannot forge one (logsafe).
        handler.addFilter(EscapingFilter())
