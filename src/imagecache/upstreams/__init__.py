"""Image origins. ``create_upstream("KIND:TARGET", settings)`` builds one.

Each kind lives in its own module and is imported only when asked for, so the
optional extras (boto3 for ``s3``) are needed only by operators who use them.
"""

from __future__ import annotations

from pathlib import Path

from imagecache.errors import ConfigurationError
from imagecache.keystone import ServiceIdentity
from imagecache.settings import Settings
from imagecache.upstreams.base import ANONYMOUS, IDENTITY_HEADERS, SERVICE, Caller, Upstream
from imagecache.upstreams.resume_events import NO_RESUME_EVENTS, ResumeEvents

__all__ = ["ANONYMOUS", "IDENTITY_HEADERS", "SERVICE", "Caller", "Upstream", "create_upstream"]

KINDS = ("directory", "glance", "http", "s3")


def create_upstream(
    spec: str,
    settings: Settings,
    identity: ServiceIdentity | None = None,
    *,
    resume_events: ResumeEvents = NO_RESUME_EVENTS,
) -> Upstream:
    """Build the upstream named by ``KIND:TARGET``.

    ``directory:/srv/images``, ``http:https://origin/images/{image_id}``,
    ``glance:http://127.0.0.1:9292``, ``s3:bucket/prefix``. A Glance upstream
    acts for the cache itself as ``identity`` (default: the account of the
    ``[keystone]`` settings, if any). ``resume_events`` hears how the http,
    glance and s3 upstreams' resumes of broken bodies end (the service's
    metrics); a directory has nothing to resume.
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

        return HttpUpstream(target, settings, resume_events)
    if kind == "glance":
        from imagecache.upstreams.glance import GlanceUpstream

        if identity is None and settings.keystone is not None:
            identity = ServiceIdentity(settings.keystone.auth(), timeout=settings.keystone.timeout)
        return GlanceUpstream(target, settings, identity, resume_events)
    if kind == "s3":
        from imagecache.upstreams.s3 import S3Upstream

        return S3Upstream(target, settings, resume_events)
    raise ConfigurationError(
        f"unknown upstream kind {kind!r} in {spec!r}; use one of {', '.join(KINDS)}"
    )
