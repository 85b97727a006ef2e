"""The origin's "may this caller download" answer, remembered per (caller, image) for a TTL."""

from __future__ import annotations

from pathlib import Path

import pytest
from multidict import CIMultiDict

from clocks import ManualClock
from imagecache.errors import UpstreamError, UpstreamForbidden, UpstreamNotFound
from imagecache.server.auth import AccessCache, caller_from
from imagecache.upstreams.base import Caller
from imagecache.upstreams.directory import DirectoryUpstream


class CountingPolicy(DirectoryUpstream):
    """A real directory upstream whose access policy refuses one token and counts questions.

    The directory kind allows everyone; a Glance policy is what this stands in
    for (tests/server/test_server_glance.py asks a real Glance the same question).
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.asked = 0

    async def check_access(self, image_id: str, caller: Caller) -> None:
        self.asked += 1
        token = caller.headers.get("X-Auth-Token")
        if token == "refused":
            raise UpstreamForbidden(image_id)
        if token == "expired":
            raise UpstreamForbidden(image_id, 401)
        if token == "hidden":
            raise UpstreamNotFound(image_id)


async def test_answers_are_remembered_per_caller_and_image(tmp_path: Path) -> None:
    upstream = CountingPolicy(tmp_path)
    access = AccessCache(upstream, ttl=60)
    alice = caller_from({"X-Auth-Token": "alice"})
    refused = caller_from({"X-Auth-Token": "refused"})
    for _ in range(3):
        await access.check("img", alice)
    assert upstream.asked == 1
    await access.check("other", alice)
    assert upstream.asked == 2
    for _ in range(2):
        with pytest.raises(UpstreamForbidden):
            await access.check("img", refused)
    assert upstream.asked == 3, "a refusal is remembered too"


@pytest.mark.parametrize(
    ("token", "kind", "status"),
    [
        ("refused", UpstreamForbidden, 403),
        ("expired", UpstreamForbidden, 401),
        ("hidden", UpstreamNotFound, None),
    ],
)
async def test_a_remembered_refusal_is_a_new_exception_per_request(
    tmp_path: Path, token: str, kind: type[UpstreamError], status: int | None
) -> None:
    """The decision is kept, not the exception: one instance re-raised would pile up tracebacks."""
    upstream = CountingPolicy(tmp_path)
    access = AccessCache(upstream, ttl=60)
    caller = caller_from({"X-Auth-Token": token})
    raised: list[UpstreamError] = []
    for _ in range(3):
        with pytest.raises(kind) as caught:
            await access.check("img", caller)
        raised.append(caught.value)
    assert upstream.asked == 1, "the refusal is remembered"
    assert len({id(exc) for exc in raised}) == 3, "each refused request gets its own exception"
    assert len({str(exc) for exc in raised}) == 1
    expected = (
        "image 'img' not found upstream"
        if status is None
        else f"access to image 'img' refused upstream (HTTP {status})"
    )
    assert str(raised[0]) == expected
    if status is not None:
        assert {exc.status for exc in raised if isinstance(exc, UpstreamForbidden)} == {status}


async def test_ttl_zero_asks_every_time_and_answers_expire(tmp_path: Path) -> None:
    upstream = CountingPolicy(tmp_path)
    alice = caller_from({"X-Auth-Token": "alice"})
    every_time = AccessCache(upstream, ttl=0)
    for _ in range(3):
        await every_time.check("img", alice)
    assert upstream.asked == 3
    clock = ManualClock()
    short = AccessCache(upstream, ttl=30, clock=clock)
    await short.check("img", alice)
    clock.now += 29
    await short.check("img", alice)
    assert upstream.asked == 4
    clock.now += 1  # the TTL is out
    await short.check("img", alice)
    assert upstream.asked == 5


def test_caller_keeps_only_identity_headers() -> None:
    headers = CIMultiDict({"x-auth-token": "t", "X-Roles": "admin", "Cookie": "c", "Host": "h"})
    caller = caller_from(headers)  # request headers are case-insensitive, as here
    assert dict(caller.headers) == {"X-Auth-Token": "t", "X-Roles": "admin"}
