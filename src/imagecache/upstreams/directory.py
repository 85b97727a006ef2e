"""The ``directory`` upstream: images are files in a local directory.

The embedded default for a first run (``make serve``) and the simplest origin
for tests. ``<root>/<image_id>`` holds the bytes; optional sidecar files
``<image_id>.md5``, ``<image_id>.sha256`` or ``<image_id>.sha512`` hold the
hex digest the fill is verified against (the first word of the file, so the
output of ``sha512sum`` works as is).
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncGenerator
from pathlib import Path

from imagecache.errors import UpstreamError, UpstreamNotFound
from imagecache.records import HASH_ALGORITHMS, ImageInfo
from imagecache.upstreams.base import ANONYMOUS, BlockingSource, Caller, Upstream

CHUNK_SIZE = 1024 * 1024


class DirectoryUpstream(Upstream):
    """Images from ``root``; every caller may read every image."""

    kind = "directory"

    def __init__(self, root: Path | str, chunk_size: int = CHUNK_SIZE) -> None:
        self.root = Path(root)
        self.chunk_size = chunk_size

    async def check_reachable(self) -> str:
        # A root that does not exist (a typo, an unmounted share) answers every
        # download with 404: the service runs, but serves nothing.
        root = self.root
        if not await asyncio.to_thread(root.is_dir):
            raise UpstreamError(f"the directory origin {root} does not exist or is not a directory")
        if not await asyncio.to_thread(os.access, root, os.R_OK | os.X_OK):
            raise UpstreamError(f"the directory origin {root} is not readable")
        return f"directory {root} is readable"

    def path_of(self, image_id: str) -> Path:
        """The file of ``image_id``; ids are validated at the edge, this is a second fence."""
        if not image_id or "/" in image_id or "\0" in image_id or image_id.startswith("."):
            raise UpstreamNotFound(image_id)
        return self.root / image_id

    async def info(self, image_id: str, caller: Caller = ANONYMOUS) -> ImageInfo:
        return await asyncio.to_thread(self._info, image_id)

    def _info(self, image_id: str) -> ImageInfo:
        path = self.path_of(image_id)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise UpstreamNotFound(image_id) from None
        except OSError as exc:
            raise UpstreamError(f"cannot stat image {image_id!r} in {self.root}: {exc}") from exc
        if not path.is_file():
            raise UpstreamNotFound(image_id)
        checksum = _read_digest(path.with_name(f"{image_id}.md5"))
        hash_algo = hash_value = None
        for algo in HASH_ALGORITHMS:  # strongest first
            if algo == "md5":
                break
            value = _read_digest(path.with_name(f"{image_id}.{algo}"))
            if value is not None:
                hash_algo, hash_value = algo, value
                break
        return ImageInfo(
            image_id=image_id,
            size=st.st_size,
            checksum=checksum,
            hash_algo=hash_algo,
            hash_value=hash_value,
        )

    async def stream(
        self,
        image_id: str,
        caller: Caller = ANONYMOUS,
        start: int = 0,
        end: int | None = None,
    ) -> AsyncGenerator[bytes, None]:
        path = self.path_of(image_id)
        fd = await asyncio.to_thread(self._open, image_id, path)
        try:
            offset = start
            while end is None or offset < end:
                want = self.chunk_size if end is None else min(self.chunk_size, end - offset)
                try:
                    chunk = await asyncio.to_thread(os.pread, fd, want, offset)
                except OSError as exc:
                    raise UpstreamError(f"reading image {image_id!r} failed: {exc}") from exc
                if not chunk:
                    break
                offset += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    async def open_source(self, image_id: str, caller: Caller = ANONYMOUS) -> BlockingSource:
        path = self.path_of(image_id)
        return _FileSource(image_id, await asyncio.to_thread(self._open, image_id, path))

    def _open(self, image_id: str, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise UpstreamNotFound(image_id) from None
        except OSError as exc:
            raise UpstreamError(f"cannot open image {image_id!r} in {self.root}: {exc}") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a directory or a device is no image
            os.close(fd)
            raise UpstreamNotFound(image_id)
        return fd


class _FileSource:
    """An image file read front to back into the caller's buffers."""

    def __init__(self, image_id: str, fd: int) -> None:
        self.image_id = image_id
        self.fd = fd
        self.offset = 0

    def readinto(self, buffer: memoryview, /) -> int:
        try:
            count = os.preadv(self.fd, [buffer], self.offset)
        except OSError as exc:
            raise UpstreamError(f"reading image {self.image_id!r} failed: {exc}") from exc
        self.offset += count
        return count

    def copy_into(self, fd: int, count: int, /) -> int:
        copied = os.copy_file_range(self.fd, fd, count, self.offset)
        self.offset += copied
        return copied

    def interrupt(self) -> None:
        """Nothing to do: a local read never waits on anyone (and closing the
        descriptor under a running pread could let it read a reused one)."""

    def close(self) -> None:
        os.close(self.fd)


def _read_digest(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return None
    words = text.split()
    return words[0].lower() if words else None
