"""The values a fill reads, as one frozen value built from the settings in one place.

``imagecache.fill.fill_config`` copies these fields out of ``Settings``;
``create_app`` and the CLI's prefetch build it once and hand it to the
coordinator, which passes the parts down to segments (fill/segments.py) and
the background bandwidth (fill/bandwidth.py, through fill/busy.py). Field
names are the settings' names, so a message naming a field names the setting
an operator changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class FillConfig:
    """Everything the fill family reads."""

    # How long a fill of another process may stall before this one gives up on it.
    upstream_timeout: float
    abandoned_fill: Literal["finish", "abort"]
    # Segmented fills (fill/segments.py).
    fill_segments: int
    fill_segment_size: int
    # The background fills' share of the link (fill/bandwidth.py): service-wide
    # rates in bytes per second, divided among ``workers`` processes.
    workers: int
    background_bandwidth: int
    background_bandwidth_while_busy: int
