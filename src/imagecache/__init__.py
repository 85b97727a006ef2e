"""imagecache: a standalone, Glance-compatible disk cache and edge proxy for VM images."""

from imagecache.cache import ImageCache
from imagecache.drivers import Driver, create_driver
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
from imagecache.fill.writer import FillWriter
from imagecache.records import CachedImage, CleanResult, ImageInfo, PruneResult, QueueResult
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
