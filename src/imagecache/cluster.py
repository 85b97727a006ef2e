"""Cluster mode, as the library sees it: is the cache central, delete on every node.

The central driver (``drivers/central.py``) is the cluster's memory. What a
service process does with it (the sibling origin, heartbeats, telling a
sibling's request from a client's) lives in ``upstreams/sibling.py`` and
``server/cluster.py``; this module holds what front ends share: which driver
is the cluster's, deletion everywhere, and the header the node-to-node
credential travels in.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, cast

from imagecache.cache import ImageCache

if TYPE_CHECKING:
    # Only a type here: the central driver pulls in SQLAlchemy and alembic, about
    # 0.4 s of the 1.2 s a service spent importing before it served (min of 5
    # runs, python -X importtime; docs/benchmarks-log.md), which a node of the
    # sqlite or xattr driver never uses.
    from imagecache.drivers.central import CentralDriver

# The node-to-node credential travels in this header (never logged).
CLUSTER_TOKEN_HEADER = "X-Imagecache-Cluster-Token"  # noqa: S105 - a header name


def central_driver(cache: ImageCache) -> CentralDriver | None:
    """The cache's driver if it is the cluster one."""
    # A central driver can exist only once create_driver has imported its module:
    # looked up there, so that asking never imports it.
    central = sys.modules.get("imagecache.drivers.central")
    if central is None or not isinstance(cache.driver, central.CentralDriver):
        return None
    return cast("CentralDriver", cache.driver)


def delete_everywhere(cache: ImageCache, image_id: str) -> bool:
    """Delete the cached copy here and, in cluster mode, on every node.

    The other nodes drop their copies at their next heartbeat
    (``server/cluster.py``'s ``ClusterTasks``). A fill of the image in progress
    here is cancelled first: the deletion wins, its clients still get their
    bytes, the cache does not keep them.
    """
    cancelled = cache.cancel_fill(image_id)
    driver = central_driver(cache)
    if driver is None:
        return cache.delete_cached_image(image_id) or cancelled
    return driver.delete_everywhere(image_id) or cancelled


__all__ = ["CLUSTER_TOKEN_HEADER", "central_driver", "delete_everywhere"]
