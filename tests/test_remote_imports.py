"""A remote CLI call loads only what it needs: no engine, no drivers, no settings model.

``imagecache --url http://... <verb>`` runs ``imagecache.cli`` and
``imagecache.client``; both must stay on the stdlib plus click, errors and
records (issue 13: the client once imported adopt/manage/prefetch/scrub for
their result types, and the package root imported the cache, the drivers and
pydantic, so a refused connection took a third of a second to report). Each
check runs in a fresh interpreter, since this process has long imported
everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Third-party packages and engine modules a remote call must never load.
FORBIDDEN_PREFIXES = (
    "imagecache.cache",
    "imagecache.drivers",
    "imagecache.fill",
    "imagecache.server",
    "imagecache.settings",
    "imagecache.manage",
    "imagecache.upstreams",
    "pydantic",
    "sqlalchemy",
    "aiohttp",
    "boto3",
    "alembic",
)
WATCHED = (*FORBIDDEN_PREFIXES, "imagecache")
# The whole of imagecache that each import may load: a new entry here is a
# decision (it costs every remote call), not an accident.
ALLOWED = {
    "imagecache": {"imagecache", "imagecache.errors", "imagecache.records"},
    "imagecache.client": {
        "imagecache",
        "imagecache.client",
        "imagecache.errors",
        "imagecache.records",
    },
    "imagecache.cli": {"imagecache", "imagecache.cli", "imagecache.errors", "imagecache.records"},
}


def _run(code: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )


def _loaded_after(statement: str) -> set[str]:
    done = _run(
        f"{statement}\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({WATCHED!r}))))"
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def _forbidden(loaded: set[str]) -> set[str]:
    # "pydantic" also catches pydantic_core and pydantic_settings.
    return {m for m in loaded if any(m.startswith(p) for p in FORBIDDEN_PREFIXES)}


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_importing_the_remote_path_loads_no_engine(module: str) -> None:
    loaded = _loaded_after(f"import {module}")
    assert _forbidden(loaded) == set()
    assert {m for m in loaded if m.split(".")[0] == "imagecache"} == ALLOWED[module]


def test_a_remote_verb_loads_no_engine() -> None:
    # The verb itself runs (against a port where nothing listens: refused at
    # once), so imports inside the verb and the client's methods count too.
    statement = (
        "import atexit, json, sys\n"
        "from imagecache.cli import main\n"
        "def _report():\n"
        f"    mods = sorted(m for m in sys.modules if m.startswith({WATCHED!r}))\n"
        "    sys.__stdout__.write('\\nMODULES ' + json.dumps(mods) + '\\n')\n"
        "atexit.register(_report)\n"
        "main(['--url', 'http://127.0.0.1:9', 'list-cached'])"
    )
    done = _run(statement)
    assert done.returncode == 1, done.stderr
    assert "cannot reach" in done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("MODULES "))
    loaded = set(json.loads(line.removeprefix("MODULES ")))
    assert _forbidden(loaded) == set()
    assert "imagecache.client" in loaded


def test_the_lazy_exports_still_load_on_use() -> None:
    loaded = _loaded_after("from imagecache import ImageCache, Settings")
    assert {"imagecache.cache", "imagecache.settings"} <= loaded
