"""What the range-fill tests on loopback (fill/) and on the WAN rig (wan/) share."""

from __future__ import annotations

STORED = "imagecache; fwd=miss; stored"
COLLAPSED = "imagecache; fwd=miss; collapsed"
AHEAD = "imagecache; fwd=partial; detail=range_ahead"
# "One image's worth" of origin reads, as the issue puts it.
ONE_IMAGE = 1.05


def pieces(size: int, count: int) -> list[tuple[int, int]]:
    """``count`` ranges ``[start, end)`` covering ``size`` bytes, as ``aria2c -x16`` splits."""
    step = -(-size // count)
    return [(at, min(at + step, size)) for at in range(0, size, step)]
