"""The miss path, with no HTTP in it: one home for every fill of the cache.

Every front end fills through here: the service's downloads (server/images.py),
its queue worker, the CLI's ``prefetch`` (which builds a coordinator of its
own over the same directory) and, for the synchronous library API, the tee in
cache.py over the same writer.

- ``locks``: the one ``flock`` probe (is a writer still at it?).
- ``hashing``: the hash thread, its priority, the one "strongest known hash" picker.
- ``writer``: ``FillWriter`` (hash, write, verify, commit) and ``Verifier`` (hash only).
- ``flight``: one image's fill as its readers see it (progress, spans, outcome).
- ``events``: the sink a fill reports to (the service's metrics implement it).
- ``coordinator``: single flight across coroutines and processes.
- ``pump``: moving the origin's bytes into the writer (a stream, or a thread).
- ``remote``: another process's fill, followed through its file and lock.
- ``follow``: what a follower of a flight may send (spans or bytes, then how it
  ended), and the rest from the origin when the fill dies.
- ``bandwidth``: the background fills' token bucket, at the idle or busy rate.
- ``busy``: which processes have clients waiting (a locked mark each); the governor's glue.
- ``frontier``: a range past what a fill has written: wait for the fill, or not (its rate).
- ``hooks``: named points where tests hold or watch a fill (no-ops otherwise).
- ``config``: ``FillConfig``, the values the family reads; ``fill_config`` below
  copies them out of ``Settings`` (the package's one reader of the settings).

This package must not import ``imagecache.server`` nor aiohttp's server: the
layers above it pass in what it needs. The package imports nothing at its
top, so ``drivers`` may use ``fill.locks`` without a cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagecache.fill.config import FillConfig
    from imagecache.settings import Settings


def fill_config(settings: Settings) -> FillConfig:
    """The values of ``settings`` that fills read."""
    from imagecache.fill.config import FillConfig  # here: the package imports nothing at its top

    return FillConfig(
        upstream_timeout=settings.upstream_timeout,
        abandoned_fill=settings.abandoned_fill,
        fill_segments=settings.fill_segments,
        fill_segment_size=settings.fill_segment_size,
        workers=settings.workers,
        background_bandwidth=settings.background_bandwidth,
        background_bandwidth_while_busy=settings.background_bandwidth_while_busy,
    )


__all__ = ["fill_config"]
