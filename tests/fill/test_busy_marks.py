"""The busy marks of worker processes (fill/busy.py): real files and ``flock`` locks.

Two ``BusyMarks`` over one directory stand for two processes: each mark is
locked through its own open file description, which is what ``flock``
tells apart, so the kernel sees them exactly as it sees two processes.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from imagecache.fill.busy import LOOK_INTERVAL, BusyMarks


def test_a_busy_process_is_seen_by_the_others_and_not_by_itself(tmp_path: Path) -> None:
    one, two = BusyMarks(tmp_path), BusyMarks(tmp_path)
    now = 100.0
    assert not two.others_busy(now)
    one.sync(lambda: True)
    assert one.marked
    assert not one.others_busy(now)  # its own mark is not another process
    assert not two.others_busy(now + LOOK_INTERVAL / 2)  # the last look still holds ...
    now += 2 * LOOK_INTERVAL
    assert two.others_busy(now)  # ... until it looks again
    one.sync(lambda: False)
    assert not one.marked
    assert two.others_busy(now + LOOK_INTERVAL / 2)
    assert not two.others_busy(now + 2 * LOOK_INTERVAL)
    assert [n for n in os.listdir(tmp_path) if not n.startswith(".")] == []


def test_a_mark_left_by_a_dead_process_is_not_busy_and_is_removed(tmp_path: Path) -> None:
    dead = tmp_path / "4242.deadbeef.1"
    dead.write_bytes(b"")  # visible and unlocked: its process died while busy
    assert not BusyMarks(tmp_path).others_busy(0.0)
    assert not dead.exists()


def test_a_visible_mark_is_always_locked(tmp_path: Path) -> None:
    marks = BusyMarks(tmp_path)
    marks.sync(lambda: True)
    [name] = os.listdir(tmp_path)
    fd = os.open(tmp_path / name, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            raise AssertionError("the mark is visible but not locked")
    finally:
        os.close(fd)
    marks.sync(lambda: True)  # idempotent: still one mark
    assert len(os.listdir(tmp_path)) == 1
    marks.sync(lambda: False)
    assert os.listdir(tmp_path) == []


def test_no_directory_means_nobody_else_is_busy(tmp_path: Path) -> None:
    assert not BusyMarks(tmp_path / "absent").others_busy(0.0)
