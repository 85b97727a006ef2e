"""Who may do what: the admin check for management, the origin's word for downloads.

``admin_only`` wraps every management route (``cache_api``, ``operations``):
the admin check first, then the method, then the handler.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from imagecache.errors import (
    AccessUnconfirmed,
    AuthorisationUnavailable,
    CacheStoreError,
    IdentityError,
    MethodNotAllowed,
    NotPermitted,
    UpstreamError,
    UpstreamForbidden,
    UpstreamNotFound,
    UpstreamUnreachable,
)
from imagecache.keystone import is_admin
from imagecache.layout import explain_store_failure
from imagecache.server.state import STATE, ServiceState
from imagecache.settings import Settings, secret_matches
from imagecache.upstreams.base import IDENTITY_HEADERS, Caller, Upstream

# A management handler: the request and the process's shared state.
Handler = Callable[[web.Request, ServiceState], Awaitable[web.StreamResponse]]

V = TypeVar("V")
log = logging.getLogger(__name__)
# Offline hits come in bursts (every instance booting at a cut-off site): one
# log line per this many seconds says how many there were.
OFFLINE_LOG_INTERVAL = 1.0


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


def admin_only(
    methods: Mapping[str, Handler],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """One management route's handler: the admin check first, then the method dispatch.

    Every management route goes through this one function, so no route can
    forget the check. A failure of the cache's disk is said in an operator's
    words (``layout.explain_store_failure``) rather than as a bare 500.
    """

    async def handler(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        if state.tokens is not None:
            decision = await _keystone_admin(state, request)
        else:
            decision = decide_admin(state.settings, request.headers, request.remote)
        if not decision.allowed:
            log.info(
                "management call %s %s refused: %s", request.method, request.path, decision.value
            )
            raise NotPermitted("the cache API needs an admin caller")
        method = methods.get(request.method)
        if method is None:
            raise MethodNotAllowed(request.method, methods)
        await state.fills.settled()
        try:
            return await method(request, state)
        except (OSError, CacheStoreError) as exc:
            layout = state.cache.layout
            raise await state.fills.run(explain_store_failure, layout, exc) from exc

    return handler


async def _keystone_admin(state: ServiceState, request: web.Request) -> AdminDecision:
    """Keystone's word on the caller's token: admin when it has one of the admin roles.

    Keystone unreachable is 503 (``AuthorisationUnavailable``, logged by the
    error middleware), never a pass: management must not open up because the
    identity service is down.
    """
    assert state.tokens is not None
    assert state.settings.keystone is not None
    token = request.headers.get("X-Auth-Token", "")
    if not token.strip():
        return AdminDecision.NO_TOKEN
    try:
        info = await state.fills.run(state.tokens.validate, token)
    except IdentityError as exc:
        raise AuthorisationUnavailable(exc) from exc
    if info is None:
        return AdminDecision.TOKEN_INVALID
    if is_admin(info, state.settings.keystone.admin_roles):
        return AdminDecision.ROLE_OK
    return AdminDecision.NOT_ADMIN


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


class Access(enum.Enum):
    """How a download was let through."""

    CONFIRMED = "confirmed"  # the origin said yes (now, or within auth_cache_ttl)
    # The origin could not be asked; it said yes to this caller within offline_grace.
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class AccessDecision:
    """The origin's answer for one (caller, image), remembered as a value.

    ``status`` is what the origin said: 200 (may read), 401 or 403 (refused),
    404 (does not know the image, or hides it from this caller); ``reason`` is
    the refusal's message ("" when allowed). A remembered refusal is raised as
    a new exception per request (``refusal``): one stored instance raised
    again would grow its traceback and keep every request's frames alive.
    """

    status: int
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.status == 200

    def refusal(self, image_id: str) -> UpstreamError:
        """A fresh exception for this refusal, as the origin's check raised it."""
        if self.status == 404:
            return UpstreamNotFound(image_id)
        return UpstreamForbidden(image_id, self.status)

    @classmethod
    def of(cls, refusal: UpstreamForbidden | UpstreamNotFound | None) -> AccessDecision:
        if refusal is None:
            return ALLOWED
        status = 404 if isinstance(refusal, UpstreamNotFound) else refusal.status
        return cls(status, str(refusal))


ALLOWED = AccessDecision(200)


class AccessCache:
    """Remembers the origin's "may download" answer per (caller, image) for ``ttl`` seconds.

    Refusals are remembered too (an ``AccessDecision``, raised afresh each
    time): a refused caller hammering a cached image must not hammer the
    origin as well.
    Bounded: at most ``max_entries``; the oldest half is dropped when full.

    Offline grace (``offline_grace`` seconds, 0: off): when the origin cannot
    be asked (``UpstreamUnreachable``: refused, timed out, 5xx; never a
    401/403/404, which are answers), a hit goes to a caller whose access to
    that image the origin confirmed at most that long ago, and to nobody else
    (``AccessUnconfirmed``, a 503). A caller the origin never saw has no
    confirmation; a refusal deletes the caller's confirmation, so a caller
    refused before the cut stays refused. An offline answer is not
    remembered: the next hit asks the origin again. ``clock`` is injectable
    for tests (monotonic seconds).
    """

    def __init__(
        self,
        upstream: Upstream,
        ttl: float,
        max_entries: int = 10_000,
        *,
        offline_grace: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.ttl = ttl
        self.max_entries = max_entries
        self.offline_grace = offline_grace
        self.clock = clock
        # (caller, image) -> (until when, the origin's answer).
        self._answers: dict[tuple[str, str], tuple[float, AccessDecision]] = {}
        # When the origin last said yes, per (caller, image): kept only with a grace.
        self._confirmed: dict[tuple[str, str], float] = {}
        self._last_offline_line = -OFFLINE_LOG_INTERVAL
        self._unlogged_offline = 0

    async def check(self, image_id: str, caller: Caller, *, hit: bool = False) -> Access:
        """Raise UpstreamForbidden/UpstreamNotFound unless the origin lets ``caller`` read.

        ``hit``: the image is cached, so the offline grace applies; a miss
        needs the origin anyway. Raises ``AccessUnconfirmed`` for a hit that
        the origin cannot vouch for.
        """
        key = (caller.cache_key(), image_id)
        now = self.clock()
        remembered = self._answers.get(key) if self.ttl > 0 else None
        if remembered is not None and remembered[0] > now:
            if not remembered[1].allowed:
                raise remembered[1].refusal(image_id)
            return Access.CONFIRMED
        refusal: UpstreamForbidden | UpstreamNotFound | None = None
        try:
            await self.upstream.check_access(image_id, caller)
        except (UpstreamForbidden, UpstreamNotFound) as exc:
            refusal = exc
        except UpstreamUnreachable as exc:
            if not hit:
                raise
            confirmed = self._confirmed.get(key)
            if confirmed is not None and now - confirmed <= self.offline_grace:
                self._log_offline(image_id, now - confirmed, exc, now)
                return Access.OFFLINE
            raise AccessUnconfirmed(image_id, exc, self.offline_grace) from exc
        if self.offline_grace > 0:
            if refusal is None:
                _remember(self._confirmed, key, now, self.max_entries)
            else:
                self._confirmed.pop(key, None)
        if self.ttl > 0:
            decision = AccessDecision.of(refusal)
            _remember(self._answers, key, (now + self.ttl, decision), self.max_entries)
        if refusal is not None:
            raise refusal
        return Access.CONFIRMED

    def _log_offline(self, image_id: str, age: float, why: Exception, now: float) -> None:
        """One WARNING per offline hit, at most one line per ``OFFLINE_LOG_INTERVAL``."""
        if now - self._last_offline_line < OFFLINE_LOG_INTERVAL:
            self._unlogged_offline += 1
            return
        log.warning(
            "serving cached image %s without the origin's check (offline_grace): the caller"
            " was confirmed %.0f s ago; %s (%d more such hits since the last line)",
            image_id,
            age,
            why,
            self._unlogged_offline,
        )
        self._last_offline_line = now
        self._unlogged_offline = 0


def _remember(table: dict[tuple[str, str], V], key: tuple[str, str], value: V, most: int) -> None:
    table.pop(key, None)  # re-inserted last: the oldest-first trim keeps recent ones
    if len(table) >= most:
        for old in list(table)[: most // 2]:
            del table[old]
    table[key] = value
