"""Cluster mode, as the library sees it: delete on every node.

The central driver (``drivers/central.py``) is the cluster's memory. What a
service process does with it (the sibling origin, heartbeats, telling a
sibling's request from a client's) lives in ``upstreams/sibling.py`` and
``server/cluster.py``; this module holds what front ends share:
deletion everywhere and the header the node-to-node credential travels in.
Which driver is the cluster's the facade says (``ImageCache.central``).
"""

from __future__ import annotations

from imagecache.cache import ImageCache

# The node-to-node credential travels in this header (never logged).
CLUSTER_TOKEN_HEADER = "X-Imagecache-Cluster-Token"  # noqa: S105 - a header name


def delete_everywhere(cache: ImageCache, image_id: str) -> bool:
    """Delete the cached copy here and, in cluster mode, on every node.

    The other nodes drop their copies at their next heartbeat
    (``server/cluster.py``'s ``ClusterTasks``). A fill of the image in progress
    here is cancelled first: the deletion wins, its clients still get their
    bytes, the cache does not keep them.
    """
    cancelled = cache.cancel_fill(image_id)
    driver = cache.central
    if driver is None:
        return cache.delete_cached_image(image_id) or cancelled
    return driver.delete_everywhere(image_id) or cancelled


__all__ = ["CLUSTER_TOKEN_HEADER", "delete_everywhere"]
