"""What every handler of one service process shares, stored on the aiohttp app."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass

from aiohttp import web

from imagecache.cache import ImageCache
from imagecache.errors import InvalidImageId
from imagecache.fill.coordinator import FillCoordinator
from imagecache.keystone import ServiceIdentity, TokenValidator
from imagecache.metadata import MetadataCache
from imagecache.server.auth import AccessCache
from imagecache.server.metrics import Metrics
from imagecache.settings import Settings
from imagecache.upstreams.base import Upstream


@dataclass
class ServiceState:
    settings: Settings
    cache: ImageCache
    upstream: Upstream
    metrics: Metrics
    fills: FillCoordinator
    access: AccessCache
    # The origin's answers about images, one lookup per image (metadata.py).
    metadata: MetadataCache
    # Blocking disk work (sqlite, reads of growing files, writes, fsync) runs here.
    executor: concurrent.futures.ThreadPoolExecutor
    # With a [keystone] table: the cache's own account, and callers' tokens.
    identity: ServiceIdentity | None = None
    tokens: TokenValidator | None = None

    def image_id(self, request: web.Request) -> str:
        """The ``{image_id}`` of the route, validated once, here at the edge (400 if bad)."""
        raw = request.match_info["image_id"]
        try:
            return self.cache.driver.layout.validate(raw)
        except InvalidImageId as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc


STATE = web.AppKey("state", ServiceState)
