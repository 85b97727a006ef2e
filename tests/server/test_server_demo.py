"""``make serve``'s demo: a fresh directory gets a demo image, and the printed request works."""

from __future__ import annotations

import hashlib
from pathlib import Path

from imagecache.demo import DEMO_IMAGE, prepare


def test_prepare_makes_a_verifiable_demo_image_once(tmp_path: Path) -> None:
    images, cache, first = prepare(tmp_path / "var")
    assert first == DEMO_IMAGE
    assert cache.is_dir()
    data = (images / first).read_bytes()
    recorded = (images / f"{first}.sha256").read_text().split()[0]
    assert recorded == hashlib.sha256(data).hexdigest()
    (images / "aaa-first.img").write_bytes(b"x")
    assert prepare(tmp_path / "var")[2] == "aaa-first.img"  # existing images are kept, first wins
