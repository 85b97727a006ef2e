"""A Hypothesis state machine over the cache: random sequences of operations, one model.

Each driver kind runs the same machine on a fresh real cache directory per
example; after every step the cache must agree with a plain-Python model.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import hypothesis
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from driver_kinds import settings_for
from imagecache import ImageCache, ImageInfo, ImageNotCached, QueueResult, VerificationError

IDS = st.sampled_from(["a", "b", "c", "d", "e"])
DATA = st.binary(min_size=0, max_size=64)


def split(data: bytes, cut: int) -> list[bytes]:
    cut = min(cut, len(data))
    return [data[:cut], data[cut:]]


def machine_for(kind: str, scratch: Path) -> type[RuleBasedStateMachine]:
    class CacheMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.root = Path(tempfile.mkdtemp(dir=scratch))
            self.cache_dir = self.root / "cache"
            self.cache_dir.mkdir()
            self.cache = ImageCache(settings_for(kind, self.cache_dir, self.root))
            self.images: dict[str, bytes] = {}
            self.hits: dict[str, int] = {}
            self.queue: list[str] = []

        def teardown(self) -> None:
            self.cache.close()
            shutil.rmtree(self.root, ignore_errors=True)

        # --- rules ---------------------------------------------------------------------

        @rule(image_id=IDS, data=DATA, cut=st.integers(0, 64), with_hash=st.booleans())
        def cache_image(self, image_id: str, data: bytes, cut: int, with_hash: bool) -> None:
            digest = hashlib.sha512(data).hexdigest() if with_hash else None
            info = ImageInfo(image_id, size=len(data), hash_algo="sha512", hash_value=digest)
            cached = self.cache.cache_image_iter(image_id, split(data, cut), info)
            assert cached == (image_id not in self.images)
            if cached:
                self.images[image_id] = data
                self.hits[image_id] = 0
                if image_id in self.queue:
                    self.queue.remove(image_id)

        @rule(image_id=IDS, data=DATA)
        def cache_with_a_wrong_hash(self, image_id: str, data: bytes) -> None:
            info = ImageInfo(image_id, checksum=hashlib.md5(data + b"!").hexdigest())
            with pytest.raises(VerificationError):
                for _ in self.cache.get_caching_iter(image_id, [data], info):
                    pass

        @rule(image_id=IDS)
        def read(self, image_id: str) -> None:
            if image_id not in self.images:
                with pytest.raises(ImageNotCached), self.cache.open_for_read(image_id):
                    pass
                return
            with self.cache.open_for_read(image_id) as handle:
                assert handle.read() == self.images[image_id]
            self.hits[image_id] += 1

        @rule(image_id=IDS)
        def delete(self, image_id: str) -> None:
            assert self.cache.delete_cached_image(image_id) == (image_id in self.images)
            self.images.pop(image_id, None)
            self.hits.pop(image_id, None)

        @rule(image_id=IDS)
        def queue_image(self, image_id: str) -> None:
            result = self.cache.queue_image(image_id)
            if image_id in self.images:
                assert result is QueueResult.ALREADY_CACHED
            elif image_id in self.queue:
                assert result is QueueResult.ALREADY_QUEUED
            else:
                assert result is QueueResult.QUEUED
                self.queue.append(image_id)

        @precondition(lambda self: bool(self.queue))
        @rule(data=st.data())
        def delete_queued(self, data: st.DataObject) -> None:
            image_id = data.draw(st.sampled_from(self.queue))
            assert self.cache.delete_queued_image(image_id)
            self.queue.remove(image_id)

        @rule(max_size=st.integers(0, 200))
        def prune(self, max_size: int) -> None:
            before = {image.image_id: image for image in self.cache.get_cached_images()}
            files, freed = self.cache.prune(max_size=max_size)
            after = {image.image_id for image in self.cache.get_cached_images()}
            evicted = set(before) - after
            assert files == len(evicted)
            assert freed == sum(before[i].size for i in evicted)
            assert self.cache.get_cache_size() <= max_size
            if evicted and after:
                # Least recently accessed first: everything kept was used later.
                assert max(before[i].last_accessed for i in evicted) <= min(
                    before[i].last_accessed for i in after
                )
            if freed:  # bounded: no more evicted than needed to get under the limit
                total = sum(image.size for image in before.values())
                assert total - freed + max(before[i].size for i in evicted) > max_size
            for image_id in evicted:
                del self.images[image_id]
                del self.hits[image_id]

        @rule(stall_time=st.sampled_from([None, 0, 3600]))
        def clean(self, stall_time: int | None) -> None:
            self.cache.clean(stall_time)
            assert not any((self.cache_dir / "invalid").iterdir())

        # --- invariants --------------------------------------------------------------

        @invariant()
        def listing_matches_the_model(self) -> None:
            listed = self.cache.get_cached_images()
            assert [image.image_id for image in listed] == sorted(self.images)
            assert {image.image_id: image.hits for image in listed} == self.hits
            assert self.cache.get_cache_size() == sum(image.size for image in listed)
            assert self.cache.get_cache_size() == sum(map(len, self.images.values()))

        @invariant()
        def listed_images_read_back_identical(self) -> None:
            # Straight from disk, so the check itself counts no hits.
            for image_id, data in self.images.items():
                assert (self.cache_dir / image_id).read_bytes() == data
                assert self.cache.is_cached(image_id)

        @invariant()
        def no_fill_is_left_behind(self) -> None:
            assert not any((self.cache_dir / "incomplete").iterdir())

        @invariant()
        def queue_matches_the_model_and_holds_nothing_cached(self) -> None:
            queued = self.cache.get_queued_images()
            assert queued == self.queue
            assert not set(queued) & set(self.images)

    return CacheMachine


def test_cache_behaves_like_its_model(driver_kind: str, tmp_path: Path) -> None:
    settings_for(driver_kind, tmp_path, tmp_path)  # skips here if the kind cannot run
    run_state_machine_as_test(
        machine_for(driver_kind, tmp_path),
        settings=hypothesis.settings(
            max_examples=40,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
        ),
    )
