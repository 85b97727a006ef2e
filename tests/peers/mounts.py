"""``small_tmpfs``, ``small_ext4``: real, tiny filesystems for disk-full and read-only faults.

A tmpfs of a few MiB fills up with real ``ENOSPC`` after a few writes, which
no fake file descriptor reproduces for every step of a fill (open,
reservation, write, rename, sqlite). A read-only filesystem under a running
service cannot be made with ``mount -o remount,ro``: the kernel refuses it
(EBUSY) while a file is open for writing, and the service holds ``cache.db``
open. What does happen to a live service is an ext4 error with
``errors=remount-ro``; ``small_ext4`` is a loop-mounted ext4 whose
``trigger_fs_error`` (sysfs) turns it read-only exactly that way, writers or
not. Mounting needs root (or CAP_SYS_ADMIN); without it the fixtures skip,
saying so.

API::

    path = small_tmpfs(size=4 * 1024 * 1024)   # a fresh tmpfs; unmounted at teardown
    fill_up(path)                              # a hidden file that takes every free byte
    path = small_ext4(size=16 * 1024 * 1024)   # a loop-mounted ext4, errors=remount-ro
    break_into_read_only(path)                 # an ext4 error: the kernel remounts it ro
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def break_into_read_only(path: Path) -> None:
    """Raise an ext4 error on the filesystem at ``path``; errors=remount-ro makes it read-only."""
    source = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", os.fspath(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path("/sys/fs/ext4", Path(source).name, "trigger_fs_error").write_text("imagecache test\n")


def fill_up(path: Path, name: str = ".ballast") -> Path:
    """Write a file into ``path`` until the filesystem refuses with ENOSPC.

    Hidden by default: a cache directory never takes a hidden name for an image.
    """
    ballast = path / name
    block = b"\0" * (64 * 1024)
    with open(ballast, "ab", buffering=0) as handle:
        while True:
            try:
                handle.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        # The last partial block: tmpfs hands out whole pages.
        with contextlib.suppress(OSError):
            while handle.write(b"\0" * 4096):
                pass
    return ballast


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount tmpfs filesystems of a given size under ``tmp_path``; unmount them afterwards."""
    mounted: list[Path] = []

    def mount(size: int = 4 * 1024 * 1024, name: str = "") -> Path:
        path = tmp_path / (name or f"tmpfs{len(mounted)}")
        path.mkdir()
        try:
            _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", os.fspath(path))
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            pytest.skip(f"SKIPPED LOUDLY: cannot mount a tmpfs here (needs root): {detail}")
        mounted.append(path)
        return path

    yield mount
    _unmount(mounted)


@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Loop-mount small ext4 filesystems (errors=remount-ro) under ``tmp_path``."""
    mounted: list[Path] = []

    def mount(size: int = 16 * 1024 * 1024, name: str = "") -> Path:
        path = tmp_path / (name or f"ext4-{len(mounted)}")
        image = tmp_path / f"{path.name}.img"
        path.mkdir()
        with open(image, "wb") as handle:
            handle.truncate(size)
        try:
            subprocess.run(
                ["mkfs.ext4", "-q", "-F", os.fspath(image)], check=True, capture_output=True
            )
            _mount("-o", "loop,errors=remount-ro", os.fspath(image), os.fspath(path))
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            pytest.skip(f"SKIPPED LOUDLY: cannot loop-mount an ext4 here (needs root): {detail}")
        mounted.append(path)
        return path

    yield mount
    _unmount(mounted)


def _unmount(mounted: list[Path]) -> None:
    for path in reversed(mounted):
        # lazy: a descriptor a failed test left open must not keep the mount behind.
        subprocess.run(["umount", "-l", os.fspath(path)], check=False, capture_output=True)
