"""What every handler of one service process shares, stored on the aiohttp app."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from imagecache.cache import ImageCache
from imagecache.fill.coordinator import FillCoordinator
from imagecache.keystone import ServiceIdentity, TokenValidator
from imagecache.layout import ImageId
from imagecache.metadata import MetadataCache
from imagecache.server.metrics import Metrics
from imagecache.settings import Settings
from imagecache.upstreams.base import Upstream

if TYPE_CHECKING:
    # Types only: auth.py's admin check reads STATE from here at run time.
    from imagecache.server.auth import AccessCache


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

    def image_id(self, request: web.Request) -> ImageId:
        """The ``{image_id}`` of the route, validated once, here at the edge.

        A bad one raises ``InvalidImageId``, a 400 with its message (app.STATUS).
        The ``ImageId`` it returns is not checked again on the way to the disk.
        """
        return self.cache.layout.validate(request.match_info["image_id"])


STATE = web.AppKey("state", ServiceState)
