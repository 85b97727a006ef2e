"""The pre-fork parent replaces dead workers and exits non-zero when they keep dying.

Real ``imagecache serve --workers 2`` processes; faults are real too: SIGKILL,
and a cache directory that is no longer a directory when a worker starts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from server_helpers import ServeProcess, poll, start_serve


def _workers(server: ServeProcess) -> list[int]:
    pid = server.process.pid
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return sorted(map(int, children.read().split()))


async def _answers(url: str, times: int = 10) -> None:
    connector = aiohttp.TCPConnector(force_close=True)  # new connections: any worker may take one
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(times):
            async with session.get(url + "/healthcheck") as response:
                assert response.status == 200


async def test_a_killed_worker_is_replaced_and_the_service_goes_on(
    tmp_path: Path, servers: list[ServeProcess]
) -> None:
    root = tmp_path / "images"
    root.mkdir()
    server = await start_serve(tmp_path / "cache", f"directory:{root}", workers=2)
    servers.append(server)
    first = _workers(server)
    assert len(first) == 2
    os.kill(first[0], signal.SIGKILL)

    async def replaced() -> bool:
        now = _workers(server)
        return len(now) == 2 and first[0] not in now

    await poll(replaced, "the parent has started a new worker", within=20)
    assert first[1] in _workers(server)  # the other one was left alone
    assert f"(pid {first[0]}) killed by SIGKILL; starting a replacement" in server.log()
    await _answers(server.url)
    assert server.process.returncode is None
    # Whichever worker answers the scrape, it shows the parent's count.
    async with aiohttp.ClientSession() as session, session.get(server.url + "/metrics") as response:
        text = await response.text()
    assert "imagecache_worker_restarts_total 1.0" in text


async def test_workers_that_keep_failing_to_start_make_serve_exit_non_zero(
    tmp_path: Path, servers: list[ServeProcess]
) -> None:
    root = tmp_path / "images"
    root.mkdir()
    cache_dir = tmp_path / "cache"
    server = await start_serve(
        cache_dir,
        f"directory:{root}",
        workers=2,
        env={"IMAGECACHE_WORKER_RESTART_LIMIT": "2"},
    )
    servers.append(server)
    # The cache directory goes away under the running service and a file takes
    # its name: every worker started from now on fails to open its cache.
    cache_dir.rename(tmp_path / "moved")
    cache_dir.write_text("not a cache directory\n")
    os.kill(_workers(server)[0], signal.SIGKILL)
    status = await asyncio.wait_for(server.process.wait(), 60)
    log = server.log()
    assert status == 1, log
    assert "giving up" in log
    assert "exited with status 1; starting a replacement" in log  # a failed start, counted


async def test_serve_exits_non_zero_when_no_worker_can_start(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("a file\n")
    not_a_directory = a_file / "cache"  # cannot be made: its parent is a file
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from imagecache.cli import main; main()",
        "serve",
        "--port",
        "0",
        "--cache-dir",
        str(not_a_directory),
        "--upstream",
        f"directory:{tmp_path}",
        "--workers",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "IMAGECACHE_WORKER_RESTART_LIMIT": "1"},
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1, output.decode(errors="replace")
    assert b"giving up" in output
