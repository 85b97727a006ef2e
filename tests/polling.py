"""Waiting for a condition with a deadline: the one way a test waits for what it cannot join.

A test that cannot await the event itself (a line in a log, a thread
reaching a point, a counter in another process) polls for it here, so that
the wait is bounded and a failure says what never happened, rather than
sleeping for a guessed time. ``eventually`` is for coroutines (its condition
may be plain or async); ``eventually_sync`` for plain tests and threads.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


def _timed_out(what: str, within: float, detail: Callable[[], object] | None) -> AssertionError:
    message = f"timed out after {within:g} s waiting until {what}"
    if detail is not None:
        message += f"\n{detail()}"
    return AssertionError(message)


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]],
    what: str,
    *,
    within: float = 10.0,
    interval: float = 0.01,
    detail: Callable[[], object] | None = None,
) -> None:
    """Return once ``condition()`` holds; fail naming ``what`` after ``within`` seconds.

    ``condition`` is checked once more after the deadline, so a slow machine
    that reaches it while sleeping still passes. ``detail`` (a log, the
    messages caught) is added to the failure to say where things stood.
    """
    deadline = time.monotonic() + within
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() >= deadline:
            raise _timed_out(what, within, detail)
        await asyncio.sleep(interval)


def eventually_sync(
    condition: Callable[[], bool],
    what: str,
    *,
    within: float = 10.0,
    interval: float = 0.02,
    detail: Callable[[], object] | None = None,
) -> None:
    """``eventually`` for a test without an event loop: sleeps the thread between checks."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() >= deadline:
            raise _timed_out(what, within, detail)
        time.sleep(interval)
