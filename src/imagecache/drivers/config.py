"""The values a driver reads, as one frozen value built from the settings in one place.

A driver never sees ``Settings`` (Glance's drivers read a global ``CONF``
wherever they liked): ``imagecache.drivers.driver_config`` copies the fields
below out of the settings, and ``open_driver`` hands the result to the driver.
Field names are the settings' names, so a message naming a field names the
setting an operator changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class DriverConfig:
    """Everything any driver reads; the central-only fields are unused by sqlite and xattr."""

    image_cache_driver: str
    image_cache_dir: Path | None
    image_cache_sqlite_db: str
    image_cache_stall_time: int
    fill_drop_behind: bool
    # The central driver (cluster mode) only.
    database_url: str | None
    database_timeout: float
    worker_self_reference_url: str | None
    node_heartbeat_interval: float
    node_dead_after: float
    site: str
    sibling_cross_site: bool
