"""``python -m imagecache.demo`` (``make serve``): the service on embedded defaults.

Serves the images in ``./var/images`` (a directory upstream; a small demo
image is written there if it is empty) through a cache in ``./var/cache``, on
``127.0.0.1:9393``, and prints the request that fetches the first image.
Settings from the environment (``IMAGECACHE_*``) still apply, so
``IMAGECACHE_BIND_PORT=9494 make serve`` moves it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from imagecache.layout import CacheLayout
from imagecache.records import HASH_ALGORITHMS
from imagecache.server.run import serve
from imagecache.settings import load_settings

DEMO_IMAGE = "demo-image.raw"
DEMO_SIZE = 8 * 1024 * 1024


def prepare(var: Path) -> tuple[Path, Path, str]:
    """Create ``var/images`` (with a demo image if empty) and ``var/cache``; the first image."""
    images, cache = var / "images", var / "cache"
    images.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    names = _image_names(images)
    if not names:
        data = _demo_bytes(DEMO_SIZE)
        (images / DEMO_IMAGE).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        (images / f"{DEMO_IMAGE}.sha256").write_text(f"{digest}  {DEMO_IMAGE}\n")
        names = [DEMO_IMAGE]
    return images, cache, names[0]


def _image_names(images: Path) -> list[str]:
    layout = CacheLayout(images)
    sidecars = tuple(f".{algo}" for algo in HASH_ALGORITHMS)
    return sorted(
        path.name
        for path in images.iterdir()
        if path.is_file() and layout.is_valid(path.name) and not path.name.endswith(sidecars)
    )


def _demo_bytes(size: int) -> bytes:
    # Deterministic, so the printed checksum is the same on every machine.
    block = hashlib.sha512(b"imagecache demo").digest() * 2048
    return (block * (size // len(block) + 1))[:size]


def main() -> None:
    var = Path("var").resolve()
    images, cache, first = prepare(var)
    settings = load_settings(
        None,
        image_cache_dir=cache,
        upstream=f"directory:{images}",
    )  # bind address: the defaults (127.0.0.1:9393) unless IMAGECACHE_BIND_* say otherwise
    base = f"http://{settings.bind_host}:{settings.bind_port}"
    print(f"imagecache: serving {images} through the cache in {cache}", flush=True)
    print("Fetch the first image (the first request fills the cache, the next is a hit):")
    print(f"  curl -o {first} {base}/v2/images/{first}/file")
    print(f"See what is cached:  curl {base}/v2/cache")
    print("Stop with Ctrl-C.", flush=True)
    serve(settings)


if __name__ == "__main__":
    main()
