"""Writers killed with SIGKILL at each step of a commit (crash states in drivers/files.py).

The writer is a real child process running the real driver; it kills itself at
the chosen point, so no cleanup code of ours runs, exactly as in a crash.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from driver_kinds import settings_for
from imagecache import ImageCache, ImageInfo

DATA = bytes(range(256)) * 4096  # 1 MiB
PART = len(DATA) // 3

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    sys.path.insert(0, sys.argv[1])
    from driver_kinds import settings_for
    from imagecache import ImageCache, ImageInfo
    from imagecache.drivers.hooks import CommitHooks

    kind, cache_dir, tmp_path, mode = sys.argv[2:6]
    data = bytes(range(256)) * 4096
    cache = ImageCache(settings_for(kind, Path(cache_dir), Path(tmp_path)))
    driver = cache.driver

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "before-rename":
        with driver.open_for_write("img") as target:
            target.write(data[: len(data) // 3])
            os.fsync(target.fileno())
            die()  # holding the fill lock, with a third of the image written
    elif mode == "after-rename":
        # The rename and directory fsync have happened; the metadata write is
        # the next step, and the process dies instead.
        class Die(CommitHooks):
            def renamed(self, image_id):
                die()

        driver.commit_hooks = Die()
        cache.cache_image_iter("img", [data], ImageInfo("img", size=len(data)))
    raise SystemExit("the child should have been killed")
    """
)


def run_and_kill(kind: str, cache_dir: Path, tmp_path: Path, mode: str) -> None:
    tests_dir = str(Path(__file__).parent)
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, tests_dir, kind, str(cache_dir), str(tmp_path), mode],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()


@pytest.fixture
def settings_args(driver_kind: str, cache_dir: Path, tmp_path: Path) -> tuple[str, Path, Path]:
    settings_for(driver_kind, cache_dir, tmp_path)  # skips here if the kind cannot run
    return driver_kind, cache_dir, tmp_path


def test_writer_killed_before_rename_leaves_nothing_visible(
    settings_args: tuple[str, Path, Path],
) -> None:
    kind, cache_dir, tmp_path = settings_args
    run_and_kill(kind, cache_dir, tmp_path, "before-rename")

    assert not (cache_dir / "img").exists(), "a half-written image is visible"
    assert (cache_dir / "incomplete" / "img").stat().st_size == PART
    with ImageCache(settings_for(kind, cache_dir, tmp_path)) as cache:
        assert not cache.is_cached("img")
        assert cache.is_being_cached("img")
        assert cache.get_cached_images() == []
        assert cache.get_cache_size() == 0
        # The dead writer's lock died with it: the next fill takes its file over.
        info = ImageInfo("img", size=len(DATA), checksum=hashlib.md5(DATA).hexdigest())
        assert cache.cache_image_iter("img", [DATA[:1000], DATA[1000:]], info)
        with cache.open_for_read("img") as handle:
            assert handle.read() == DATA
        assert not (cache_dir / "incomplete" / "img").exists()


def test_dead_writers_fill_is_cleaned_even_when_fresh(
    settings_args: tuple[str, Path, Path],
) -> None:
    kind, cache_dir, tmp_path = settings_args
    run_and_kill(kind, cache_dir, tmp_path, "before-rename")
    with ImageCache(settings_for(kind, cache_dir, tmp_path)) as cache:
        assert cache.clean().stalled == 0, "fresh: not stalled by the default stall time"
        assert cache.clean(stall_time=0).stalled == 1
        assert cache.is_cacheable("img")
        assert cache.cache_image_iter("img", [DATA])


def test_writer_killed_after_rename_before_metadata_is_consistent(
    settings_args: tuple[str, Path, Path],
) -> None:
    kind, cache_dir, tmp_path = settings_args
    run_and_kill(kind, cache_dir, tmp_path, "after-rename")

    assert (cache_dir / "img").read_bytes() == DATA, "only verified, complete files are renamed"
    assert not (cache_dir / "incomplete" / "img").exists()
    # A restart: the listing, the size and is_cached all tell the same story.
    with ImageCache(settings_for(kind, cache_dir, tmp_path)) as cache:
        assert cache.is_cached("img")
        listed = cache.get_cached_images()
        assert [(image.image_id, image.size, image.hits) for image in listed] == [
            ("img", len(DATA), 0)
        ]
        assert cache.get_cache_size() == len(DATA)
        assert cache.driver.get_least_recently_accessed() == ("img", len(DATA))
        with cache.open_for_read("img") as handle:
            assert handle.read() == DATA
        assert cache.get_hit_count("img") == 1
        assert cache.prune(max_size=0) == (1, len(DATA))
        assert not (cache_dir / "img").exists()


def test_a_row_whose_file_vanished_is_dropped_on_restart(
    settings_args: tuple[str, Path, Path],
) -> None:
    kind, cache_dir, tmp_path = settings_args
    settings = settings_for(kind, cache_dir, tmp_path)
    with ImageCache(settings) as cache:
        assert cache.cache_image_iter("img", [DATA])
        assert cache.cache_image_iter("other", [b"x" * 10])
    (cache_dir / "img").unlink()  # lost behind the cache's back (operator, fsck)
    with ImageCache(settings) as cache:
        assert not cache.is_cached("img")
        assert [image.image_id for image in cache.get_cached_images()] == ["other"]
        assert cache.get_cache_size() == 10
