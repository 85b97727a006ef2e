"""Cache drivers: where metadata lives. ``create_driver`` picks one from the settings."""

from __future__ import annotations

from imagecache.drivers.base import Driver
from imagecache.settings import Settings


def create_driver(settings: Settings) -> Driver:
    """Build and configure the driver ``settings.image_cache_driver`` names.

    There is no fallback: a driver that cannot be configured raises
    ``BadDriverConfiguration`` (Glance silently fell back to sqlite).
    """
    driver: Driver
    if settings.image_cache_driver == "sqlite":
        from imagecache.drivers.sqlite import SqliteDriver

        driver = SqliteDriver(settings)
    elif settings.image_cache_driver == "xattr":
        from imagecache.drivers.xattr import XattrDriver

        driver = XattrDriver(settings)
    else:
        # Imported only here: SQLAlchemy costs start-up time a single node never needs.
        from imagecache.drivers.central import CentralDriver

        driver = CentralDriver(settings)
    driver.configure()
    return driver


__all__ = ["Driver", "create_driver"]
