"""How often a process looks at another process's fill (fill/remote.py)."""

from __future__ import annotations

from imagecache.fill.flight import REMOTE_POLL_INTERVAL
from imagecache.fill.remote import FIRST_BYTE_POLL, FIRST_BYTE_SPAN, next_poll


def test_a_fill_with_no_byte_yet_is_looked_at_often_then_at_the_usual_interval() -> None:
    # A herd's clients in this process wait for the first byte: look often.
    assert next_poll(0, 0.0) == FIRST_BYTE_POLL
    assert next_poll(0, FIRST_BYTE_SPAN / 2) == FIRST_BYTE_POLL
    assert FIRST_BYTE_POLL * 5 <= REMOTE_POLL_INTERVAL
    # Bytes flowing: fewer, larger sends per look.
    assert next_poll(1, 0.0) == REMOTE_POLL_INTERVAL
    # An origin slow to its first byte is not polled fast for seconds.
    assert next_poll(0, FIRST_BYTE_SPAN) == REMOTE_POLL_INTERVAL
