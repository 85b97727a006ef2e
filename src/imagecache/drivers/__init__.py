"""Cache drivers: where metadata lives. ``create_driver`` picks one from the settings.

This module is the drivers' one reader of ``Settings``: ``driver_config``
copies out what drivers use, ``open_driver`` builds a driver from that value
alone (tests/test_architecture.py keeps the rest of the package off the
settings model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imagecache.drivers.base import Driver
from imagecache.drivers.config import DriverConfig

if TYPE_CHECKING:
    from imagecache.settings import Settings


def driver_config(settings: Settings) -> DriverConfig:
    """The values of ``settings`` that drivers read."""
    return DriverConfig(
        image_cache_driver=settings.image_cache_driver,
        image_cache_dir=settings.image_cache_dir,
        image_cache_sqlite_db=settings.image_cache_sqlite_db,
        image_cache_stall_time=settings.image_cache_stall_time,
        fill_drop_behind=settings.fill_drop_behind,
        database_url=settings.database_url,
        database_timeout=settings.database_timeout,
        worker_self_reference_url=settings.worker_self_reference_url,
        node_heartbeat_interval=settings.node_heartbeat_interval,
        node_dead_after=settings.node_dead_after,
        site=settings.site,
        sibling_cross_site=settings.sibling_cross_site,
    )


def open_driver(config: DriverConfig) -> Driver:
    """Build and configure the driver ``config.image_cache_driver`` names.

    There is no fallback: a driver that cannot be configured raises
    ``BadDriverConfiguration`` (Glance silently fell back to sqlite).
    """
    driver: Driver
    if config.image_cache_driver == "sqlite":
        from imagecache.drivers.sqlite import SqliteDriver

        driver = SqliteDriver(config)
    elif config.image_cache_driver == "xattr":
        from imagecache.drivers.xattr import XattrDriver

        driver = XattrDriver(config)
    else:
        # Imported only here: SQLAlchemy costs start-up time a single node never needs.
        from imagecache.drivers.central import CentralDriver

        driver = CentralDriver(config)
    driver.configure()
    return driver


def create_driver(settings: Settings) -> Driver:
    """Build and configure the driver ``settings.image_cache_driver`` names (``open_driver``)."""
    return open_driver(driver_config(settings))


__all__ = ["Driver", "DriverConfig", "create_driver", "driver_config", "open_driver"]
