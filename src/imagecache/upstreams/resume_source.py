"""Resuming a blocking image body (the fill pump's source) across broken or released connections.

The blocking twin of ``resume.resumable_stream``, with the same policy,
validator and checks (resume.py says why each): a break mid-body is asked
for again from the first byte not yet received. A paused background fill
may also close its connection on purpose (``ResumingSource.release``,
fill/pump.py says when); its next read reopens it the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

from imagecache.errors import ResumeRefused, UpstreamError
from imagecache.upstreams.base import BlockingSource
from imagecache.upstreams.resume import ResumePolicy, Validator, log_resume, retryable

# ``reopen(offset, validator)``: a resume for the fill pump, in its thread;
# returns the origin's status and headers and the body as a source.
SyncOpener = Callable[[int, Validator], tuple[int, Mapping[str, str], BlockingSource]]


class ResumingSource:
    """A ``BlockingSource`` that resumes its body across broken connections."""

    def __init__(
        self,
        image_id: str,
        policy: ResumePolicy,
        first: BlockingSource,
        validator: Validator,
        reopen: SyncOpener,
    ) -> None:
        self.image_id = image_id
        self._policy = policy
        self._source = first
        self._validator = validator
        self._reopen = reopen
        self._offset = 0  # the fill pump reads whole images
        self._attempt = 0
        self._stopped = threading.Event()
        # The connection was closed on purpose (``release``): the next read reopens it.
        self._released = False
        # Guards _source against interrupt() from another thread during a reopen.
        self._lock = threading.Lock()

    @classmethod
    def wrap(
        cls,
        image_id: str,
        policy: ResumePolicy,
        first: BlockingSource,
        status: int,
        headers: Mapping[str, str],
        reopen: SyncOpener,
    ) -> BlockingSource:
        """``first`` resuming across breaks, or ``first`` itself when it cannot be resumed."""
        if policy.attempts == 0:
            return first
        validator = Validator.of(image_id, status, headers, None)
        if validator is None:
            return first
        return cls(image_id, policy, first, validator, reopen)

    @property
    def received(self) -> int:
        return self._offset

    def readinto(self, buffer: memoryview, /) -> int:
        while True:
            try:
                if self._released:
                    self._reconnect()
                count = self._source.readinto(buffer)
            except UpstreamError as exc:
                self._resume(exc)
                continue
            self._offset += count
            return count

    def copy_into(self, fd: int, count: int, /) -> int | None:
        # A source that can copy in the kernel has nothing to resume (a local
        # file); an error here sends the fill to readinto, which resumes.
        return self._source.copy_into(fd, count)

    def release(self) -> bool:
        """Close the origin's connection now; the next read asks again from the first byte not read.

        For a paused background fill (fill/pump.py): an open connection that
        is not read still fills the TCP buffers along the path, sharing the
        link with the fills clients wait for. The reopen is a resume like
        any other (same Range, validator and checks), but not a failure: it
        uses up none of the attempts, and only a failure of the reopen does.
        False if there was nothing to close (already released, stopped, or
        every byte is here).
        """
        with self._lock:
            if self._released or self._stopped.is_set() or self._validator.done(self._offset):
                return False
            self._released = True
            self._source.close()
        return True

    def _reconnect(self) -> None:
        """Reopen at the first byte not read after ``release``; raise as a break would."""
        if self._stopped.is_set():
            raise UpstreamError(f"image {self.image_id!r}: the fill was stopped")
        try:
            source = self._reopen_checked(self._validator)
        except ResumeRefused:
            self._policy.events.resume_outcome("refused")
            raise
        self._adopt(source)

    def _adopt(self, source: BlockingSource) -> None:
        with self._lock:
            self._source = source
            self._released = False
            if self._stopped.is_set():
                source.close()
                raise UpstreamError(f"image {self.image_id!r}: the fill was stopped")

    def _resume(self, exc: UpstreamError) -> None:
        validator = self._validator
        if self._stopped.is_set() or not retryable(exc) or validator.done(self._offset):
            raise exc
        events = self._policy.events
        while self._attempt < self._policy.attempts:
            self._attempt += 1
            log_resume(self.image_id, self._offset, self._attempt, self._policy, exc)
            if self._stopped.wait(self._policy.delay(self._attempt)):
                raise exc
            self._source.close()
            try:
                source = self._reopen_checked(validator)
            except ResumeRefused:
                events.resume_outcome("refused")
                raise
            except UpstreamError as failed:
                if not retryable(failed):
                    raise
                exc = failed
                continue
            try:
                self._adopt(source)
            except UpstreamError:
                raise exc from None
            events.resume_outcome("resumed")
            return
        events.resume_outcome("exhausted")
        raise exc

    def _reopen_checked(self, validator: Validator) -> BlockingSource:
        """The resume's source, once its answer continues the same image; else raise."""
        status, headers, source = self._reopen(self._offset, validator)
        try:
            validator.check(status, headers, self._offset)
        except BaseException:
            source.close()
            raise
        return source

    def interrupt(self) -> None:
        with self._lock:
            self._stopped.set()
            self._source.interrupt()

    def close(self) -> None:
        self._source.close()
