"""The values an upstream reads, as one frozen value built from the settings in one place.

``imagecache.upstreams.upstream_config`` copies these fields out of
``Settings``; the upstreams (and the cluster's sibling upstream) take the
result and never see the settings model. Field names are the settings' names.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import SecretStr


@dataclass(frozen=True, kw_only=True)
class UpstreamConfig:
    """Everything any upstream reads; each kind uses a few of these."""

    upstream_timeout: float
    upstream_resume_attempts: int
    upstream_resume_backoff: float
    http_checksum_sidecar: bool
    s3_endpoint_url: str | None
    s3_region: str | None
    # The sibling upstream (cluster mode) only.
    cluster_token: SecretStr | None
    site: str
    sibling_cross_site: bool
