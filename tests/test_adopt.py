"""Adopting a Glance cache directory: its files, its cache.db rows or xattrs, its queue."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from driver_kinds import settings_for
from imagecache import ImageCache
from imagecache.adopt import import_glance_cache
from imagecache.cli import main
from imagecache.records import AdoptOutcome
from server_helpers import directory_app

# Glance's sqlite driver's table, exactly.
GLANCE_SCHEMA = """
CREATE TABLE cached_images (
    image_id TEXT PRIMARY KEY,
    last_accessed REAL DEFAULT 0.0,
    last_modified REAL DEFAULT 0.0,
    size INTEGER DEFAULT 0,
    hits INTEGER DEFAULT 0,
    checksum TEXT
)
"""
UUIDS = [
    "6e4a2a7c-6f3b-4d0e-9a7e-0c1d2e3f4a5b",
    "9b1c2d3e-4f5a-4b6c-8d7e-1f2a3b4c5d6e",
    "0a1b2c3d-4e5f-4a6b-9c8d-7e6f5a4b3c2d",
]


def _glance_dir(root: Path) -> Path:
    glance = root / "glance-cache"
    for sub in ("incomplete", "invalid", "queue"):
        (glance / sub).mkdir(parents=True)
    for i, image_id in enumerate(UUIDS):
        (glance / image_id).write_bytes(bytes([65 + i]) * (1000 * (i + 1)))
    (glance / "queue" / "queued-one").touch()
    (glance / "incomplete" / "half").write_bytes(b"h")
    return glance


def _with_cache_db(glance: Path) -> None:
    conn = sqlite3.connect(glance / "cache.db")
    conn.execute(GLANCE_SCHEMA)
    rows = [
        (UUIDS[0], 1700000100.5, 1700000000.0, 1000, 7, "0" * 32),
        (UUIDS[1], 0.0, 1700000200.0, 2000, 0, None),  # never read: Glance writes 0
        (UUIDS[2], 1700000500.0, 1700000300.0, 3000, 2, None),
        ("ghost", 1.0, 1.0, 10, 1, None),  # a row without a file
    ]
    conn.executemany("INSERT INTO cached_images VALUES (?, ?, ?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()


def _with_xattrs(glance: Path) -> None:
    try:
        for i, image_id in enumerate(UUIDS):
            os.setxattr(glance / image_id, "user.hits", str(10 + i).encode())
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip(f"SKIPPED: {glance} has no user extended attributes")
        raise
    os.utime(glance / UUIDS[0], (1700000900.0, 1700000800.0))


@pytest.mark.parametrize("kind", ["sqlite", "xattr"])
def test_import_a_cache_db_directory(kind: str, tmp_path: Path, cache_dir: Path) -> None:
    glance = _glance_dir(tmp_path)
    _with_cache_db(glance)
    with ImageCache(settings_for(kind, cache_dir, tmp_path)) as cache:
        report = import_glance_cache(cache, glance)
        assert report.metadata_source == "cache.db"
        assert report.outcomes == dict.fromkeys(UUIDS, AdoptOutcome.ADOPTED)
        assert report.queued == 1
        assert report.bytes == 6000
        images = {image.image_id: image for image in cache.get_cached_images()}
        assert set(images) == set(UUIDS)
        assert images[UUIDS[0]].hits == 7
        assert images[UUIDS[0]].last_accessed == 1700000100.5
        assert images[UUIDS[0]].checksum == "0" * 32
        assert images[UUIDS[1]].hits == 0
        assert images[UUIDS[1]].last_accessed == 1700000200.0  # never read: modified time
        assert images[UUIDS[2]].hits == 2
        # Reading counts on top of Glance's hits.
        with cache.open_for_read(UUIDS[2]) as handle:
            assert handle.read() == b"C" * 3000
        assert cache.get_hit_count(UUIDS[2]) == 3
        assert cache.get_queued_images() == ["queued-one"]
    # Moved, not copied; what was not an image stays behind.
    assert not any((glance / image_id).exists() for image_id in UUIDS)
    assert (glance / "incomplete" / "half").exists()


def test_import_an_xattr_directory_by_copy_with_the_cli(tmp_path: Path, cache_dir: Path) -> None:
    glance = _glance_dir(tmp_path)
    _with_xattrs(glance)
    result = CliRunner().invoke(
        main,
        ["--cache-dir", str(cache_dir), "--json", "import-glance-cache", "--copy", str(glance)],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["metadata_source"] == "xattr"
    assert sorted(report["images"]) == sorted(UUIDS)
    listed = json.loads(
        CliRunner().invoke(main, ["--cache-dir", str(cache_dir), "--json", "list-cached"]).output
    )
    hits = {entry["image_id"]: entry["hits"] for entry in listed}
    assert hits == {UUIDS[0]: 10, UUIDS[1]: 11, UUIDS[2]: 12}
    first = next(entry for entry in listed if entry["image_id"] == UUIDS[0])
    assert first["last_modified"] == 1700000800.0
    assert first["last_accessed"] == 1700000900.0
    assert all((glance / image_id).exists() for image_id in UUIDS)  # --copy keeps them

    again = CliRunner().invoke(
        main, ["--cache-dir", str(cache_dir), "import-glance-cache", str(glance)]
    )
    assert again.exit_code == 0
    assert "Adopted 0 images" in again.output


def test_import_refuses_what_is_not_a_glance_cache(tmp_path: Path, cache_dir: Path) -> None:
    missing = CliRunner().invoke(
        main, ["--cache-dir", str(cache_dir), "import-glance-cache", str(tmp_path / "nope")]
    )
    assert missing.exit_code == 1
    assert missing.output.startswith("Error: Glance cache directory")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cache.db").write_bytes(b"not a database at all" * 100)
    result = CliRunner().invoke(
        main, ["--cache-dir", str(cache_dir), "import-glance-cache", str(broken)]
    )
    assert result.exit_code == 1
    assert result.output.startswith("Error: ")
    assert result.output.count("\n") == 1


async def test_an_adopted_cache_is_served_by_the_service_with_its_hits_kept(
    aiohttp_client: Any, tmp_path: Path, cache_dir: Path
) -> None:
    """Glance's cache.db rows survive adoption and keep counting when the service serves them."""
    glance = _glance_dir(tmp_path)
    _with_cache_db(glance)
    settings = settings_for("sqlite", cache_dir, tmp_path)
    with ImageCache(settings) as cache:
        import_glance_cache(cache, glance)
    # An empty origin: every byte served below must come from the adopted files.
    origin = tmp_path / "empty-origin"
    origin.mkdir()
    client = await aiohttp_client(directory_app(settings, origin))
    async with client.get(f"/v2/images/{UUIDS[0]}/file") as response:
        assert response.status == 200
        assert await response.read() == b"A" * 1000
    async with client.get("/v2/cache") as response:
        listed = {entry["image_id"]: entry for entry in (await response.json())["cached_images"]}
    assert set(listed) == set(UUIDS)
    assert listed[UUIDS[0]]["hits"] == 8  # Glance's 7, plus the read just served
    assert listed[UUIDS[2]]["hits"] == 2
