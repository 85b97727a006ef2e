"""Metadata in ``user.imagecache.*`` extended attributes of the image files themselves.

No database: an image's metadata lives and dies with its file, so a crash can
never leave the two apart. The price is that listings and eviction scan the
directory.

Glance's xattr driver takes last access from ``st_atime``; these disks are
mounted ``relatime``, where atime moves at most once a day, so LRU order would
be wrong. We keep our own ``accessed`` attribute. Glance's ``user.hits`` is
read when ours is absent, so an adopted Glance xattr cache keeps its counts.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from imagecache.drivers.files import FileBackedDriver, Fill
from imagecache.errors import BadDriverConfiguration, CacheStoreError
from imagecache.records import CachedImage

PREFIX = "user.imagecache."
GLANCE_HITS = "user.hits"


def _get(target: int | str | Path, key: str) -> str | None:
    try:
        return os.getxattr(target, PREFIX + key).decode()
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise


def _set(target: int | str | Path, key: str, value: str) -> None:
    os.setxattr(target, PREFIX + key, value.encode())


def _read_image(path: Path, name: str) -> CachedImage:
    st = os.stat(path)
    attrs = {}
    for key in os.listxattr(path):
        if key.startswith(PREFIX) or key == GLANCE_HITS:
            attrs[key] = os.getxattr(path, key).decode()
    hits = attrs.get(PREFIX + "hits", attrs.get(GLANCE_HITS, "0"))
    modified = float(attrs.get(PREFIX + "modified", st.st_mtime))
    return CachedImage(
        image_id=name,
        # The size recorded at commit, so a file cut short later does not
        # agree with its record (an adopted Glance cache has none: the file's).
        size=int(attrs.get(PREFIX + "size", st.st_size)),
        hits=int(hits),
        last_accessed=float(attrs.get(PREFIX + "accessed", modified)),
        last_modified=modified,
        checksum=attrs.get(PREFIX + "checksum"),
        hash_algo=attrs.get(PREFIX + "hash_algo"),
        hash_value=attrs.get(PREFIX + "hash_value"),
        pinned=attrs.get(PREFIX + "pinned") == "1",
    )


class XattrDriver(FileBackedDriver):
    """Committed-image metadata in extended attributes; needs ``user_xattr`` support."""

    name = "xattr"

    def configure(self) -> None:
        super().configure()
        # One probe per process: workers starting together on one directory
        # shared a name, and one's unlink made the other's probe fail.
        probe = self.layout.lock_dir / f"xattr-probe.{os.getpid()}"
        try:
            probe.touch()
            _set(probe, "probe", "1")
        except OSError as exc:
            hint = (
                "the filesystem does not support user extended attributes; mount it with "
                "user_xattr or choose image_cache_driver = 'sqlite'"
                if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
                else f"probing extended attributes failed: {exc}"
            )
            raise BadDriverConfiguration(
                self.name, f"{hint} (image_cache_dir={self.layout.base})"
            ) from exc
        finally:
            probe.unlink(missing_ok=True)

    def _path(self, image_id: str) -> Path:
        return self.layout.active_path(self.layout.accept(image_id))

    # --- metadata hooks -------------------------------------------------------------------

    def _meta_commit(self, fill: Fill, size: int, now: float) -> None:
        try:
            _set(fill.fd, "hits", "0")
            _set(fill.fd, "size", str(size))
            _set(fill.fd, "modified", repr(now))
            _set(fill.fd, "accessed", repr(now))
            for key in ("checksum", "hash_algo", "hash_value"):
                value = getattr(fill, key)
                if value:
                    _set(fill.fd, key, value)
        except OSError as exc:
            raise CacheStoreError(f"cannot set attributes on {fill.image_id!r}: {exc}") from exc

    def _meta_forget(self, image_ids: Iterable[str]) -> None:
        """Nothing to do: the metadata goes with the file."""

    def _meta_rollback(self, fill: Fill, reason: str) -> None:
        _set(fill.fd, "error", reason[:1024])

    def record_hit(self, image_id: str) -> None:
        path = self._path(image_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # deleted while it was being read: nothing to count
        try:
            # Serialise the read-modify-write; Glance accepted lost increments.
            fcntl.flock(fd, fcntl.LOCK_EX)
            hits = _get(fd, "hits")
            if hits is None:
                try:
                    hits = os.getxattr(fd, GLANCE_HITS).decode()
                except OSError:
                    hits = "0"
            _set(fd, "hits", str(int(hits) + 1))
            _set(fd, "accessed", repr(time.time()))
        except OSError as exc:
            raise CacheStoreError(f"cannot record a hit on {image_id!r}: {exc}") from exc
        finally:
            os.close(fd)

    def set_pinned(self, image_id: str, pinned: bool) -> bool:
        try:
            _set(self._path(image_id), "pinned", "1" if pinned else "0")
        except FileNotFoundError:
            return False
        return True

    def record_image(self, image: CachedImage, *, replace: bool = False) -> bool:
        path = self._path(image.image_id)
        try:
            if not replace and _get(path, "modified") is not None:
                return False
            _set(path, "hits", str(image.hits))
            _set(path, "modified", repr(image.last_modified))
            _set(path, "accessed", repr(image.last_accessed))
            _set(path, "pinned", "1" if image.pinned else "0")
            for key in ("checksum", "hash_algo", "hash_value"):
                value = getattr(image, key)
                if value:
                    _set(path, key, value)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise CacheStoreError(f"cannot set attributes on {image.image_id!r}: {exc}") from exc
        return True

    # --- listings ---------------------------------------------------------------------------

    def _scan(self) -> Iterator[CachedImage]:
        for entry in self.layout.iter_images():
            try:
                yield _read_image(Path(entry.path), entry.name)
            except FileNotFoundError:
                continue  # deleted during the scan

    def get_cache_size(self) -> int:
        total = 0
        for entry in self.layout.iter_images():
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def get_cached_images(self) -> list[CachedImage]:
        return sorted(self._scan(), key=lambda image: image.image_id)

    def get_cached_image(self, image_id: str) -> CachedImage | None:
        try:
            return _read_image(self._path(image_id), image_id)
        except FileNotFoundError:
            return None

    def get_hit_count(self, image_id: str) -> int:
        image = self.get_cached_image(image_id)
        return image.hits if image else 0

    def get_least_recently_accessed(self) -> tuple[str, int] | None:
        return next(self.iter_lru(), None)

    def iter_lru(self) -> Iterator[tuple[str, int]]:
        images = [image for image in self._scan() if not image.pinned]
        images.sort(key=lambda image: (image.last_accessed, image.image_id))
        for image in images:
            yield image.image_id, image.size
