"""The cluster driver (``CentralDriver``) and what its callers use.

Importing this package imports SQLAlchemy: only ``create_driver`` does, when
the settings name the central driver, so a node of the sqlite or xattr driver
never pays for it (docs/benchmarks-log.md).
"""

from __future__ import annotations

from imagecache.drivers.central.claims import OriginClaim
from imagecache.drivers.central.driver import CentralDriver
from imagecache.drivers.central.importer import ImportResult
from imagecache.drivers.central.nodes import node_instance_id
from imagecache.drivers.central.preheat_view import PreheatItem, PreheatJob, PreheatJobSummary
from imagecache.drivers.central.schema import (
    cached_images,
    deleted_images,
    make_engine,
    metadata,
    nodes,
    origin_fills,
    preheat_items,
    preheat_jobs,
    to_datetime,
    to_epoch,
)

# The cluster listing's records live in imagecache.records (the remote CLI builds
# them without SQLAlchemy); re-exported here, where the driver's API is.
from imagecache.records import NodeInfo, NodeListing

__all__ = [
    "CentralDriver",
    "ImportResult",
    "NodeInfo",
    "NodeListing",
    "OriginClaim",
    "PreheatItem",
    "PreheatJob",
    "PreheatJobSummary",
    "cached_images",
    "deleted_images",
    "make_engine",
    "metadata",
    "node_instance_id",
    "nodes",
    "origin_fills",
    "preheat_items",
    "preheat_jobs",
    "to_datetime",
    "to_epoch",
]
