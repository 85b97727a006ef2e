"""Background fills give way to a client's across a shaped WAN link (issue 15, item 5).

Real parts, as in tests/wan/test_wan_fills.py: nginx in its own network
namespace behind a ``tc``-shaped veth link and the project's delay relay,
and ``imagecache serve`` at the edge. One worker: there the client's
arrival stops the background fill before its next chunk, so what it reads
meanwhile has a bound (the chunk it was in); across workers the busy mark
is looked at every 100 ms, in which a background fill reading from full TCP
buffers may take a few MiB (tests/fill/test_background_bandwidth.py covers that
path by its state).
The background fill runs with no cap, so it takes the whole link until the
client comes. What is asserted is that the paused background fill reads
(almost) nothing while the client's fill runs, read from the partial
files' growth, and that it closed its origin connection (the metric), then
resumed and committed the image whole; never a speed. The timings are
printed for the record (docs/operations.md): the client's fill of an image
alone first, then beside the paused fill. Before the release, the bytes of
the background image already in the path's TCP buffers when the client came
(the kernel autotunes a fast reader's window up to ``tcp_rmem``'s maximum)
still crossed the link, so an image that fit in them cost the client as
much link time paused as not (4 MiB in 2.2 s either way, 1.06 s alone).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from peers.nginx import start_nginx
from peers.relay import RelayProcess
from peers.wan import WanRig
from server_helpers import ServeProcess, image_bytes, listdir, poll, put_image, start_serve

pytestmark = pytest.mark.timeout(90)
MIB = 1024 * 1024
LINK_MBIT = 40  # 5 MB/s: 4 MiB in about 0.85 s
DELAY = 0.02  # one way
# The relay's bytes in flight: about twice the link's bandwidth-delay product (5 MB/s x
# 40 ms), as a router's queue would hold, not its 16 MiB default.
WINDOW = 512 * 1024
BACKGROUND = image_bytes(8 * MIB, seed=31)
USER = image_bytes(4 * MIB, seed=32)
ALONE = image_bytes(4 * MIB, seed=33)  # the same size, fetched with nothing else running
TOKEN = "s3cret-admin-token"


@pytest.fixture
def origin(wan_rig: WanRig, tmp_path: Path) -> Iterator[tuple[str, Path, RelayProcess]]:
    host = wan_rig.add_host("o", mbit=LINK_MBIT)
    root = tmp_path / "origin"
    (root / "images").mkdir(parents=True)
    nginx = start_nginx(host, root, tmp_path / "nginx")
    try:
        with RelayProcess((host.address, 8080), delay=DELAY, window=WINDOW) as relay:
            yield f"http:{relay.url}/images/{{image_id}}", root / "images", relay
    finally:
        nginx.stop()


async def test_a_paused_background_fill_reads_nothing_while_a_client_fills_across_the_wan(
    origin: tuple[str, Path, RelayProcess], tmp_path: Path, servers: list[ServeProcess]
) -> None:
    upstream, images, relay = origin
    put_image(images, "background", BACKGROUND, sidecar=None)
    put_image(images, "user", USER, sidecar=None)
    put_image(images, "alone", ALONE, sidecar=None)
    cache_dir = tmp_path / "cache"
    env = {
        "IMAGECACHE_ADMIN_TOKEN": TOKEN,
        "IMAGECACHE_BACKGROUND_BANDWIDTH_WHILE_BUSY": "0",  # pause
    }
    server = await start_serve(cache_dir, upstream, env=env)
    servers.append(server)
    partial = cache_dir / "incomplete" / "background"

    def written() -> int:
        try:
            return partial.stat().st_size
        except FileNotFoundError:
            return len(BACKGROUND) if (cache_dir / "background").exists() else 0

    async with aiohttp.ClientSession() as session:
        asked = time.monotonic()
        async with session.get(server.url + "/v2/images/alone/file") as response:
            assert response.status == 200
            assert await response.read() == ALONE
        alone = time.monotonic() - asked

        async with session.put(
            server.url + "/v2/cache/background", headers={"X-Auth-Token": TOKEN}
        ) as response:
            assert response.status == 202

        async def a_quarter() -> bool:
            return written() >= len(BACKGROUND) // 4

        await poll(a_quarter, "the background fill is a quarter in", within=20)
        before = written()
        user_partial = cache_dir / "incomplete" / "user"

        def user_still_reading() -> bool:
            # Until the client's fill has every byte it is not verified, and the
            # background fill stays paused; after that it may drain at once what
            # the TCP buffers hold for it, so it is sampled only before.
            try:
                return user_partial.stat().st_size < len(USER)
            except FileNotFoundError:
                return False

        asked = time.monotonic()
        paused_samples: list[int] = []
        received = bytearray()
        first_byte = 0.0
        async with session.get(server.url + "/v2/images/user/file") as response:
            assert response.status == 200
            async for chunk in response.content.iter_any():
                if not received:
                    first_byte = time.monotonic() - asked
                received += chunk
                if user_still_reading():
                    paused_samples.append(written())
        took = time.monotonic() - asked
        assert bytes(received) == USER
        assert paused_samples, "the client's fill was never seen running"
        during = paused_samples[-1] - before

        # Unpaused, the background fill read its remaining 6 MiB meanwhile and
        # finished first (measured: 5.94 MiB). Paused, it reads at most the
        # chunk it was in when the client came (measured: 0.3-0.5 MiB).
        print(
            f"client: first byte {first_byte:.3f} s, 4 MiB in {took:.3f} s "
            f"(alone: {alone:.3f} s, ratio {alone / took:.2f}; "
            f"the link's rate: {len(USER) * 8 / LINK_MBIT / 1e6:.3f} s); "
            f"background while the client's fill ran: {during / MIB:.2f} MiB "
            f"({len(paused_samples)} samples)"
        )
        assert during < 1.5 * MIB, during

        async def background_done() -> bool:
            return (cache_dir / "background").exists() and listdir(cache_dir / "incomplete") == []

        await poll(background_done, "the background fill resumes and commits", within=30)
        assert (cache_dir / "background").read_bytes() == BACKGROUND
        async with session.get(server.url + "/metrics") as response:
            metrics = await response.text()
    link = relay.stats()
    images_bytes = len(BACKGROUND) + len(USER) + len(ALONE)
    print(f"link: {link.down_bytes / MIB:.2f} MiB down for {images_bytes / MIB} MiB")
    assert "imagecache_background_throttled_seconds_total" in metrics
    assert "imagecache_background_connections_released_total 1.0" in metrics
    # The bytes the closed connection's buffers held were thrown away and asked
    # for again: more than the images, but less than the background image twice.
    assert link.down_bytes < images_bytes + len(BACKGROUND) - before, link
