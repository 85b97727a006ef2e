"""The directory upstream (the embedded default): sidecar digests, ranges, the path fence."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from imagecache.errors import UpstreamNotFound
from imagecache.settings import load_settings
from imagecache.upstreams import create_upstream
from imagecache.upstreams.directory import DirectoryUpstream
from server_helpers import image_bytes

DATA = image_bytes(3 * 1024 * 1024 + 1)


async def collect(
    upstream: DirectoryUpstream, image_id: str, start: int = 0, end: int | None = None
) -> bytes:
    return b"".join([chunk async for chunk in upstream.stream(image_id, start=start, end=end)])


async def test_info_reads_the_strongest_sidecar_and_md5(tmp_path: Path) -> None:
    (tmp_path / "img").write_bytes(DATA)
    (tmp_path / "img.sha256").write_text(hashlib.sha256(DATA).hexdigest() + "  img\n")
    (tmp_path / "img.sha512").write_text(hashlib.sha512(DATA).hexdigest().upper() + "\n")
    (tmp_path / "img.md5").write_text(hashlib.md5(DATA).hexdigest())
    info = await DirectoryUpstream(tmp_path).info("img")
    assert (info.size, info.status) == (len(DATA), "active")
    assert (info.hash_algo, info.hash_value) == ("sha512", hashlib.sha512(DATA).hexdigest())
    assert info.checksum == hashlib.md5(DATA).hexdigest()


async def test_info_without_sidecars_promises_only_the_size(tmp_path: Path) -> None:
    (tmp_path / "img").write_bytes(b"abc")
    info = await DirectoryUpstream(tmp_path).info("img")
    assert (info.size, info.checksum, info.hash_value) == (3, None, None)
    assert not info.verifiable


async def test_stream_whole_and_ranges(tmp_path: Path) -> None:
    (tmp_path / "img").write_bytes(DATA)
    upstream = DirectoryUpstream(tmp_path, chunk_size=100_000)
    assert await collect(upstream, "img") == DATA
    assert await collect(upstream, "img", 10, 20) == DATA[10:20]
    assert await collect(upstream, "img", len(DATA) - 5) == DATA[-5:]
    assert await collect(upstream, "img", len(DATA) + 5) == b""


@pytest.mark.parametrize("image_id", ["missing", "..", "../etc", ".hidden", "a/b", "sub", ""])
async def test_unknown_or_outside_ids_are_not_found(tmp_path: Path, image_id: str) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "etc").write_bytes(b"outside")
    upstream = DirectoryUpstream(root)
    with pytest.raises(UpstreamNotFound):
        await upstream.info(image_id)
    with pytest.raises(UpstreamNotFound):
        await collect(upstream, image_id)


def test_factory_builds_it(tmp_path: Path) -> None:
    upstream = create_upstream(f"directory:{tmp_path}", load_settings(None))
    assert isinstance(upstream, DirectoryUpstream)
    assert upstream.root == tmp_path
