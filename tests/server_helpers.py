"""Helpers for the service tests: an app over a directory upstream, and image data."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from imagecache.server.app import create_app
from imagecache.server.state import STATE
from imagecache.settings import Settings
from imagecache.upstreams.directory import DirectoryUpstream


def image_bytes(size: int, seed: int = 1) -> bytes:
    """Deterministic, incompressible-looking bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def put_image(root: Path, image_id: str, data: bytes, *, sidecar: str | None = "sha256") -> None:
    """Write an image (and its digest sidecar) into a directory upstream's root."""
    root.mkdir(parents=True, exist_ok=True)
    (root / image_id).write_bytes(data)
    if sidecar is not None:
        digest = hashlib.new(sidecar, data).hexdigest()
        (root / f"{image_id}.{sidecar}").write_text(f"{digest}  {image_id}\n")


def directory_app(settings: Settings, root: Path) -> web.Application:
    return create_app(settings, upstream=DirectoryUpstream(root))


def listdir(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


async def settled(client: TestClient[Any, Any]) -> None:
    """Wait for the app's verified fills to commit.

    A client has its whole body once the fill is verified, a moment before the
    commit makes it a cache entry; a test that looks at the cache directory (or
    expects a hit) right after a download waits here first.
    """
    await client.app[STATE].fills.settled()
