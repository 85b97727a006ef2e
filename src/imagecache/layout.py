"""Where every file of the cache lives, and the one place image ids are checked.

The layout is Glance's, so an existing Glance cache directory can be adopted:

    <dir>/<image_id>             committed, verified image
    <dir>/incomplete/<image_id>  fill in progress (exactly one writer, flock'd)
    <dir>/invalid/<image_id>     failed or abandoned fill, kept until clean
    <dir>/queue/<image_id>       empty marker; queue order is the marker's mtime
    <dir>/cache.db               sqlite driver metadata (never counted as an image)
    <dir>/.locks/                our lock files; hidden names are never image ids
    <dir>/.locks/reserved/       room held under the size limit by fills in flight
    <dir>/.locks/wanted/<id>     segments siblings' ranges ask a fill for (fill/wanted.py)

Glance keeps its lock files in the cache directory when ``lock_path`` is unset,
and then counts them as cached images; ours live under a dot-directory, and no
valid image id starts with a dot.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from imagecache.errors import CacheStoreError, CacheUnavailable, InvalidImageId

log = logging.getLogger(__name__)

MAX_ID_BYTES = 255  # NAME_MAX on every Linux filesystem we care about
SUBDIRS = ("incomplete", "invalid", "queue")
LOCK_DIR = ".locks"

# A safe, shell- and URL-friendly alphabet. Glance ids are UUIDs; directory and
# S3 upstreams use file names such as "cirros-0.6.2.img", so dots are allowed
# inside a name but not at its start (hidden files, "." and "..").
_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._~-]*")


class ImageId(str):
    """An image id that has passed the gate (``CacheLayout.validate``): safe as a file name.

    Only the gate makes one (tests/test_architecture.py checks that nothing
    else calls this constructor); code past the edge takes an ``ImageId``, and
    mypy then refuses a caller's raw ``str`` there. A ``str`` subclass rather
    than a ``typing.NewType``: the seed's driver contract, and the facade,
    take a plain ``str`` from users of the library, so they must tell at run
    time an id already checked (one ``type()`` test, then as is) from one that
    is not (checked once, by ``CacheLayout.accept``); a NewType is only a
    ``str`` at run time, and every such entry point would check it again. It
    behaves as the ``str`` it is (equality, hashing, formatting, sqlite).
    """

    __slots__ = ()


def is_cache_dir(path: Path, db_name: str = "cache.db") -> bool:
    """Whether ``path`` is a cache directory: one that opening a cache has made.

    Opening a cache with any driver (ours or Glance's) makes ``incomplete/``,
    ``invalid/`` and ``queue/``; the sqlite driver also keeps its database there.
    Any one of them is enough, so a cache that lost a subdirectory is still
    recognised (opening it repairs that). Verbs that only read or act on what a
    cache holds ask this first, so a mistyped directory is refused instead of
    being made into a new, empty cache.
    """
    if not path.is_dir():
        return False
    return (path / db_name).is_file() or any((path / sub).is_dir() for sub in SUBDIRS)


def sqlite_side_files(db_name: str) -> frozenset[str]:
    """The database file and the companions sqlite creates beside it."""
    return frozenset({db_name, f"{db_name}-wal", f"{db_name}-shm", f"{db_name}-journal"})


@dataclass(frozen=True)
class CacheLayout:
    """Paths of one cache directory; every path method takes an id that passed the gate."""

    base: Path
    reserved: frozenset[str] = field(default_factory=lambda: sqlite_side_files("cache.db"))

    @property
    def incomplete_dir(self) -> Path:
        return self.base / "incomplete"

    @property
    def invalid_dir(self) -> Path:
        return self.base / "invalid"

    @property
    def queue_dir(self) -> Path:
        return self.base / "queue"

    @property
    def lock_dir(self) -> Path:
        return self.base / LOCK_DIR

    @property
    def reservation_dir(self) -> Path:
        return self.lock_dir / "reserved"

    def ensure_dirs(self) -> None:
        for sub in (*SUBDIRS, LOCK_DIR):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self.reservation_dir.mkdir(exist_ok=True)

    def validate(self, image_id: object) -> ImageId:
        """The gate: ``image_id`` as an ``ImageId`` if it is safe as a file name here.

        Else InvalidImageId, saying what is wrong. Edges (the HTTP routes, the
        CLI's local manager) call it once per caller's id; entry points of the
        library call ``accept``, which does not check an ``ImageId`` again
        (the remote client leaves it to the service it asks).
        """
        if not isinstance(image_id, str):
            raise InvalidImageId(image_id, "must be a string")
        if not image_id:
            raise InvalidImageId(image_id, "must not be empty")
        if len(image_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
            raise InvalidImageId(image_id, f"longer than {MAX_ID_BYTES} bytes")
        if _ID_RE.fullmatch(image_id) is None:
            raise InvalidImageId(
                image_id,
                "use letters, digits and . _ ~ - only, not starting with . ~ or -",
            )
        if image_id in SUBDIRS or image_id in self.reserved:
            raise InvalidImageId(image_id, "is a name the cache uses for itself")
        return ImageId(image_id)

    def accept(self, image_id: str) -> ImageId:
        """``image_id`` as an ``ImageId``: as is if it already is one, else through the gate."""
        if type(image_id) is ImageId:
            return image_id
        return self.validate(image_id)

    def valid(self, name: str) -> ImageId | None:
        """``name`` as an ``ImageId`` if it is one (a file name found on disk), else None."""
        try:
            return self.validate(name)
        except InvalidImageId:
            return None

    def is_valid(self, image_id: str) -> bool:
        try:
            self.validate(image_id)
        except InvalidImageId:
            return False
        return True

    # The path methods take an ``ImageId`` (mypy keeps a raw str out); at run
    # time a plain str from a caller without types still goes through the gate.

    def active_path(self, image_id: ImageId) -> Path:
        return self.base / self.accept(image_id)

    def open_committed(self, image_id: ImageId) -> BinaryIO | None:
        """Open the committed file of ``image_id`` for reading; None when there is none.

        Never follows a symlink (``O_NOFOLLOW``) and accepts only a regular
        file (``fstat``): an entry planted in the cache directory, such as a
        link to ``/etc/passwd`` or to another image, would otherwise be served
        as this image. Such an entry is quarantined, moved (the link itself,
        not its target) to ``invalid/`` where ``clean`` removes it, and the
        image counts as not cached, so the next fill puts a real file there.
        """
        path = self.active_path(image_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:  # ELOOP: the name is a symlink
                raise
            self._quarantine(path, image_id, "a symlink")
            return None
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            if regular:
                # O_NONBLOCK was only there so that opening a planted FIFO cannot hang.
                os.set_blocking(fd, True)
                return open(fd, "rb", closefd=True)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        self._quarantine(path, image_id, "not a regular file")
        return None

    def _quarantine(self, path: Path, image_id: ImageId, what: str) -> None:
        log.warning("cache entry %s is %s, never served: moved to %s", path, what, self.invalid_dir)
        rename_if_exists(path, self.invalid_path(image_id))

    def incomplete_path(self, image_id: ImageId) -> Path:
        return self.incomplete_dir / self.accept(image_id)

    def invalid_path(self, image_id: ImageId) -> Path:
        return self.invalid_dir / self.accept(image_id)

    def queue_path(self, image_id: ImageId) -> Path:
        return self.queue_dir / self.accept(image_id)

    def lock_path(self, name: str) -> Path:
        """A lock file for a named cache-wide operation (prune, clean, ...)."""
        return self.lock_dir / name

    def iter_images(self, directory: Path | None = None) -> Iterator[os.DirEntry[str]]:
        """Regular files in ``directory`` (default: committed images) that are image ids.

        Anything else found there (the database, hidden files, stray names) is
        not an image and is never listed, counted or deleted as one.
        """
        target = self.base if directory is None else directory
        try:
            entries = os.scandir(target)
        except FileNotFoundError:
            return
        with entries:
            for entry in entries:
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                except OSError:
                    continue
                if self.is_valid(entry.name):
                    yield entry


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_probe(directory: Path) -> OSError | None:
    """Create, write and remove a small hidden file in ``directory``: the error it met, or None.

    Asking the filesystem by writing: an ext4 turned read-only by an error
    (errors=remount-ro) still shows ``rw`` in its mount flags and statvfs.
    """
    probe = directory / f".write-probe.{os.getpid()}.{threading.get_native_id()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"probe\n")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(probe)
        return exc
    return None


def explain_store_failure(layout: CacheLayout, exc: OSError | CacheStoreError) -> CacheStoreError:
    """A failure of the cache's disk, said in words an operator can act on.

    Without this a management call on a disk remounted read-only was a bare
    500 "Internal Server Error" (an OSError) or a sqlite message ("attempt to
    write a readonly database"). The filesystem itself is asked what is wrong.
    """
    base = layout.base
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
    # The error itself may not say (sqlite reports "disk I/O error"); a write does.
    probe = write_probe(layout.lock_dir)
    errors = {getattr(exc, "errno", None), probe.errno if probe is not None else None}
    if errno.EROFS in errors:
        return CacheUnavailable(
            f"the cache directory {base} is on a read-only file system: {detail}{where}"
        )
    if errors & {errno.ENOSPC, errno.EDQUOT}:
        return CacheUnavailable(f"the cache directory {base} is full: {detail}{where}")
    if isinstance(exc, CacheStoreError):
        return exc
    return CacheStoreError(f"the cache directory {base} failed: {detail}{where}")


def unlink_if_exists(path: Path) -> bool:
    """Remove ``path``; a file that vanished meanwhile is not an error. True if removed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def rename_if_exists(src: Path, dst: Path) -> bool:
    """Rename ``src`` over ``dst``; False if ``src`` was already gone."""
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        return False
    return True


def file_size(path: Path) -> int | None:
    """Size of ``path`` in bytes, or None if it does not exist."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def open_dir_fd(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)
