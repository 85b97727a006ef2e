"""Sites: which sibling a node fills from, given where the holders are.

A node's ``site`` label (a setting) names the place it runs in: a data centre,
an edge site. Nodes of one site reach each other over a LAN; between sites
there is a WAN, often worse than the link to the origin. So a miss fills from
a live sibling at its own site, else from the origin, and crosses to another
site's sibling only when ``sibling_cross_site`` says that link is the better
one. The empty label is "no site": a cluster where no node has one behaves as
before sites existed (every sibling is at the same site, ``''``).

Pure functions, no I/O: the service and the driver's claims ask the same
questions here, and the tests ask them directly.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

# Short and plain: it is shown in tables and logs, compared byte for byte, and
# must never need quoting (no whitespace, no '/', nothing non-ASCII).
SITE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
SITE_MAX_LENGTH = 63


@dataclass(frozen=True, slots=True)
class Sibling:
    """A node holding an image, as the holder lookup sees it."""

    url: str
    site: str = ""
    alive: bool = True


def check_site(value: str) -> str:
    """``value`` if it is a usable site label (``''`` = no site), else ValueError saying why."""
    if value == "" or SITE_PATTERN.fullmatch(value):
        return value
    if len(value) > SITE_MAX_LENGTH:
        raise ValueError(f"must be at most {SITE_MAX_LENGTH} characters")
    raise ValueError(
        "must be letters, digits, '.', '_' or '-' (starting with a letter or digit), "
        "without spaces, or empty for no site"
    )


def in_reach(site: str, my_site: str, cross_site: bool) -> bool:
    """Whether this node (at ``my_site``) fetches from a sibling at ``site``."""
    return cross_site or site == my_site


def choose_sibling(
    holders: Sequence[Sibling],
    my_site: str,
    cross_site: bool,
    skip: Collection[str] = (),
    rng: random.Random | None = None,
) -> str | None:
    """The URL to fill from, or None for the origin.

    A live holder at ``my_site`` first (at random among them, spreading the
    load); with none there, None (the origin), unless ``cross_site``: then a
    live holder at another site. URLs in ``skip`` (this node, siblings that
    already failed this fill) are never chosen, nor is a dead holder.
    """
    pick = rng.choice if rng is not None else random.choice
    usable = [h for h in holders if h.alive and h.url not in skip]
    near = [h.url for h in usable if h.site == my_site]
    if near:
        return pick(near)
    far = [h.url for h in usable if in_reach(h.site, my_site, cross_site)]
    return pick(far) if far else None


__all__ = ["SITE_MAX_LENGTH", "Sibling", "check_site", "choose_sibling", "in_reach"]
