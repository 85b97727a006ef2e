"""One metadata read per image: the origin's answer about an image, shared and remembered.

Every miss needs the origin's ``info`` (size, checksums, status) before it
joins a fill. Asked once per request, a herd of 32 clients in front of an
http origin with sidecars cost it 32 ``HEAD``s and 96 sidecar GETs besides
the one body read. ``MetadataCache.info`` asks once per image instead:

- in one process, the first request starts the lookup and every request for
  the same image meanwhile awaits that same lookup (one task per image);
- across the worker processes of one cache, the lookup runs under an
  ``flock`` on ``<cache>/.locks/metadata/<image_id>``: the first process
  writes the answer into that file, the others wait for the lock and read it;
- the answer is then remembered for ``metadata_cache_ttl`` seconds (in memory
  and in the file). Refusals (not found, forbidden, not active) are
  remembered for at most ``NEGATIVE_TTL`` of it: a herd for a missing image
  lasts milliseconds, so a short memory already collapses it, while an image
  uploaded or activated just after a refusal should not stay refused for the
  full TTL. Errors (the origin unreachable, a 5xx) are shared only by the
  requests of the one lookup that met them, never remembered.

Who asks matters for a Glance origin (``Upstream.caller_dependent``): a
private image is 404 to other projects. Keying everything by (caller, image)
would be safe but would share nothing in a real boot storm, where every
compute node presents a token of its own. So the answer is split instead:
what describes the image's data (an answer carrying an ``ImageInfo``: its size
and checksums are the same for everyone allowed to see it) is shared, while a
refusal or an error belongs to the caller it was given to; another caller
who met one in a shared lookup asks the origin itself. A shared answer never
authorises anybody: the service still asks the origin's access check for
every caller (``server/auth.py``'s ``AccessCache``, ``auth_cache_ttl``), on a
miss after ``info`` as before, and Glance refuses a caller who may not see
the image there (404) just as its metadata GET did. Only shared answers are
written to the cross-process file, so it never holds anything of a caller.

Hits need no metadata for origins without callers, and none is asked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from imagecache.errors import UpstreamForbidden, UpstreamNotActive, UpstreamNotFound
from imagecache.layout import ImageId
from imagecache.records import ImageInfo
from imagecache.upstreams.base import ANONYMOUS, Caller, Upstream

log = logging.getLogger(__name__)

T = TypeVar("T")

# The longest a refusal is remembered (see the module docstring).
NEGATIVE_TTL = 2.0
# Answer files not rewritten for this long are removed by ``sweep_answers``.
SWEEP_AGE = 3600.0
# How often a process waiting for another process's lookup looks at its lock:
# starting small, so a follower in a sibling worker hears the answer within a
# few ms of it being written, and growing so a slow origin costs few wake-ups.
_POLL_FIRST = 0.002
_POLL_MAX = 0.02
# Subdirectory of the cache's lock directory that holds the answer files.
SUBDIR = "metadata"


class Outcome(enum.Enum):
    """What the origin said about an image."""

    FOUND = "found"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    NOT_ACTIVE = "not_active"


@dataclass(frozen=True, slots=True)
class Answer:
    """The origin's answer about one image: its info, or the refusal to raise again.

    ``info`` is set for ``FOUND`` and for a ``NOT_ACTIVE`` image that still has
    data (Glance's ``deactivated``). ``status`` is the image's status for
    ``NOT_ACTIVE``, ``http_status`` the origin's for ``FORBIDDEN``.
    """

    image_id: str
    outcome: Outcome
    info: ImageInfo | None = None
    status: str = ""
    http_status: int = 403

    @classmethod
    def found(cls, info: ImageInfo) -> Answer:
        return cls(info.image_id, Outcome.FOUND, info)

    @classmethod
    def refusal(cls, exc: UpstreamNotFound | UpstreamForbidden | UpstreamNotActive) -> Answer:
        if isinstance(exc, UpstreamNotFound):
            return cls(exc.image_id, Outcome.NOT_FOUND)
        if isinstance(exc, UpstreamForbidden):
            return cls(exc.image_id, Outcome.FORBIDDEN, http_status=exc.status)
        return cls(exc.image_id, Outcome.NOT_ACTIVE, exc.info, status=exc.status)

    def result(self) -> ImageInfo:
        """The info, or a new exception of the refusal (one per caller: tracebacks stay its own)."""
        if self.outcome is Outcome.FOUND:
            assert self.info is not None
            return self.info
        if self.outcome is Outcome.NOT_FOUND:
            raise UpstreamNotFound(self.image_id)
        if self.outcome is Outcome.FORBIDDEN:
            raise UpstreamForbidden(self.image_id, self.http_status)
        raise UpstreamNotActive(self.image_id, self.status, self.info)

    def shareable(self, caller_dependent: bool) -> bool:
        """Whether every caller may be given this answer (see the module docstring)."""
        return not caller_dependent or self.info is not None

    def lifetime(self, ttl: float) -> float:
        return ttl if self.outcome is Outcome.FOUND else min(ttl, NEGATIVE_TTL)

    def to_json(self, written: float) -> bytes:
        info = self.info
        return json.dumps(
            {
                "written": written,
                "image_id": self.image_id,
                "outcome": self.outcome.value,
                "status": self.status,
                "http_status": self.http_status,
                "info": None
                if info is None
                else {
                    "size": info.size,
                    "checksum": info.checksum,
                    "hash_algo": info.hash_algo,
                    "hash_value": info.hash_value,
                    "status": info.status,
                },
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, image_id: str) -> tuple[float, Answer] | None:
        """``(written, answer)`` from a file's bytes; None if they are not one (empty, torn)."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("image_id") != image_id:
                return None
            raw = doc.get("info")
            info = None
            if isinstance(raw, dict):
                info = ImageInfo(
                    image_id=image_id,
                    size=_optional(raw.get("size"), int),
                    checksum=_optional(raw.get("checksum"), str),
                    hash_algo=_optional(raw.get("hash_algo"), str),
                    hash_value=_optional(raw.get("hash_value"), str),
                    status=str(raw.get("status", "active")),
                )
            outcome = Outcome(doc["outcome"])
            if outcome is Outcome.FOUND and info is None:
                return None
            answer = cls(
                image_id,
                outcome,
                info,
                status=str(doc.get("status", "")),
                http_status=int(doc.get("http_status", 403)),
            )
            return float(doc["written"]), answer
        except (ValueError, KeyError, TypeError):
            return None


def _optional(value: object, kind: Callable[[Any], T]) -> T | None:
    return None if value is None else kind(value)


@dataclass(frozen=True, slots=True)
class _Lookup:
    """What one lookup came to, and for whom: an answer, or the error it met."""

    asker: str
    answer: Answer | None = None
    error: Exception | None = None


class MetadataCache:
    """The origin's ``info``, one lookup per image at a time, remembered for ``ttl`` seconds.

    ``lock_dir``: the cache's lock directory, for sharing lookups with the
    other processes of the cache (None: this process alone). ``caller_dependent``:
    the origin's answers depend on who asks (Glance). ``wait_limit``: the
    longest a process waits for another process's lookup before asking the
    origin itself. ``executor`` runs the file work (None: asyncio's default).
    ``clock`` ages the answers in memory, ``wall_clock`` the ones shared on
    disk (other processes read those): injectable, so a test moves time
    instead of sleeping a TTL out. They may be replaced after construction.
    """

    def __init__(
        self,
        upstream: Upstream,
        ttl: float,
        lock_dir: Path | None,
        *,
        caller_dependent: bool,
        wait_limit: float,
        max_entries: int = 10_000,
        executor: concurrent.futures.Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.upstream = upstream
        self.ttl = ttl
        self.dir = None if lock_dir is None else lock_dir / SUBDIR
        self.caller_dependent = caller_dependent
        self.wait_limit = wait_limit
        self.max_entries = max_entries
        self.executor = executor
        self.clock = clock
        self.wall_clock = wall_clock
        # Answers for everyone, by image; and (caller-dependent origins only)
        # answers for one caller, by (caller key, image). Values: (expiry on
        # the monotonic clock, answer).
        self._shared: dict[str, tuple[float, Answer]] = {}
        self._own: dict[tuple[str, str], tuple[float, Answer]] = {}
        # The inode of the shared file each shared answer was read from or
        # written to: a process that forgets an answer (a fill refused or
        # failed verification against it) unlinks that file, and the other
        # processes must stop using their copy in memory too.
        self._shared_file: dict[str, int] = {}
        # Lookups running: (image, None) for everyone's, (image, caller key) for one caller's.
        self._flights: dict[tuple[str, str | None], asyncio.Task[_Lookup]] = {}
        # Counted for the tests and the metrics: lookups that reached the origin.
        self.origin_reads = 0

    async def info(self, image_id: ImageId, caller: Caller = ANONYMOUS) -> ImageInfo:
        """What the origin promises about the image; raises as ``Upstream.info`` does."""
        if self.ttl <= 0:
            self.origin_reads += 1
            return await self.upstream.info(image_id, caller)
        asker = caller.cache_key()
        remembered = self._remembered(image_id, asker)
        if remembered is not None and not await self._forgotten_elsewhere(image_id):
            return remembered.result()
        lookup = await self._join((image_id, None), lambda: self._lookup(image_id, caller))
        if not self._applies(lookup, asker):
            # Another caller's refusal or error, from an origin where who asks
            # matters: this caller asks for itself, in a lookup shared only
            # with requests of the same caller. Not in a new lookup for all:
            # behind an origin that times out, a herd of different callers
            # would then wait out one timeout per caller in turn.
            lookup = await self._join((image_id, asker), lambda: self._alone(image_id, caller))
        if lookup.error is not None:
            raise lookup.error
        assert lookup.answer is not None
        return lookup.answer.result()

    async def _join(
        self, key: tuple[str, str | None], start: Callable[[], Coroutine[Any, Any, _Lookup]]
    ) -> _Lookup:
        """The result of the lookup under ``key``, started now if none is running."""
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.create_task(start(), name=f"info {key[0]}")
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        # Shielded: a client that leaves must not cancel the lookup the others await.
        return await asyncio.shield(flight)

    def _landed(self, key: tuple[str, str | None], done: asyncio.Task[_Lookup]) -> None:
        if self._flights.get(key) is done:
            del self._flights[key]

    async def _alone(self, image_id: ImageId, caller: Caller) -> _Lookup:
        return _as_lookup(caller.cache_key(), await self._ask(image_id, caller))

    def _applies(self, lookup: _Lookup, asker: str) -> bool:
        if not self.caller_dependent or lookup.asker == asker:
            return True
        return lookup.answer is not None and lookup.answer.shareable(True)

    async def forget(self, image_id: ImageId) -> None:
        """Drop what is remembered of ``image_id`` here and for the other processes."""
        self._shared.pop(image_id, None)
        self._shared_file.pop(image_id, None)
        for key in [key for key in self._own if key[1] == image_id]:
            del self._own[key]
        if self.dir is not None:
            try:
                await self._run(os.unlink, self.dir / image_id)
            except FileNotFoundError:
                pass
            except OSError as exc:  # the other processes' memory ends with the TTL anyway
                log.warning("cannot drop the shared metadata of %s: %s", image_id, exc)

    async def _forgotten_elsewhere(self, image_id: ImageId) -> bool:
        """Whether another process forgot the shared answer this one remembers (then dropped).

        One ``stat`` in the executor per use of a remembered shared answer, that
        is per miss: without it, a worker went on filling against the old
        version's promises for the rest of the TTL after another worker's fill
        met a new version (tests/wan/test_wan_fills.py), failing every such fill.
        """
        inode = self._shared_file.get(image_id)
        if inode is None or self.dir is None:
            return False
        try:
            gone = (await self._run(os.stat, self.dir / image_id)).st_ino != inode
        except FileNotFoundError:
            gone = True
        except OSError:
            return False  # the lock directory's trouble: the TTL still bounds the memory
        if gone:
            self._shared.pop(image_id, None)
            self._shared_file.pop(image_id, None)
        return gone

    # --- memory ----------------------------------------------------------------------------------

    def _remembered(self, image_id: ImageId, asker: str) -> Answer | None:
        now = self.clock()
        shared = self._shared.get(image_id)
        if shared is not None and shared[0] > now:
            return shared[1]
        if self.caller_dependent:
            own = self._own.get((asker, image_id))
            if own is not None and own[0] > now:
                return own[1]
        return None

    def _remember(self, answer: Answer, asker: str, lifetime: float) -> None:
        if lifetime <= 0:
            return
        expiry = self.clock() + lifetime
        if answer.shareable(self.caller_dependent):
            _bounded_put(self._shared, answer.image_id, (expiry, answer), self.max_entries)
        else:
            key = (asker, answer.image_id)
            _bounded_put(self._own, key, (expiry, answer), self.max_entries)

    # --- asking ----------------------------------------------------------------------------------

    async def _ask(self, image_id: ImageId, caller: Caller) -> Answer | Exception:
        """Ask the origin; a refusal comes back as an ``Answer``, remembered; an error as itself."""
        self.origin_reads += 1
        try:
            answer = Answer.found(await self.upstream.info(image_id, caller))
        except (UpstreamNotFound, UpstreamForbidden, UpstreamNotActive) as exc:
            answer = Answer.refusal(exc)
        except Exception as exc:  # handed to every request of this lookup, then forgotten
            return exc
        self._remember(answer, caller.cache_key(), answer.lifetime(self.ttl))
        return answer

    async def _lookup(self, image_id: ImageId, caller: Caller) -> _Lookup:
        """The one lookup of ``image_id`` in this process, shared with the others if we can."""
        asker = caller.cache_key()
        fd = None
        if self.dir is not None:
            try:
                fd = await self._run(self._open, self.dir, image_id)
            except OSError as exc:
                # The lock directory is the cache's own disk: a failure there
                # costs sharing with the other processes, not the request.
                log.warning("cannot share the metadata lookup of %s: %s", image_id, exc)
        if fd is None:
            return _as_lookup(asker, await self._ask(image_id, caller))
        try:
            if await self._locked(fd):
                found = await self._run(_read, fd, image_id)
                if found is not None:
                    written, answer = found
                    age = self.wall_clock() - written
                    left = answer.lifetime(self.ttl) - age
                    # A clock stepped back makes an answer look written in the
                    # future: not trusted, asked again. Only shareable answers
                    # are written, but the file may be from another upstream
                    # setting of the same cache: checked again.
                    if age >= 0 and left > 0 and answer.shareable(self.caller_dependent):
                        self._remember(answer, asker, left)
                        self._note_file(image_id, fd)
                        return _Lookup(asker, answer)
            result = await self._ask(image_id, caller)
            if isinstance(result, Answer) and result.shareable(self.caller_dependent):
                try:
                    await self._run(_write, fd, result.to_json(self.wall_clock()))
                    self._note_file(image_id, fd)
                except OSError as exc:
                    log.warning("cannot share the metadata of %s: %s", image_id, exc)
            return _as_lookup(asker, result)
        finally:
            os.close(fd)  # releases the lock: the next process reads what we wrote

    def _note_file(self, image_id: ImageId, fd: int) -> None:
        # fstat of an open descriptor never waits on the disk.
        _bounded_put(self._shared_file, image_id, os.fstat(fd).st_ino, self.max_entries)

    async def _locked(self, fd: int) -> bool:
        """Take the file's lock, waiting at most ``wait_limit``; False if it stayed taken.

        A non-blocking ``flock`` polled on the loop: it never touches the disk,
        and unlike a blocking one in a thread it can be given up on.
        """
        # A real wait on another process's lock: the real clock, not ``self.clock``.
        deadline = time.monotonic() + self.wait_limit
        pause = _POLL_FIRST
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    log.warning(
                        "another process's metadata lookup held its lock for over %.0fs;"
                        " asking the origin without it",
                        self.wait_limit,
                    )
                    return False
            await asyncio.sleep(pause)  # the holder may be another process: no event to wait on
            pause = min(pause * 2, _POLL_MAX)

    def _run(self, func: Callable[..., T], *args: object) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self.executor, func, *args)

    @staticmethod
    def _open(directory: Path, image_id: ImageId) -> int:
        path = directory / image_id
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            return os.open(path, flags, 0o600)
        except FileNotFoundError:
            directory.mkdir(parents=True, exist_ok=True)
            return os.open(path, flags, 0o600)


def _as_lookup(asker: str, result: Answer | Exception) -> _Lookup:
    if isinstance(result, Exception):
        return _Lookup(asker, error=result)
    return _Lookup(asker, answer=result)


def _read(fd: int, image_id: str) -> tuple[float, Answer] | None:
    data = os.pread(fd, 64 * 1024, 0)
    return Answer.from_json(data, image_id) if data else None


def _write(fd: int, data: bytes) -> None:
    # In place under the lock, not by rename: the lock lives on this inode.
    # No fsync: after a crash the answer is simply asked again.
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _bounded_put(table: dict[Any, Any], key: Any, value: Any, max_entries: int) -> None:
    if key not in table and len(table) >= max_entries:
        for old in list(table)[: max(1, max_entries // 2)]:
            del table[old]
    table[key] = value


def sweep_answers(lock_dir: Path, older_than: float = SWEEP_AGE) -> int:
    """Remove answer files not rewritten for ``older_than`` seconds; how many went.

    One small file per image ever looked up would otherwise pile up. Removing
    one that another process has just opened costs at most one extra lookup
    (two processes then lock different files): the lock only saves origin
    reads, it guards no state.
    """
    directory = lock_dir / SUBDIR
    cutoff = time.time() - older_than
    removed = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in list(entries):
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
    return removed


__all__ = ["NEGATIVE_TTL", "Answer", "MetadataCache", "Outcome", "sweep_answers"]


def metadata_for(
    layout_lock_dir: Path,
    upstream: Upstream,
    ttl: float,
    upstream_timeout: float,
    executor: concurrent.futures.Executor | None = None,
) -> MetadataCache:
    """The ``MetadataCache`` of one cache directory, built the same way by the service and CLI.

    The wait for another process's lookup is bounded by what that lookup may
    take: an http origin's info is a HEAD, then sidecars, two timeouts at most.
    """
    return MetadataCache(
        upstream,
        ttl,
        layout_lock_dir,
        caller_dependent=upstream.caller_dependent,
        wait_limit=2 * upstream_timeout + 1,
        executor=executor,
    )
