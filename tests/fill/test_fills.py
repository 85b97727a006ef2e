"""Single-flight fills inside one service process, and their failure paths.

The origin is the ``http_origin`` peer: a real aiohttp server on loopback whose
bodies the test can hold at a gate, reset mid-way, or count.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from imagecache import hits
from imagecache.drivers.files import Fill
from imagecache.drivers.hooks import CommitHooks
from imagecache.fill.flight import FlightKind
from imagecache.fill.hooks import FillHooks
from imagecache.records import Chunk
from imagecache.server.state import STATE
from polling import eventually
from server_helpers import HeldHooks, image_bytes, listdir, settled, streaming_herd

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
SIZE = 2 * 1024 * 1024 + 5
DATA = image_bytes(SIZE, seed=3)


async def test_concurrent_requests_in_one_process_read_the_origin_once(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    http_origin.add("img", DATA)
    gate = http_origin.gate("img", after=SIZE // 3)
    client = await make_client()
    tasks = await streaming_herd(client, "/v2/images/img/file", 8)
    assert not (cache_dir / "img").exists(), "every client streams before the fill ends"
    gate.set()
    assert await asyncio.gather(*tasks) == [DATA] * 8
    assert http_origin.body_reads("img") == 1
    await settled(client)
    assert (cache_dir / "img").read_bytes() == DATA


async def test_upstream_reset_mid_body_aborts_the_client_and_caches_nothing(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    from peers.origin import Fault

    http_origin.add("img", DATA)
    http_origin.fail("img", Fault.RESET, after=SIZE // 2)
    client = await make_client(upstream_resume_attempts=0)  # a break is final
    async with client.get("/v2/images/img/file") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert not (cache_dir / "img").exists()
    assert listdir(cache_dir / "incomplete") == []
    # Healthy again: the next request fills normally.
    http_origin.fail("img", None)
    async with client.get("/v2/images/img/file") as response:
        assert await response.read() == DATA
    await settled(client)
    assert (cache_dir / "img").exists()


async def test_a_client_that_leaves_does_not_stop_the_fill_by_default(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    http_origin.add("img", DATA)
    gate = http_origin.gate("img", after=SIZE // 2)
    client = await make_client()
    response = await client.get("/v2/images/img/file")
    await response.content.readany()
    response.close()  # the client disconnects mid-body
    gate.set()
    await eventually(lambda: (cache_dir / "img").exists(), "the image is committed")
    assert (cache_dir / "img").read_bytes() == DATA
    assert http_origin.body_reads("img") == 1


async def test_abandoned_fill_abort_rolls_back_when_nobody_listens(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    http_origin.add("img", DATA)
    gate = http_origin.gate("img", after=SIZE // 2)
    client = await make_client(abandoned_fill="abort")
    response = await client.get("/v2/images/img/file")
    await response.content.readany()
    response.close()
    # The fill reads in its own thread: once the gate opens it could take the
    # rest before the server has noticed the client left. Wait for that first.
    flight = client.app[STATE].fills.current("img")
    assert flight is not None
    await eventually(lambda: flight.readers == 0, "the flight has no readers")
    gate.set()
    await eventually(lambda: listdir(cache_dir / "invalid") == ["img"], "the file is in invalid/")
    assert not (cache_dir / "img").exists()
    assert listdir(cache_dir / "incomplete") == []


async def _python(script: str, *args: Path, stdin: bool = False) -> asyncio.subprocess.Process:
    """``python -c script args...`` (a writer in another process), stdout piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *map(str, args),
        stdin=asyncio.subprocess.PIPE if stdin else None,
        stdout=asyncio.subprocess.PIPE,
    )


_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)  # a writer that hangs until the test kills it
"""


_WRITE_THEN_HANG = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
fcntl.flock(fd, fcntl.LOCK_EX)
with open(sys.argv[2], "rb") as prefix:
    os.write(fd, prefix.read())
print("written", flush=True)
time.sleep(600)  # a writer that hangs mid-image until the test kills it
"""


async def _follower_with_bytes_of_a_dying_writer(
    client: TestClient[Any, Any],
    cache_dir: Path,
    tmp_path: Path,
    prefix: bytes,
    byte_range: str | None = None,
) -> tuple[aiohttp.ClientResponse, bytes]:
    """Another process writes ``prefix`` and dies once a client has had some of it.

    The client asks for the whole image, or with ``byte_range`` for that Range.
    """
    (cache_dir / "incomplete").mkdir(exist_ok=True)
    (tmp_path / "prefix").write_bytes(prefix)
    holder = await _python(_WRITE_THEN_HANG, cache_dir / "incomplete" / "img", tmp_path / "prefix")
    try:
        assert holder.stdout is not None
        assert (await holder.stdout.readline()).strip() == b"written"
        headers = {"Range": byte_range} if byte_range else {}
        response = await client.get("/v2/images/img/file", headers=headers)
        assert _kind(client, "img") is FlightKind.REMOTE
        first = await response_started(response, 206 if byte_range else 200)
    finally:
        holder.kill()
        await holder.wait()
    return response, first


async def test_a_follower_with_bytes_finishes_from_the_origin_when_the_writer_dies(
    make_client: Any, http_origin: Any, cache_dir: Path, tmp_path: Path
) -> None:
    http_origin.add("img", DATA)
    client = await make_client()
    response, first = await _follower_with_bytes_of_a_dying_writer(
        client, cache_dir, tmp_path, DATA[: 1024 * 1024]
    )
    assert first + await response.read() == DATA
    assert http_origin.body_reads("img") == 1  # the rest, from where the client stood


@pytest.mark.parametrize("byte_range", [None, "bytes=1000-"], ids=["whole", "range"])
async def test_a_dead_writers_wrong_bytes_abort_their_follower(
    byte_range: str | None, make_client: Any, http_origin: Any, cache_dir: Path, tmp_path: Path
) -> None:
    """What a client already has differs from the origin's: it must not keep it.

    A whole download finds out by the hash, a range by comparing with the
    origin's bytes (it has no hash of its own).
    """
    http_origin.add("img", DATA)
    client = await make_client()
    wrong = bytes(b ^ 0xFF for b in DATA[: 1024 * 1024])
    response, _ = await _follower_with_bytes_of_a_dying_writer(
        client, cache_dir, tmp_path, wrong, byte_range
    )
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()


async def test_a_range_following_a_dying_writer_finishes_from_the_origin(
    make_client: Any, http_origin: Any, cache_dir: Path, tmp_path: Path
) -> None:
    """A range to the image's end has had the dead writer's bytes; the origin gives the rest.

    Found by the crash soak (tests/test_soak.py): such a range was aborted one
    byte short, though nothing about its bytes was wrong.
    """
    http_origin.add("img", DATA)
    client = await make_client()
    response, first = await _follower_with_bytes_of_a_dying_writer(
        client, cache_dir, tmp_path, DATA[: 1024 * 1024], "bytes=1000-"
    )
    assert response.headers["Content-Range"] == f"bytes 1000-{SIZE - 1}/{SIZE}"
    assert first + await response.read() == DATA[1000:]
    # One ranged read of the origin: the range again, its start checked against the file.
    ranges = [h.get("Range") for method, _, h in http_origin.requests if method == "GET"]
    assert ranges == [f"bytes=1000-{SIZE - 1}"]


async def test_a_follower_takes_over_when_the_writer_process_dies(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    http_origin.add("img", DATA)
    client = await make_client()
    (cache_dir / "incomplete").mkdir(exist_ok=True)
    holder = await _python(_HOLD_LOCK, cache_dir / "incomplete" / "img")
    try:
        assert holder.stdout is not None
        assert (await holder.stdout.readline()).strip() == b"locked"
        task = asyncio.create_task(client.get("/v2/images/img/file"))
        # The request follows the other process's fill: no upstream read yet.
        await eventually(
            lambda: _kind(client, "img") is FlightKind.REMOTE, "the flight follows a remote fill"
        )
        assert http_origin.body_reads("img") == 0
        holder.kill()
        response = await asyncio.wait_for(task, timeout=20)
        assert await response.read() == DATA
        await settled(client)
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()
    assert http_origin.body_reads("img") == 1
    assert (cache_dir / "img").read_bytes() == DATA


async def response_started(response: aiohttp.ClientResponse, status: int = 200) -> bytes:
    """The first bytes of a body (the fill is under way)."""
    assert response.status == status
    first = await response.content.readany()
    assert first
    return first


def _kind(client: TestClient[Any, Any], image_id: str) -> FlightKind | None:
    flight = client.app[STATE].fills.current(image_id)
    return flight.kind if flight is not None else None


async def test_a_stale_incomplete_file_is_taken_over(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    http_origin.add("img", DATA)
    client = await make_client()
    (cache_dir / "incomplete").mkdir(exist_ok=True)
    (cache_dir / "incomplete" / "img").write_bytes(b"left by a writer that died" * 1000)
    async with client.get("/v2/images/img/file") as response:
        assert await response.read() == DATA
    await settled(client)
    assert (cache_dir / "img").read_bytes() == DATA
    assert os.listdir(cache_dir / "incomplete") == []


@pytest.fixture
async def sendfile_spans(monkeypatch: pytest.MonkeyPatch) -> dict[object, list[tuple[int, int]]]:
    """Record every ``loop.sendfile`` span per transport, then let the real call run.

    A spy, not a fake: the bytes still go through the kernel's sendfile.
    """
    loop = asyncio.get_running_loop()
    real = loop.sendfile
    spans: dict[object, list[tuple[int, int]]] = {}

    async def spy(
        transport: Any, file: Any, offset: int = 0, count: int | None = None, **options: Any
    ) -> int:
        assert count is not None
        spans.setdefault(transport, []).append((offset, count))
        return await real(transport, file, offset, count, **options)

    monkeypatch.setattr(loop, "sendfile", spy)
    return spans


async def test_readers_of_a_fill_get_it_by_sendfile_and_the_last_byte_waits(
    make_client: Any, http_origin: Any, cache_dir: Path, sendfile_spans: Any
) -> None:
    http_origin.add("img", DATA)
    gate = http_origin.gate("img", after=SIZE // 3)
    client = await make_client()
    responses = [await client.get("/v2/images/img/file") for _ in range(4)]
    firsts = [await response.content.readany() for response in responses]
    assert all(firsts), "every reader got bytes before the fill ends"
    assert not (cache_dir / "img").exists()
    gate.set()
    bodies = [first + await r.read() for first, r in zip(firsts, responses, strict=True)]
    assert bodies == [DATA] * 4
    assert http_origin.body_reads("img") == 1
    # Every client's body went out as sendfile spans, contiguous from 0 to the end
    # (no pread copies), and the span that was out at the gate stopped short of the end.
    assert len(sendfile_spans) == 4
    for spans in sendfile_spans.values():
        assert spans[0][0] == 0
        assert spans[0][1] < SIZE
        assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(spans))
        assert spans[-1][0] + spans[-1][1] == SIZE


async def test_a_fill_that_fails_verification_aborts_its_sendfile_readers(
    make_client: Any, http_origin: Any, cache_dir: Path, sendfile_spans: Any
) -> None:
    http_origin.add("img", DATA)
    # The origin promises other bytes: the fill fails verification at its end.
    (http_origin.root / "img.sha256").write_text("0" * 64 + "  img\n")
    gate = http_origin.gate("img", after=SIZE // 3)
    client = await make_client(http_checksum_sidecar=True)
    responses = [await client.get("/v2/images/img/file") for _ in range(3)]
    received = [bytearray(await response.content.readany()) for response in responses]
    assert all(received), "readers were streaming before the fill failed"
    gate.set()
    for got, response in zip(received, responses, strict=True):
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await _read_into(got, response)
        assert len(got) < SIZE, "no reader got a complete body of unverified bytes"
    assert len(sendfile_spans) == 3
    assert all(sum(n for _, n in spans) < SIZE for spans in sendfile_spans.values())
    assert not (cache_dir / "img").exists()
    assert listdir(cache_dir / "invalid") == ["img"]


async def _read_into(got: bytearray, response: aiohttp.ClientResponse) -> None:
    while chunk := await response.content.readany():
        got += chunk


async def test_a_range_during_a_fill_is_served_from_the_growing_file(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    """Ranges inside or just ahead of a fill in progress cost no second origin read."""
    http_origin.add("img", DATA)
    half = SIZE // 2
    gate = http_origin.gate("img", after=half)
    client = await make_client()
    whole = await client.get("/v2/images/img/file")
    first = await response_started(whole)
    flight = client.app[STATE].fills.current("img")
    assert flight is not None
    await eventually(lambda: flight.available >= half, "half the image is available")

    async def ranged(first: int, last: int) -> tuple[int, str, bytes]:
        headers = {"Range": f"bytes={first}-{last}"}
        async with client.get("/v2/images/img/file", headers=headers) as response:
            return response.status, response.headers["Content-Range"], await response.read()

    # Already on disk: answered at once, from the file.
    assert await ranged(100, 199) == (206, f"bytes 100-199/{SIZE}", DATA[100:200])
    # Straddling what has landed: waits for the fill, then gets the right bytes.
    # (The first range's handler may still be finishing: count from one reader.)
    await eventually(lambda: flight.readers == 1, "the flight has one reader")
    straddling = asyncio.create_task(ranged(half - 10, half + 9))
    await eventually(lambda: flight.readers >= 2, "the flight has two readers")
    assert not straddling.done()
    gate.set()
    assert await straddling == (
        206,
        f"bytes {half - 10}-{half + 9}/{SIZE}",
        DATA[half - 10 : half + 10],
    )
    assert first + await whole.read() == DATA
    whole.release()
    assert http_origin.body_reads("img") == 1


_COMMIT_ON_CUE = """
import fcntl, os, sys
path, active, data = sys.argv[1], sys.argv[2], sys.argv[3]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, open(data, "rb").read())
print("locked", flush=True)
sys.stdin.readline()
os.rename(path, active)  # committed (no metadata: the file is what counts for a hit)
os.close(fd)
print("committed", flush=True)
"""


async def _writer_of_all_data(
    script: str, cache_dir: Path, tmp_path: Path
) -> asyncio.subprocess.Process:
    """Another process running ``script`` with (incomplete path, active path, DATA's file)."""
    (cache_dir / "incomplete").mkdir(exist_ok=True)
    (tmp_path / "data").write_bytes(DATA)
    return await _python(
        script, cache_dir / "incomplete" / "img", cache_dir / "img", tmp_path / "data", stdin=True
    )


async def test_a_range_during_a_fill_in_another_process_is_served_from_its_file(
    make_client: Any, http_origin: Any, cache_dir: Path, tmp_path: Path
) -> None:
    """A sibling worker's fill serves ranges here too; the last byte waits for its commit."""
    http_origin.add("img", DATA)
    client = await make_client()
    writer = await _writer_of_all_data(_COMMIT_ON_CUE, cache_dir, tmp_path)
    assert writer.stdin is not None
    assert writer.stdout is not None
    try:
        assert (await writer.stdout.readline()).strip() == b"locked"

        async def ranged(spec: str) -> tuple[int, str, bytes]:
            async with client.get("/v2/images/img/file", headers={"Range": spec}) as response:
                return response.status, response.headers["Content-Range"], await response.read()

        # Bytes already in the other process's file: answered from it at once.
        assert await ranged("bytes=100-199") == (206, f"bytes 100-199/{SIZE}", DATA[100:200])
        assert _kind(client, "img") is FlightKind.REMOTE
        # The image's last bytes wait until that fill is committed (verified).
        tail = asyncio.create_task(ranged("bytes=-10"))
        flight = client.app[STATE].fills.current("img")
        assert flight is not None
        await eventually(lambda: flight.readers == 1, "the flight has one reader")
        assert not tail.done()
        writer.stdin.write(b"commit\n")
        await writer.stdin.drain()
        assert await asyncio.wait_for(tail, 10) == (
            206,
            f"bytes {SIZE - 10}-{SIZE - 1}/{SIZE}",
            DATA[-10:],
        )
        assert (await writer.stdout.readline()).strip() == b"committed"
    finally:
        if writer.returncode is None:
            writer.kill()
        await writer.wait()
    assert http_origin.body_reads("img") == 0


class _HeldRecord(CommitHooks):
    """Holds the driver's first commit between its rename and its record, until released."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self._calls = itertools.count()  # next() is atomic: one first call across threads

    def renamed(self, image_id: str) -> None:
        if next(self._calls) == 0:
            self.entered.set()
            assert self.release.wait(10), "the test never released the record"


def _note_entry(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> asyncio.Event:
    """An event set when the coroutine ``owner.name`` (a method or a function) is entered.

    Set before the original runs up to its first await: once a test sees it,
    that call is waiting on whatever the original awaits first.
    """
    entered = asyncio.Event()
    original = getattr(owner, name)

    async def noted(self: Any, *args: Any, **kwargs: Any) -> Any:
        entered.set()
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, noted)
    return entered


async def test_a_range_that_finds_no_fill_does_not_keep_a_download_from_filling(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    """A download that arrives while a range looks for a fill to share starts its own."""
    http_origin.add("img", DATA)
    # The range's look for a fill is held until the download has joined it.
    hooks = HeldHooks(hold="looking_for_remote")
    client = await make_client(fill_hooks=hooks)
    ranged = asyncio.create_task(client.get("/v2/images/img/file", headers={"Range": "bytes=0-9"}))
    await eventually(hooks.entered.is_set, "the range is held looking for a remote fill")
    whole = asyncio.create_task(client.get("/v2/images/img/file"))
    await asyncio.wait_for(hooks.noted["joining"].wait(), 10)
    flight = client.app[STATE].fills.current("img")
    assert flight is not None
    assert flight.kind is FlightKind.PENDING  # the range's, still looking
    hooks.release.set()
    part, full = await asyncio.wait_for(asyncio.gather(ranged, whole), 20)
    assert (part.status, await part.read()) == (206, DATA[:10])
    assert (full.status, await full.read()) == (200, DATA)
    await settled(client)
    assert (cache_dir / "img").read_bytes() == DATA


async def test_a_range_waiting_on_a_fill_that_finds_the_image_committed_is_a_hit(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    """While a download's fill is being decided, another process commits the image.

    The range only watches (``range_starts_fill`` off), so the hook of its
    watch says when it waits; one that joins the fill is tested in test_range_fills.py.
    """
    http_origin.add("img", DATA)
    hooks = HeldHooks(hold="deciding")
    client = await make_client(fill_hooks=hooks, range_starts_fill=False)
    whole = asyncio.create_task(client.get("/v2/images/img/file"))
    await eventually(hooks.entered.is_set, "the fill is held deciding")
    part = asyncio.create_task(client.get("/v2/images/img/file", headers={"Range": "bytes=5-9"}))
    # Both requests wait on the one flight still deciding...
    await asyncio.wait_for(hooks.noted["watching"].wait(), 10)
    # ...when a writer elsewhere commits the image (the file is what counts).
    (cache_dir / "img").write_bytes(DATA)
    hooks.release.set()
    full, ranged = await asyncio.wait_for(asyncio.gather(whole, part), 20)
    assert (full.status, await full.read()) == (200, DATA)
    assert (ranged.status, await ranged.read()) == (206, DATA[5:10])
    assert http_origin.body_reads("img") == 0, "both were served as hits"


async def test_a_download_between_the_rename_and_the_record_waits_for_the_record(
    make_client: Any, http_origin: Any, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hit served from a file whose record is not written yet would lack Content-MD5."""
    http_origin.add("img", DATA)
    client = await make_client()
    held = _HeldRecord()
    client.app[STATE].cache.driver.commit_hooks = held
    recording, release = held.entered, held.release
    waiting = _note_entry(monkeypatch, hits, "await_commit")
    async with client.get("/v2/images/img/file") as first:
        assert await first.read() == DATA
    await eventually(recording.is_set, "the record is being written")  # renamed, record held
    assert (cache_dir / "img").exists()
    second = asyncio.create_task(client.get("/v2/images/img/file"))
    await asyncio.wait_for(waiting.wait(), 10)
    assert not second.done()
    release.set()
    response = await asyncio.wait_for(second, 10)
    assert response.headers["Content-MD5"] == hashlib.md5(DATA).hexdigest()
    assert "ETag" in response.headers
    assert await response.read() == DATA
    assert http_origin.body_reads("img") == 1


_RENAMED_BEFORE_RECORDED = """
import fcntl, os, sys
path, active, data = sys.argv[1], sys.argv[2], sys.argv[3]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, open(data, "rb").read())
os.rename(path, active)  # a commit between its rename and its record
print("renamed", flush=True)
sys.stdin.readline()
os.close(fd)
print("released", flush=True)
"""


async def test_a_download_waits_for_another_process_to_finish_its_commit(
    make_client: Any,
    http_origin: Any,
    cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    http_origin.add("img", DATA)
    client = await make_client()
    waiting = _note_entry(monkeypatch, hits, "await_commit")
    writer = await _writer_of_all_data(_RENAMED_BEFORE_RECORDED, cache_dir, tmp_path)
    assert writer.stdin is not None
    assert writer.stdout is not None
    try:
        assert (await writer.stdout.readline()).strip() == b"renamed"
        download = asyncio.create_task(client.get("/v2/images/img/file"))
        await asyncio.wait_for(waiting.wait(), 10)
        assert not download.done()  # the file is there, its writer still holds it
        writer.stdin.write(b"go\n")
        await writer.stdin.drain()
        assert (await writer.stdout.readline()).strip() == b"released"
        response = await asyncio.wait_for(download, 10)
        assert (response.status, await response.read()) == (200, DATA)
    finally:
        if writer.returncode is None:
            writer.kill()
        await writer.wait()
    assert http_origin.body_reads("img") == 0


class LetItCommit(FillHooks):
    """After each look for another process's fill, has that process commit (``commit``)."""

    commit: Callable[[], Coroutine[Any, Any, bytes]]
    loop: asyncio.AbstractEventLoop

    def looked_for_remote(self, image_id: str, found: bool) -> None:
        # In the executor thread, after this process saw the lock: the other
        # writer commits before the decision reaches the event loop.
        line = asyncio.run_coroutine_threadsafe(self.commit(), self.loop).result(10)
        assert line.strip() == b"committed"


async def test_a_fill_in_another_process_ending_before_the_first_look_is_a_hit(
    make_client: Any, http_origin: Any, cache_dir: Path, tmp_path: Path
) -> None:
    """The watched fill commits while this process decides to follow it: no 500, a hit.

    The flight then ends in its first look, before its waiting reader runs,
    and closes its file; the reader must look again rather than trip on it.
    """
    http_origin.add("img", DATA)
    hooks = LetItCommit()
    client = await make_client(fill_hooks=hooks)
    (cache_dir / "incomplete").mkdir(exist_ok=True)
    source = tmp_path / "data"
    source.write_bytes(DATA)
    writer = await _python(
        _COMMIT_ON_CUE, cache_dir / "incomplete" / "img", cache_dir / "img", source, stdin=True
    )
    assert writer.stdin is not None
    assert writer.stdout is not None
    stdin, stdout = writer.stdin, writer.stdout
    assert (await stdout.readline()).strip() == b"locked"

    async def commit_now() -> bytes:
        stdin.write(b"go\n")
        await stdin.drain()
        return await stdout.readline()

    hooks.commit, hooks.loop = commit_now, asyncio.get_running_loop()
    async with client.get("/v2/images/img/file") as response:
        assert response.status == 200
        assert await response.read() == DATA
    assert await writer.wait() == 0
    assert http_origin.body_reads("img") == 0


async def test_shutdown_wakes_a_fill_waiting_on_a_stalled_origin(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    """Rolled back at once, not after the upstream timeout (60 s here)."""
    http_origin.add("img", DATA)
    gate = http_origin.gate("img", after=SIZE // 2)  # the origin stalls half way
    client = await make_client(upstream_timeout=60)
    try:
        response = await client.get("/v2/images/img/file")
        await response_started(response)
        flight = client.app[STATE].fills.current("img")
        assert flight is not None
        await eventually(lambda: flight.available >= SIZE // 2, "half the image is available")
        # The fill thread is now blocked reading the socket; the grace period ends at once.
        await asyncio.wait_for(client.app[STATE].fills.shutdown(0.01), timeout=10)
        assert flight.state.value == "failed"
        assert listdir(cache_dir / "incomplete") == []
        assert listdir(cache_dir / "invalid") == ["img"]
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    finally:
        gate.set()


def _fill_the_disk_when(flag: threading.Event) -> Callable[[Fill, Chunk], int]:
    """``Fill.write`` that meets a real ENOSPC once ``flag`` is set.

    The fill's own descriptor is pointed at /dev/full (no small filesystem can
    be mounted here to fill up); readers keep their own descriptor of the file.
    """
    write = Fill.write

    def write_or_fail(self: Fill, data: Chunk) -> int:
        if flag.is_set():
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, self.fd)
            os.close(full)
        return write(self, data)

    return write_or_fail


async def _two_clients_then_a_full_disk(
    make_client: Any, http_origin: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[aiohttp.ClientResponse], list[bytes], asyncio.Event]:
    """Two clients of one fill hold its first bytes; the origin waits at 1 MiB; the disk is full."""
    http_origin.add("img", DATA)
    client = await make_client()
    gate = http_origin.gate("img", after=1024 * 1024)
    full = threading.Event()
    monkeypatch.setattr(Fill, "write", _fill_the_disk_when(full))
    responses, firsts = [], []
    for _ in range(2):
        response = await client.get("/v2/images/img/file")
        responses.append(response)
        firsts.append(await response_started(response))
    full.set()
    return responses, firsts, gate


async def test_clients_of_a_fill_whose_disk_fills_up_finish_from_the_origin(
    make_client: Any, http_origin: Any, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    responses, firsts, gate = await _two_clients_then_a_full_disk(
        make_client, http_origin, monkeypatch
    )
    gate.set()
    for response, first in zip(responses, firsts, strict=True):
        assert first + await response.read() == DATA
    # The fill, then one read from where each client was: no single flight
    # without a cache copy to share.
    assert http_origin.body_reads("img") == 3
    assert not (cache_dir / "img").exists()
    assert listdir(cache_dir / "invalid") == ["img"]


async def test_what_the_origin_sends_after_a_full_disk_is_still_verified(
    make_client: Any, http_origin: Any, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    responses, _, gate = await _two_clients_then_a_full_disk(make_client, http_origin, monkeypatch)
    # The origin's file changes under the download: the rest no longer
    # matches the checksum the download started with.
    (http_origin.root / "img").write_bytes(DATA[:-1] + bytes([DATA[-1] ^ 1]))
    gate.set()
    for response in responses:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert not (cache_dir / "img").exists()


async def test_a_download_joining_a_fill_under_way_follows_it_without_asking_the_origin(
    make_client: Any, http_origin: Any
) -> None:
    """A follower of a fill running in its process goes straight to the fill's bytes.

    With ``metadata_cache_ttl`` 0 every miss asks the origin what the image is;
    one that joins a fill already running here needs no answer but the fill's
    (its bytes are verified against it), nor a look for a hit that cannot be
    there yet. It gets its first bytes while the origin holds the body after
    the first third, and the origin is asked about the image once.
    """
    http_origin.add("img", DATA)
    gate = http_origin.gate("img", after=SIZE // 3)
    client = await make_client(metadata_cache_ttl=0)

    def infos() -> int:
        return sum(1 for method, path, _ in http_origin.requests if method == "HEAD")

    async with client.get("/v2/images/img/file") as leader:
        first = await leader.content.readany()
        assert first
        assert infos() == 1
        async with client.get("/v2/images/img/file") as follower:
            assert follower.status == 200
            assert follower.headers["Cache-Status"].endswith("fwd=miss; collapsed")
            early = await follower.content.readany()
            assert early, "bytes before the origin goes on"
            assert early == DATA[: len(early)]
            assert infos() == 1, "the follower asked the origin about the image again"
            gate.set()
            assert early + await follower.read() == DATA
        assert first + await leader.read() == DATA
    assert http_origin.body_reads("img") == 1
