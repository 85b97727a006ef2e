"""Who may do what: the admin check for management, the origin's word for downloads."""

from __future__ import annotations

import enum
import ipaddress
import time
from collections.abc import Mapping

from imagecache.errors import UpstreamForbidden, UpstreamNotFound
from imagecache.settings import Settings, secret_matches
from imagecache.upstreams.base import IDENTITY_HEADERS, Caller, Upstream


class AdminDecision(enum.Enum):
    """Why a management call was let in or refused (never logged with the token)."""

    TOKEN_OK = "token"  # noqa: S105 - an outcome name, not a secret
    ROLE_OK = "role"
    LOOPBACK_OK = "loopback"
    TOKEN_WRONG = "token_wrong"  # noqa: S105
    NOT_ADMIN = "not_admin"
    NOT_LOOPBACK = "not_loopback"
    NO_TOKEN = "no_token"  # noqa: S105
    TOKEN_INVALID = "token_invalid"  # noqa: S105 - Keystone does not accept it

    @property
    def allowed(self) -> bool:
        return self in (AdminDecision.TOKEN_OK, AdminDecision.ROLE_OK, AdminDecision.LOOPBACK_OK)


def decide_admin(
    settings: Settings, headers: Mapping[str, str], remote: str | None
) -> AdminDecision:
    """Whether a caller is admin for the management API.

    A configured ``admin_token`` wins (``secret_matches``: constant time, and
    an empty header never matches); else, when
    ``trust_identity_headers`` is on, an ``admin`` role in ``X-Roles``; with
    neither configured only loopback callers are admin, so a fresh install is
    manageable from its own host and from nowhere else.
    """
    if settings.admin_token is not None:
        if secret_matches(settings.admin_token, headers.get("X-Auth-Token")):
            return AdminDecision.TOKEN_OK
        if not settings.trust_identity_headers:
            return AdminDecision.TOKEN_WRONG
    if settings.trust_identity_headers:
        roles = {role.strip().lower() for role in headers.get("X-Roles", "").split(",")}
        return AdminDecision.ROLE_OK if "admin" in roles else AdminDecision.NOT_ADMIN
    return AdminDecision.LOOPBACK_OK if is_loopback(remote) else AdminDecision.NOT_LOOPBACK


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # a unix socket peer or garbage: not provably local


def caller_from(headers: Mapping[str, str]) -> Caller:
    """The identity headers of a request, to present to the origin."""
    return Caller({name: headers[name] for name in IDENTITY_HEADERS if name in headers})


class AccessCache:
    """Remembers the origin's "may download" answer per (caller, image) for ``ttl`` seconds.

    Refusals are remembered too (as the exception to raise again): a refused
    caller hammering a cached image must not hammer the origin as well.
    Bounded: at most ``max_entries``; the oldest half is dropped when full.
    """

    def __init__(self, upstream: Upstream, ttl: float, max_entries: int = 10_000) -> None:
        self.upstream = upstream
        self.ttl = ttl
        self.max_entries = max_entries
        self._answers: dict[tuple[str, str], tuple[float, Exception | None]] = {}

    async def check(self, image_id: str, caller: Caller) -> None:
        """Raise UpstreamForbidden/UpstreamNotFound unless the origin lets ``caller`` read."""
        if self.ttl <= 0:
            await self.upstream.check_access(image_id, caller)
            return
        key = (caller.cache_key(), image_id)
        now = time.monotonic()
        remembered = self._answers.get(key)
        if remembered is not None and remembered[0] > now:
            if remembered[1] is not None:
                raise remembered[1]
            return
        refusal: Exception | None = None
        try:
            await self.upstream.check_access(image_id, caller)
        except (UpstreamForbidden, UpstreamNotFound) as exc:
            refusal = exc
        if len(self._answers) >= self.max_entries:
            for old in list(self._answers)[: self.max_entries // 2]:
                del self._answers[old]
        self._answers[key] = (now + self.ttl, refusal)
        if refusal is not None:
            raise refusal
