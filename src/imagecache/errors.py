"""The one exception tree of imagecache.

Every error the library raises on purpose is an ``ImageCacheError``; errors
from third-party code (sqlite3, aiohttp, boto3, SQLAlchemy) are translated at
the one boundary where they are caught, with ``raise Ours(...) from exc``.

    ImageCacheError
     ├── ConfigurationError            bad or missing setting
     │    ├── BadDriverConfiguration   a driver cannot work with the given settings
     │    └── NotInClusterMode         a cluster-only call on a single-node driver
     ├── InvalidImageId                an id that is not safe to use as a file name
     ├── ImageNotCached                the image has no committed file here
     ├── ImageBeingCached              another writer holds the fill of this image
     ├── VerificationError             size or hash of the written bytes is wrong
     ├── CacheStoreError               the cache's own disk or metadata failed
     │    ├── CacheUnavailable         its filesystem refuses changes (read-only, full)
     │    └── WriterGone               a followed fill ended without a committed file
     ├── IdentityError                 Keystone could not answer, or refused the cache
     │    ├── IdentityRejected         the cache's own credentials were refused
     │    └── IdentityUnavailable      Keystone unreachable or failing: refuse, never allow
     ├── ServiceFailed                 the service gave up restarting its workers
     └── UpstreamError                 the origin failed or refused
          ├── UpstreamNotFound         the origin does not know the image (404)
          ├── UpstreamForbidden        the origin refuses this caller (401/403)
          ├── UpstreamNotActive        the image exists but has no data to serve
          └── UpstreamUnreachable      no answer (refused, timed out) or a 5xx
               └── AccessUnconfirmed   a hit whose caller the origin cannot vouch for now

Each class carries the offending value in its message and, where one exists,
what the operator can do about it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagecache.records import ImageInfo


class ImageCacheError(Exception):
    """Base of every error imagecache raises on purpose."""


class ConfigurationError(ImageCacheError):
    """A setting is missing or has a value that cannot work."""


class BadDriverConfiguration(ConfigurationError):
    """A cache driver cannot be configured with the given settings.

    The name comes from Glance, whose operators know it; unlike Glance we never
    fall back to another driver when this is raised.
    """

    def __init__(self, driver_name: str, reason: str) -> None:
        super().__init__(f"driver {driver_name!r} could not be configured: {reason}")
        self.driver_name = driver_name
        self.reason = reason


class NotInClusterMode(ConfigurationError):
    """A cluster-only operation was asked of a driver that is not the central one."""

    def __init__(self, operation: str) -> None:
        super().__init__(
            f"{operation} needs cluster mode: set image_cache_driver = 'central' and database_url"
        )


class BadPreheatRequest(ImageCacheError, ValueError):
    """A preheat job that cannot be made as asked: no images, an unknown node or site."""


class InvalidImageId(ImageCacheError, ValueError):
    """An image id that would be unsafe or ambiguous as a cache file name."""

    def __init__(self, image_id: object, reason: str) -> None:
        shown = repr(image_id)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"invalid image id {shown}: {reason}")
        self.reason = reason


class ImageNotCached(ImageCacheError, LookupError):
    """The image has no committed file in this cache."""

    def __init__(self, image_id: str) -> None:
        super().__init__(f"image {image_id!r} is not cached")
        self.image_id = image_id


class ImageBeingCached(ImageCacheError):
    """Another live writer holds the fill of this image."""

    def __init__(self, image_id: str) -> None:
        super().__init__(f"image {image_id!r} is already being cached by another writer")
        self.image_id = image_id


class VerificationError(ImageCacheError):
    """The bytes written do not match the size or hash the origin promised."""

    def __init__(self, image_id: str, what: str, expected: object, actual: object) -> None:
        super().__init__(
            f"verification of image {image_id!r} failed: {what} expected {expected}, got {actual}"
        )
        self.image_id = image_id
        self.what = what
        self.expected = expected
        self.actual = actual


class CacheStoreError(ImageCacheError):
    """The cache's own storage (files or metadata database) failed."""


class WriterGone(CacheStoreError):
    """The fill a reader followed ended without a committed file (its writer died or stalled)."""


class CacheUnavailable(CacheStoreError):
    """The cache directory's filesystem refuses changes (read-only, full): HTTP 503.

    A condition of the disk, not a bug: the message names the directory and
    what the filesystem said, and a retry may succeed once it is fixed.
    """


class ServiceFailed(ImageCacheError):
    """The pre-fork service stopped: its workers kept dying faster than it restarts them."""


class UpstreamError(ImageCacheError):
    """The image origin failed, or answered something we cannot use."""


def is_origin_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the origin failed, rather than refused or does not know the image."""
    return isinstance(exc, UpstreamError) and not isinstance(
        exc, UpstreamNotFound | UpstreamForbidden | UpstreamNotActive
    )


class UpstreamNotFound(UpstreamError, LookupError):
    """The origin does not know the image."""

    def __init__(self, image_id: str) -> None:
        super().__init__(f"image {image_id!r} not found upstream")
        self.image_id = image_id


class UpstreamForbidden(UpstreamError):
    """The origin refuses this caller access to the image."""

    def __init__(self, image_id: str, status: int = 403) -> None:
        super().__init__(f"access to image {image_id!r} refused upstream (HTTP {status})")
        self.image_id = image_id
        self.status = status


class UpstreamNotActive(UpstreamError):
    """The image exists upstream but is not active, so it has no data to serve.

    Except ``info``: set for an image that is not active yet still has data
    (Glance's ``deactivated``, which its file route serves to admins only).
    """

    def __init__(self, image_id: str, status: str, info: ImageInfo | None = None) -> None:
        super().__init__(f"image {image_id!r} is {status!r} upstream, not 'active'")
        self.image_id = image_id
        self.status = status
        self.info = info


class UpstreamUnreachable(UpstreamError):
    """The origin could not be asked: connection refused or reset, a timeout, or a 5xx.

    Never a refusal (401/403) or an unknown image (404): those are answers.
    """


class AccessUnconfirmed(UpstreamUnreachable):
    """A cached image is not served: the origin, which decides who may read it, cannot be asked.

    Served anyway only under ``offline_grace`` to a caller the origin let read
    this image within that many seconds (server/auth.py).
    """

    def __init__(self, image_id: str, why: UpstreamError, offline_grace: float) -> None:
        if offline_grace > 0:
            hint = (
                f"and this caller's access was not confirmed by it in the last"
                f" {offline_grace:g} s (offline_grace)"
            )
        else:
            hint = "and offline_grace is 0"
        super().__init__(
            f"image {image_id!r} is cached but cannot be served: the origin cannot check"
            f" this caller's access ({why}) {hint}; retry when the origin is back"
        )
        self.image_id = image_id


class IdentityError(ImageCacheError):
    """OpenStack identity (Keystone) could not give the answer the cache needs."""


class IdentityRejected(IdentityError):
    """Keystone refused the cache's own credentials; the message names the setting."""


class IdentityUnavailable(IdentityError):
    """Keystone cannot be asked now; whatever needed its answer is refused."""
