"""``imagecache serve`` loads only what its settings use (issue 18, start-up).

Every module a start imports is paid for by every restart before the first
request is served. A service of one worker over a directory origin, without
Keystone or a cluster, must not load the pre-forked parent's machinery
(multiprocessing), the punch-hole helper's ctypes (whose ``find_library`` ran
``ldconfig`` in a subprocess at import), nor an optional extra (boto3,
keystoneauth1, SQLAlchemy). The modules are listed by the service process
itself when it exits, after it has served a miss and a hit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import aiohttp

from server_helpers import image_bytes, put_image, start_serve

IMAGE_ID = "4f0c8d7e-5a1b-4c2d-9e3f-0a1b2c3d4e5f"
# Top-level packages a start that does not need them must not load (each one is
# a cost of every restart); prometheus_client's parser (multi-worker scrapes) too.
NOT_FOR_THIS_SERVICE = (
    "multiprocessing",
    "ctypes",
    "boto3",
    "botocore",
    "keystoneauth1",
    "sqlalchemy",
    "alembic",
)
_REPORTING_MAIN = (
    "import atexit, json, sys\n"
    "_out = sys.argv.pop(1)\n"
    "def _report():\n"
    "    with open(_out, 'w') as out:\n"
    "        json.dump(sorted(sys.modules), out)\n"
    "atexit.register(_report)\n"
    "from imagecache.cli import main\n"
    "main()"
)


async def test_a_single_worker_directory_service_loads_nothing_it_does_not_use(
    tmp_path: Path,
) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    data = image_bytes(64 * 1024)
    put_image(origin, IMAGE_ID, data)
    report = tmp_path / "modules.json"
    server = await start_serve(
        tmp_path / "cache",
        f"directory:{origin}",
        command=(sys.executable, "-c", _REPORTING_MAIN, str(report)),
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in ("miss", "hit"):
                async with session.get(f"{server.url}/v2/images/{IMAGE_ID}/file") as response:
                    assert response.status == 200
                    assert await response.read() == data
    finally:
        assert await server.stop() == 0, server.log()
    loaded = json.loads(report.read_text())
    assert "imagecache.server.app" in loaded  # the report is the service's own
    unused = {m for m in loaded if m.split(".")[0] in NOT_FOR_THIS_SERVICE}
    unused |= {m for m in loaded if m.startswith("prometheus_client.parser")}
    assert unused == set()
