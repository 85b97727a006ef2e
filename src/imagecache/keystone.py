"""OpenStack identity: the cache's own Keystone account, and validating callers' tokens.

Two jobs, both through keystoneauth1 (the library every OpenStack client uses,
so its token caching, re-authentication and discovery behave as operators know):

- ``ServiceIdentity`` is the account imagecache acts as when nobody asks it
  to: queued and periodic fetches, prefetch, scrub re-reads. Its token is
  fetched on first use, reused, and renewed by keystoneauth when it is within
  two minutes of expiring. A failure is an ``IdentityError`` naming the setting
  to look at; it is logged once per outage and retried with a capped
  exponential backoff, so a broken password does not hammer Keystone.
- ``TokenValidator`` asks Keystone who a caller's token belongs to
  (``GET /v3/auth/tokens`` with the cache's own token and ``X-Subject-Token``,
  as keystonemiddleware does) and remembers the answer for a short TTL, never
  past the token's own expiry, in a bounded table keyed by a hash of the
  token (the token itself is never kept or logged).

keystoneauth1 is synchronous (requests); both classes are blocking and the
service calls them from its worker threads.

Credentials come as values (``KeystoneAuth``), built by the settings from a
``[keystone]`` table or from a named cloud in ``clouds.yaml`` (openstacksdk's
file, searched where openstacksdk searches: ``OS_CLIENT_CONFIG_FILE``, the
working directory, ``~/.config/openstack``, ``/etc/openstack``; ``secure.yaml``
beside it may hold the secrets).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from imagecache.errors import (
    ConfigurationError,
    IdentityError,
    IdentityRejected,
    IdentityUnavailable,
)

log = logging.getLogger(__name__)

# Glance's default policy for its cache API is role:admin; the same default here.
DEFAULT_ADMIN_ROLES = ("admin",)


@dataclass(frozen=True)
class KeystoneAuth:
    """How imagecache authenticates: a password or an application credential.

    ``setting`` names where the values came from ("keystone" for the table in
    the settings file, "clouds.yaml cloud 'edge'" for a named cloud), so that
    errors point the operator at the right place.
    """

    auth_url: str
    username: str | None = None
    user_id: str | None = None
    password: str | None = field(default=None, repr=False)
    project_name: str | None = None
    project_id: str | None = None
    user_domain_name: str | None = None
    user_domain_id: str | None = None
    project_domain_name: str | None = None
    project_domain_id: str | None = None
    application_credential_id: str | None = None
    application_credential_name: str | None = None
    application_credential_secret: str | None = field(default=None, repr=False)
    region_name: str | None = None
    interface: str = "public"
    setting: str = "keystone"

    @property
    def uses_application_credential(self) -> bool:
        return bool(self.application_credential_id or self.application_credential_name)

    def check(self) -> None:
        """Raise ConfigurationError naming what is missing; never shows a secret."""
        where = self.setting
        if not self.auth_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"{where}.auth_url: must be an http(s) URL of Keystone")
        if self.uses_application_credential:
            if not (self.application_credential_secret or "").strip():
                raise ConfigurationError(
                    f"{where}.application_credential_secret: required with an application "
                    "credential, and must not be empty"
                )
            if (
                self.application_credential_name
                and not self.application_credential_id
                and not (self.username or self.user_id)
            ):
                raise ConfigurationError(
                    f"{where}.username: an application credential given by name needs its user"
                )
            return
        if not (self.username or self.user_id):
            raise ConfigurationError(
                f"{where}.username: set username (or user_id) and password, "
                "or an application credential"
            )
        if not (self.password or "").strip():
            raise ConfigurationError(f"{where}.password: required, and must not be empty")
        if not (self.project_name or self.project_id):
            raise ConfigurationError(
                f"{where}.project_name: the service account needs a project to scope its token"
            )


# --- clouds.yaml -----------------------------------------------------------------------------

_AUTH_KEYS = {f.name for f in fields(KeystoneAuth)} - {"region_name", "interface", "setting"}


def cloud_search_path(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where openstacksdk looks for clouds.yaml, in its order."""
    env = os.environ if environ is None else environ
    paths = []
    if env.get("OS_CLIENT_CONFIG_FILE"):
        paths.append(Path(env["OS_CLIENT_CONFIG_FILE"]))
    paths += [
        Path.cwd() / "clouds.yaml",
        Path.home() / ".config" / "openstack" / "clouds.yaml",
        Path("/etc/openstack/clouds.yaml"),
    ]
    return paths


def load_cloud(name: str, paths: Iterable[Path] | None = None) -> KeystoneAuth:
    """The named cloud of the first clouds.yaml that has it, with secure.yaml merged in."""
    import yaml  # only deployments that name a cloud need PyYAML loaded

    searched = list(cloud_search_path() if paths is None else paths)
    for path in searched:
        if not path.is_file():
            continue
        try:
            clouds = (yaml.safe_load(path.read_text()) or {}).get("clouds") or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"keystone.cloud: cannot read {path}: {exc}") from exc
        if name not in clouds:
            continue
        cloud = dict(clouds[name])
        secure = path.with_name("secure.yaml")
        if secure.is_file():
            try:
                extra = ((yaml.safe_load(secure.read_text()) or {}).get("clouds") or {}).get(name)
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigurationError(f"keystone.cloud: cannot read {secure}: {exc}") from exc
            if extra:
                cloud = _merge(cloud, extra)
        return _from_cloud(name, path, cloud)
    shown = ", ".join(str(p) for p in searched)
    raise ConfigurationError(f"keystone.cloud: no cloud named {name!r} in {shown}")


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _from_cloud(name: str, path: Path, cloud: Mapping[str, Any]) -> KeystoneAuth:
    auth = cloud.get("auth") or {}
    if not isinstance(auth, Mapping) or "auth_url" not in auth:
        raise ConfigurationError(f"keystone.cloud: cloud {name!r} in {path} has no auth.auth_url")
    values = {key: str(auth[key]) for key in _AUTH_KEYS if auth.get(key) is not None}
    # openstacksdk's shorthands for the domain of both user and project.
    for short in ("domain_name", "domain_id"):
        if auth.get(short):
            values.setdefault(f"user_{short}", str(auth[short]))
            values.setdefault(f"project_{short}", str(auth[short]))
    result = KeystoneAuth(
        **values,
        region_name=cloud.get("region_name"),
        interface=str(cloud.get("interface") or "public"),
        setting=f"clouds.yaml ({path}) cloud {name!r}",
    )
    result.check()
    return result


# --- the cache's own identity ----------------------------------------------------------------


class ServiceIdentity:
    """imagecache's own Keystone session; thread-safe, blocking."""

    def __init__(
        self,
        auth: KeystoneAuth,
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        backoff: tuple[float, float] = (1.0, 60.0),
    ) -> None:
        from keystoneauth1 import session as ks_session

        auth.check()
        self.auth = auth
        self._clock = clock
        self._backoff_first, self._backoff_cap = backoff
        self._session = ks_session.Session(auth=_plugin(auth), timeout=timeout)
        self._lock = threading.Lock()
        self._failure: IdentityError | None = None
        self._retry_at = 0.0
        self._delay = 0.0
        self.attempts = 0  # calls into keystoneauth (each may reach Keystone)

    @property
    def session(self) -> Any:
        """The keystoneauth1 session (authenticated requests to other services)."""
        return self._session

    def token(self) -> str:
        """A valid token of the cache's own account; fetched or renewed as needed."""
        with self._lock:
            if self._failure is not None and self._clock() < self._retry_at:
                raise self._failure
        self.attempts += 1
        try:
            token = self._session.get_token()
        except Exception as exc:
            failure = self._translate(exc)
            self._failed(failure)
            raise failure from exc
        if not token:
            failure = IdentityRejected(f"{self.auth.setting}: Keystone returned no token")
            self._failed(failure)
            raise failure
        self._recovered()
        return str(token)

    def roles(self) -> frozenset[str]:
        """The roles of the cache's own token (e.g. to warn that it cannot read private images)."""
        from keystoneauth1.identity.base import BaseIdentityPlugin

        self.token()
        plugin = self._session.auth
        assert isinstance(plugin, BaseIdentityPlugin)  # _plugin() makes only identity plugins
        access = plugin.get_access(self._session)
        return frozenset(role.lower() for role in access.role_names or ())

    def invalidate(self) -> None:
        """Forget the current token (Glance refused it): the next call re-authenticates."""
        self._session.invalidate()

    def identity_url(self) -> str:
        """Keystone's v3 endpoint, as given (``.../v3``)."""
        url = self.auth.auth_url.rstrip("/")
        return url if url.endswith("/v3") else url + "/v3"

    def _translate(self, exc: Exception) -> IdentityError:
        from keystoneauth1 import exceptions as ks_exc

        where = self.auth.setting
        if isinstance(exc, ks_exc.Unauthorized | ks_exc.Forbidden):
            what = (
                "application_credential_id/secret"
                if self.auth.uses_application_credential
                else "username/password/project"
            )
            return IdentityRejected(f"{where}: Keystone refused the credentials ({what})")
        if isinstance(exc, ks_exc.ConnectionError | ks_exc.ConnectFailure | ks_exc.ConnectTimeout):
            return IdentityUnavailable(
                f"{where}.auth_url: Keystone unreachable ({type(exc).__name__})"
            )
        if isinstance(exc, ks_exc.HttpError):
            return IdentityUnavailable(f"{where}: Keystone answered HTTP {exc.http_status}")
        if isinstance(exc, ks_exc.ClientException):
            return IdentityUnavailable(f"{where}: {exc}")
        return IdentityUnavailable(f"{where}: {type(exc).__name__}: {exc}")

    def _failed(self, failure: IdentityError) -> None:
        with self._lock:
            first = self._failure is None
            self._delay = self._backoff_first if first else min(self._delay * 2, self._backoff_cap)
            self._retry_at = self._clock() + self._delay
            self._failure = failure
        if first:
            log.error("%s; retrying with backoff up to %.0f s", failure, self._backoff_cap)

    def _recovered(self) -> None:
        with self._lock:
            was_failing = self._failure is not None
            self._failure = None
            self._delay = 0.0
        if was_failing:
            log.warning("%s: Keystone authentication works again", self.auth.setting)


def _plugin(auth: KeystoneAuth) -> Any:
    from keystoneauth1.identity import v3

    if auth.uses_application_credential:
        return v3.ApplicationCredential(
            auth_url=auth.auth_url,
            application_credential_id=auth.application_credential_id,
            application_credential_name=auth.application_credential_name,
            application_credential_secret=auth.application_credential_secret or "",
            user_id=auth.user_id,
            username=auth.username,
            user_domain_id=auth.user_domain_id,
            user_domain_name=auth.user_domain_name,
        )
    return v3.Password(
        auth_url=auth.auth_url,
        username=auth.username,
        user_id=auth.user_id,
        password=auth.password or "",
        user_domain_id=auth.user_domain_id,
        user_domain_name=auth.user_domain_name or (None if auth.user_domain_id else "Default"),
        project_id=auth.project_id,
        project_name=auth.project_name,
        project_domain_id=auth.project_domain_id,
        project_domain_name=auth.project_domain_name
        or (None if auth.project_domain_id or auth.project_id else "Default"),
    )


# --- validating callers' tokens --------------------------------------------------------------


@dataclass(frozen=True)
class TokenInfo:
    """Who a valid token belongs to."""

    user_id: str
    project_id: str | None
    roles: frozenset[str]
    expires_at: float | None  # epoch seconds


class TokenValidator:
    """Keystone's answer about callers' tokens, remembered per token for ``ttl`` seconds.

    ``validate`` returns the token's ``TokenInfo``, or None for a token Keystone
    does not accept (unknown, expired, revoked); raises ``IdentityUnavailable``
    when Keystone cannot be asked, so that a caller is refused, never let in,
    while it is away. Refusals are remembered too, so a client retrying a bad
    token does not cost a Keystone round trip each time.
    """

    def __init__(
        self,
        identity: ServiceIdentity,
        ttl: float,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._answers: OrderedDict[str, tuple[float, TokenInfo | None]] = OrderedDict()
        self.keystone_calls = 0

    def validate(self, token: str) -> TokenInfo | None:
        if not token.strip():
            return None  # an empty header is no token at all
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self._clock()
        with self._lock:
            remembered = self._answers.get(key)
            if remembered is not None and remembered[0] > now:
                self._answers.move_to_end(key)
                return remembered[1]
        info = self._ask(token)
        until = now + self.ttl
        if info is not None and info.expires_at is not None:
            until = min(until, now + info.expires_at - self._wall_clock())
        if self.ttl > 0 and until > now:
            with self._lock:
                self._answers[key] = (until, info)
                self._answers.move_to_end(key)
                while len(self._answers) > self.max_entries:
                    self._answers.popitem(last=False)
        return info

    def _ask(self, token: str) -> TokenInfo | None:
        from keystoneauth1 import exceptions as ks_exc

        self.identity.token()  # raises IdentityError when the cache itself cannot log in
        self.keystone_calls += 1
        try:
            response = self.identity.session.get(
                self.identity.identity_url() + "/auth/tokens",
                headers={"X-Subject-Token": token},
                authenticated=True,
                raise_exc=False,
            )
        except ks_exc.ClientException as exc:
            raise IdentityUnavailable(
                f"{self.identity.auth.setting}.auth_url: Keystone unreachable "
                f"while validating a token ({type(exc).__name__})"
            ) from exc
        if response.status_code in (401, 404):
            return None  # not a token Keystone accepts (after one re-auth of our own)
        if response.status_code == 403:
            raise IdentityUnavailable(
                f"{self.identity.auth.setting}: the cache's account may not validate tokens "
                "(Keystone answered 403; give it the service or admin role)"
            )
        if response.status_code != 200:
            raise IdentityUnavailable(
                f"{self.identity.auth.setting}: Keystone answered HTTP {response.status_code} "
                "while validating a token"
            )
        return _token_info(response.json().get("token") or {})


def _token_info(body: Mapping[str, Any]) -> TokenInfo:
    expires = body.get("expires_at")
    expires_at = None
    if isinstance(expires, str):
        import datetime

        expires_at = datetime.datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp()
    project = body.get("project") or {}
    return TokenInfo(
        user_id=str((body.get("user") or {}).get("id", "")),
        project_id=project.get("id") if isinstance(project, Mapping) else None,
        roles=frozenset(
            str(role.get("name", "")).lower() for role in body.get("roles") or () if role
        ),
        expires_at=expires_at,
    )


def is_admin(info: TokenInfo | None, admin_roles: Iterable[str]) -> bool:
    """Whether a validated token carries one of the roles that make a cache admin."""
    return info is not None and bool(info.roles & {r.lower() for r in admin_roles})
