"""The ``Cache-Status`` header (RFC 9211) of image-data responses: what the cache did.

One value per response of ``GET``/``HEAD /v2/images/{id}/file``, made here
and nowhere else from the request's outcome:

=====================  ==============================================================
outcome                header value
=====================  ==============================================================
hit                    ``imagecache; hit``
hit, origin away       ``imagecache; hit; detail=offline`` (``offline_grace``)
miss, fill started     ``imagecache; fwd=miss; stored``
miss, fill joined      ``imagecache; fwd=miss; collapsed`` (here or another worker)
miss, nothing to fill  ``imagecache; fwd=miss`` (``HEAD`` or 304, not cached)
streamed uncached      ``imagecache; fwd=bypass; detail=REASON``
range ahead of a fill  ``imagecache; fwd=partial; detail=range_ahead``
=====================  ==============================================================

``REASON`` is the label of ``imagecache_bypasses_total`` (``too_large``,
``no_space``, ``cache_unavailable``, ``cache_failed``, ``fill_retries``,
``range``, ``range_ahead``), so a response and the metric name a bypass alike.

§2.1: ``hit`` means the request was not forwarded for its content. Asking a
Glance origin whether the caller may download (server/auth.py) is a
separate request, not a forward of this one, so a hit stays ``hit``, also
when under ``offline_grace`` that check could not be made. That hit is
``hit; detail=offline``, not ``fwd=stale``: ``hit`` and ``fwd`` say opposite
things (§2.1 "not forwarded", §2.2 "went forward"), the image's bytes never
went forward, and nothing stale was revalidated; ``detail`` (§2.8) is the
parameter left for such implementation-specific information.
A range served from a fill in progress is ``collapsed`` like a whole
download joining it, and a range that started the image's fill
(``range_starts_fill``) is ``stored`` like the whole download that starts
one: the request went forward as a miss and the image it asked part of is
being stored (§2.5: "stored" is about the cache storing the response, and a
part of a response counts). A range that starts too far past what a fill has
written to wait for it (fill/frontier.py) is ``fwd=partial`` (§2.2: "the
cache was able to select a partial response for the request, but it did not
contain all of the requested ranges"), with the bypass label
``range_ahead`` as its detail, since its bytes stream from the origin
uncached. With ``range_starts_fill`` off, a range with no fill to follow is
a bypass (``range``): a part of an image is never stored. A miss served through a sibling node in
cluster mode says nothing of it: which source a fill reads is decided inside
the fill's stream after the headers are chosen.
"""

from __future__ import annotations

import enum

__all__ = ["CACHE_NAME", "HEADER", "Outcome", "cache_status"]

HEADER = "Cache-Status"
# §2: the cache's name; one list member, since no cache of ours stands in front.
CACHE_NAME = "imagecache"


class Outcome(enum.Enum):
    """How the cache answered an image-data request."""

    HIT = "hit"
    OFFLINE_HIT = "offline_hit"  # a hit whose caller the origin could not check now
    STORED = "stored"  # a miss whose fill this request started, being cached
    COLLAPSED = "collapsed"  # a miss that joined a fill already in flight
    MISS = "miss"  # forwarded, and no body to store (HEAD, 304)
    BYPASS = "bypass"  # streamed from the origin without caching; needs a reason
    PARTIAL = "partial"  # a fill has part of the image, not the range's start: origin


def cache_status(outcome: Outcome, detail: str | None = None) -> str:
    """The header's value for ``outcome``; ``detail`` is a bypass's reason.

    A detail is one of our own labels, an sf-token (§2.8), so it is written
    bare, never quoted.
    """
    if outcome in (Outcome.BYPASS, Outcome.PARTIAL):
        if not detail:
            raise ValueError(f"a {outcome.value} needs its reason")
        return f"{CACHE_NAME}; fwd={outcome.value}; detail={detail}"
    if outcome is Outcome.HIT:
        return f"{CACHE_NAME}; hit"
    if outcome is Outcome.OFFLINE_HIT:
        return f"{CACHE_NAME}; hit; detail=offline"
    if outcome is Outcome.STORED:
        return f"{CACHE_NAME}; fwd=miss; stored"
    if outcome is Outcome.COLLAPSED:
        return f"{CACHE_NAME}; fwd=miss; collapsed"
    return f"{CACHE_NAME}; fwd=miss"
