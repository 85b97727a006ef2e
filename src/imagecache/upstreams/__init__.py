"""Image origins. ``create_upstream("KIND:TARGET", settings)`` builds one.

Each kind lives in its own module and is imported only when asked for, so the
optional extras (boto3 for ``s3``) are needed only by operators who use them.
This module is the upstreams' one reader of ``Settings``: ``upstream_config``
copies out what they use and ``open_upstream`` builds one from that value
(tests/test_architecture.py keeps the kinds' modules off the settings model).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from imagecache.errors import ConfigurationError
from imagecache.keystone import ServiceIdentity
from imagecache.upstreams.base import ANONYMOUS, IDENTITY_HEADERS, SERVICE, Caller, Upstream
from imagecache.upstreams.config import UpstreamConfig
from imagecache.upstreams.resume_events import NO_RESUME_EVENTS, ResumeEvents

if TYPE_CHECKING:
    from imagecache.settings import Settings

__all__ = [
    "ANONYMOUS",
    "IDENTITY_HEADERS",
    "SERVICE",
    "Caller",
    "Upstream",
    "UpstreamConfig",
    "create_upstream",
    "open_upstream",
    "service_identity",
    "upstream_config",
]

KINDS = ("directory", "glance", "http", "s3")


def upstream_config(settings: Settings) -> UpstreamConfig:
    """The values of ``settings`` that upstreams read."""
    return UpstreamConfig(
        upstream_timeout=settings.upstream_timeout,
        upstream_resume_attempts=settings.upstream_resume_attempts,
        upstream_resume_backoff=settings.upstream_resume_backoff,
        http_checksum_sidecar=settings.http_checksum_sidecar,
        s3_endpoint_url=settings.s3_endpoint_url,
        s3_region=settings.s3_region,
        cluster_token=settings.cluster_token,
        site=settings.site,
        sibling_cross_site=settings.sibling_cross_site,
    )


def service_identity(settings: Settings) -> ServiceIdentity | None:
    """The cache's own Keystone account, from the ``[keystone]`` settings (None: none)."""
    if settings.keystone is None:
        return None
    return ServiceIdentity(settings.keystone.auth(), timeout=settings.keystone.timeout)


def create_upstream(
    spec: str,
    settings: Settings,
    identity: ServiceIdentity | None = None,
    *,
    resume_events: ResumeEvents = NO_RESUME_EVENTS,
) -> Upstream:
    """Build the upstream named by ``KIND:TARGET`` from the settings (``open_upstream``).

    A Glance upstream acts for the cache itself as ``identity`` (default: the
    account of the ``[keystone]`` settings, if any).
    """
    if identity is None and spec.partition(":")[0] == "glance":
        identity = service_identity(settings)
    return open_upstream(spec, upstream_config(settings), identity, resume_events=resume_events)


def open_upstream(
    spec: str,
    config: UpstreamConfig,
    identity: ServiceIdentity | None = None,
    *,
    resume_events: ResumeEvents = NO_RESUME_EVENTS,
) -> Upstream:
    """Build the upstream named by ``KIND:TARGET``.

    ``directory:/srv/images``, ``http:https://origin/images/{image_id}``,
    ``glance:http://127.0.0.1:9292``, ``s3:bucket/prefix``. A Glance upstream
    acts for the cache itself as ``identity`` (None: only for its callers).
    ``resume_events`` hears how the http, glance and s3 upstreams' resumes of
    broken bodies end (the service's metrics); a directory has nothing to resume.
    """
    kind, sep, target = spec.partition(":")
    if not sep or not target:
        raise ConfigurationError(
            f"upstream {spec!r} must look like KIND:TARGET, e.g. directory:/srv/images"
        )
    if kind == "directory":
        from imagecache.upstreams.directory import DirectoryUpstream

        return DirectoryUpstream(Path(target))
    if kind == "http":
        from imagecache.upstreams.http import HttpUpstream

        return HttpUpstream(target, config, resume_events)
    if kind == "glance":
        from imagecache.upstreams.glance import GlanceUpstream

        return GlanceUpstream(target, config, identity, resume_events)
    if kind == "s3":
        from imagecache.upstreams.s3 import S3Upstream

        return S3Upstream(target, config, resume_events)
    raise ConfigurationError(
        f"unknown upstream kind {kind!r} in {spec!r}; use one of {', '.join(KINDS)}"
    )
