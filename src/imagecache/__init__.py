"""imagecache: a standalone, Glance-compatible disk cache and edge proxy for VM images."""

import importlib as _importlib
import typing as _typing

# Errors and records are eager: they are stdlib-only leaves that every front end
# needs anyway (the remote CLI included), and exception classes are best real
# attributes from the start.
from imagecache.errors import (
    BadDriverConfiguration,
    CacheStoreError,
    CacheUnavailable,
    ConfigurationError,
    ImageBeingCached,
    ImageCacheError,
    ImageNotCached,
    InvalidImageId,
    NotInClusterMode,
    UpstreamError,
    UpstreamForbidden,
    UpstreamNotActive,
    UpstreamNotFound,
    VerificationError,
)
from imagecache.records import CachedImage, CleanResult, ImageInfo, PruneResult, QueueResult

if _typing.TYPE_CHECKING:
    from imagecache.cache import ImageCache
    from imagecache.drivers import Driver, create_driver
    from imagecache.fill.writer import FillWriter
    from imagecache.settings import Settings, load_settings

__version__ = "0.1.0"

# The library is the cache facade, its drivers, records, settings and errors
# (README). Prefetcher (prefetch.py) and Capacity (capacity.py) are not exported:
# they are the service's and the CLI's machinery, which operators drive through
# `imagecache prefetch`, queue_interval and image_cache_max_size, and their
# constructors take the service's hooks (a fill attempt, an executor; one
# Capacity per process).
__all__ = [
    "BadDriverConfiguration",
    "CacheStoreError",
    "CacheUnavailable",
    "CachedImage",
    "CleanResult",
    "ConfigurationError",
    "Driver",
    "FillWriter",
    "ImageBeingCached",
    "ImageCache",
    "ImageCacheError",
    "ImageInfo",
    "ImageNotCached",
    "InvalidImageId",
    "NotInClusterMode",
    "PruneResult",
    "QueueResult",
    "Settings",
    "UpstreamError",
    "UpstreamForbidden",
    "UpstreamNotActive",
    "UpstreamNotFound",
    "VerificationError",
    "__version__",
    "create_driver",
    "load_settings",
]

# The engine's exports are loaded on first use (PEP 562): every ``imagecache.x``
# import runs this file first, and the remote CLI's client must not pay for the
# cache, the drivers (SQLAlchemy) and the settings model (pydantic) it never
# uses. ``from imagecache import ImageCache`` works as before.
_LAZY = {
    "Driver": "imagecache.drivers",
    "FillWriter": "imagecache.fill.writer",
    "ImageCache": "imagecache.cache",
    "Settings": "imagecache.settings",
    "create_driver": "imagecache.drivers",
    "load_settings": "imagecache.settings",
}


def __getattr__(name: str) -> object:
    home = _LAZY.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(home), name)
    globals()[name] = value  # once loaded, a plain attribute (no second lookup)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
