"""The ``imagecache`` command: a thin click shell over the library and the REST API."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="imagecache")
def main() -> None:
    """A Glance-compatible image cache and edge caching proxy."""
