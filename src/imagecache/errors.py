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
     ├── ImageNotQueued                the image has no queue marker here
     ├── ImageBeingCached              another writer holds the fill of this image
     ├── VerificationError             size or hash of the written bytes is wrong
     ├── CacheStoreError               the cache's own disk or metadata failed
     │    ├── CacheUnavailable         its filesystem refuses changes (read-only, full)
     │    ├── CentralUnavailable       the cluster database is known away: refused at once
     │    ├── DeletedDuringFill        deleted through another node while this fill ran
     │    └── WriterGone               a followed fill ended without a committed file
     ├── IdentityError                 Keystone could not answer, or refused the cache
     │    ├── IdentityRejected         the cache's own credentials were refused
     │    └── IdentityUnavailable      Keystone unreachable or failing: refuse, never allow
     │         └── AuthorisationUnavailable  a management caller cannot be checked now
     ├── RequestError                  a request to the service that cannot be done as asked
     │    ├── BadRequest               a malformed path, parameter, header or body
     │    │    ├── BadPreheatRequest   a preheat job with no images, an unknown node or site
     │    │    └── MalformedRange      a Range header that is not one valid bytes range
     │    ├── RangeNotSatisfiable      a valid range that selects no byte of the image
     │    ├── NotPermitted             this caller may not make this call
     │    ├── ResourceNotFound         nothing here answers this path (not cached, not relayed)
     │    ├── MethodNotAllowed         the route has no such method (``allowed`` lists its own)
     │    ├── PreheatJobFinished       a cancel of a preheat job whose every item has ended
     │    └── NeedsClusterMode         the call needs centralized caching, which is off
     ├── ServiceError                  the remote CLI: the service failed or refused (client.py)
     ├── ServiceFailed                 the service gave up restarting its workers
     └── UpstreamError                 the origin failed or refused
          ├── UpstreamNotFound         the origin does not know the image (404)
          ├── UpstreamForbidden        the origin refuses this caller (401/403)
          ├── UpstreamNotActive        the image exists but has no data to serve
          ├── ResumeRefused            a broken body cannot be resumed with the same image
          └── UpstreamUnreachable      no answer (refused, timed out) or a 5xx
               ├── AccessUnconfirmed   a hit whose caller the origin cannot vouch for now
               └── SiblingFailed       a cluster sibling could not serve a fill

``RequestError`` and its subclasses are what the service's handlers raise for
an answer that is not the image or the document asked for; the one place that
turns any of these errors into an HTTP status and a Glance-shaped body is the
``_errors`` middleware in ``server/app.py`` (its ``STATUS`` table). Handlers
never raise aiohttp's ``web.HTTP*`` (tests/test_architecture.py checks).

Each class carries the offending value in its message and, where one exists,
what the operator can do about it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

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


class ImageNotQueued(ImageCacheError, LookupError):
    """The image has no queue marker (a 404 for the queue verbs)."""

    def __init__(self, image_id: str) -> None:
        super().__init__(f"image {image_id!r} is not queued")
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


class CentralUnavailable(CacheStoreError):
    """The cluster database is known to be away: refused at once, without trying it again.

    Raised by the central driver for cluster-wide calls (holder lookups,
    listings, cluster deletion) while its heartbeat says the database is gone;
    this node's own images are answered from its local mirror meanwhile.
    """


class DeletedDuringFill(CacheStoreError):
    """The image was deleted through another node after this fill began: not kept."""

    def __init__(self, image_id: str) -> None:
        super().__init__(f"image {image_id!r} was deleted during its fill; not kept")
        self.image_id = image_id


class WriterGone(CacheStoreError):
    """The fill a reader followed ended without a committed file (its writer died or stalled)."""


class CacheUnavailable(CacheStoreError):
    """The cache directory's filesystem refuses changes (read-only, full): HTTP 503.

    A condition of the disk, not a bug: the message names the directory and
    what the filesystem said, and a retry may succeed once it is fixed.
    """


class ServiceFailed(ImageCacheError):
    """The pre-fork service stopped: its workers kept dying faster than it restarts them."""


class ServiceError(ImageCacheError):
    """The remote CLI's service could not be reached, refused us, or answered an error.

    ``status`` is the HTTP status it answered, None when there was no answer.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


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


class ResumeRefused(UpstreamError):
    """A body broke mid-way and the origin's answer to resuming it does not continue the same image.

    The image changed between the break and the resume (another ETag,
    length or checksum), or the origin ignored the ``Range`` (a 200): the
    fill fails rather than cache two versions spliced together
    (upstreams/resume.py). A retry of the download starts afresh.
    """

    def __init__(self, image_id: str, offset: int, reason: str) -> None:
        super().__init__(
            f"image {image_id!r}: the upstream body broke at byte {offset} and was not resumed:"
            f" {reason}; nothing is cached from two versions of an image"
        )
        self.image_id = image_id
        self.offset = offset
        self.reason = reason


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


class AuthorisationUnavailable(IdentityUnavailable):
    """Keystone cannot say now whether a management caller is admin: refused (503), never let in."""

    def __init__(self, why: IdentityError) -> None:
        super().__init__(f"cannot authorise management calls now: {why}")
        self.why = why


class RequestError(ImageCacheError):
    """A request to the service cannot be done as asked; the message says what to change.

    The service's handlers raise these (never aiohttp's ``web.HTTP*``); each
    class has one status in ``server/app.py``'s ``STATUS`` table. The message
    is the body the caller reads, so it names the offending value.
    """


class BadRequest(RequestError, ValueError):
    """A malformed path, query parameter, header or body (400)."""


class BadPreheatRequest(BadRequest):
    """A preheat request that cannot be done as asked: no images, unknown site, bad limit (400)."""


class MalformedRange(BadRequest):
    """The Range header is not a single valid ``bytes`` range (400); see ``server/ranges.py``."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"bad Range header: {problem}")
        self.problem = problem


class RangeNotSatisfiable(RequestError):
    """A valid range selects no byte of an image of ``size`` bytes (416, ``Content-Range``)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable: the image has {size} bytes")
        self.size = size


class NotPermitted(RequestError):
    """This caller may not make this call: not an admin, or a wrong cluster token (403)."""


class ResourceNotFound(RequestError, LookupError):
    """Nothing here answers this path: the image is not cached, or the route needs Glance (404)."""


class MethodNotAllowed(RequestError):
    """The route exists but has no such method (405, ``Allow`` lists ``allowed``).

    The message is webob's, as Glance answers, so clients show the same text.
    """

    def __init__(self, method: str, allowed: Iterable[str]) -> None:
        super().__init__("The method is not allowed for this resource.")
        self.method = method
        self.allowed = sorted(allowed)


class PreheatJobFinished(RequestError):
    """A preheat job cannot be cancelled: every node has written its outcome already (409)."""

    def __init__(self, job_id: int) -> None:
        super().__init__(
            f"preheat job {job_id} is finished: every item has its outcome, nothing to cancel"
        )
        self.job_id = job_id


class NeedsClusterMode(RequestError):
    """A cluster-only call to a service without centralized caching (409, as Glance answers)."""

    def __init__(self, cause: NotInClusterMode) -> None:
        super().__init__(f"centralized caching is not enabled: {cause}")
        self.cause = cause


class SiblingFailed(UpstreamUnreachable):
    """A cluster sibling could not serve an image (absent, refused, cut off mid-stream).

    Raised and caught inside ``upstreams/sibling.py``. Unreachable, not
    refused: the fill goes on from another sibling or the origin.
    """

    def __init__(self, sibling: str, why: str) -> None:
        super().__init__(
            f"sibling {sibling} could not serve the image: {why};"
            " the fill goes on from another sibling or the origin"
        )
        self.sibling = sibling
        self.why = why
