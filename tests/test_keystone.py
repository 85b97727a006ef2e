"""The cache's own Keystone identity and callers' token validation, against a real Keystone."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from clocks import ManualClock
from imagecache.errors import ConfigurationError, IdentityRejected, IdentityUnavailable
from imagecache.keystone import (
    KeystoneAuth,
    ServiceIdentity,
    TokenValidator,
    is_admin,
    load_cloud,
)
from peers import free_port
from peers.keystone import KeystonePeer


def _password_auth(ks: KeystonePeer, **changes: str) -> KeystoneAuth:
    values = {
        "auth_url": ks.auth_url,
        "username": "imagecache",
        "password": ks.values["KEYSTONE_PEER_USER_IMAGECACHE_PASSWORD"],
        "project_name": "service",
        "user_domain_id": "default",
        "project_domain_id": "default",
        **changes,
    }
    return KeystoneAuth(**values)


def test_the_service_token_is_fetched_once_and_reused(keystone_peer: KeystonePeer) -> None:
    identity = ServiceIdentity(_password_auth(keystone_peer))
    first = identity.token()
    assert first
    assert identity.token() == first
    assert {"service", "admin"} <= identity.roles()


def test_an_application_credential_works(keystone_peer: KeystonePeer) -> None:
    auth = KeystoneAuth(
        auth_url=keystone_peer.auth_url,
        application_credential_id=keystone_peer.values["KEYSTONE_PEER_APPCRED_IMAGECACHE_ID"],
        application_credential_secret=keystone_peer.values[
            "KEYSTONE_PEER_APPCRED_IMAGECACHE_SECRET"
        ],
    )
    identity = ServiceIdentity(auth)
    assert identity.token()
    assert "service" in identity.roles()


def test_wrong_credentials_name_the_setting_log_once_and_back_off(
    keystone_peer: KeystonePeer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    identity = ServiceIdentity(
        _password_auth(keystone_peer, password="not-the-password"), clock=clock
    )
    with pytest.raises(IdentityRejected, match=r"keystone: .*username/password/project"):
        identity.token()
    assert identity.attempts == 1
    for _ in range(5):  # within the backoff: refused without asking Keystone again
        with pytest.raises(IdentityRejected):
            identity.token()
    assert identity.attempts == 1
    clock.now += 1.5  # past the first backoff step: asks again, still refused
    with pytest.raises(IdentityRejected):
        identity.token()
    assert identity.attempts == 2
    with pytest.raises(IdentityRejected):
        identity.token()  # the backoff doubled: 2 s from now
    assert identity.attempts == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "not-the-password" not in caplog.text


def test_an_unreachable_keystone_is_unavailable_not_rejected() -> None:
    auth = KeystoneAuth(
        auth_url=f"http://127.0.0.1:{free_port()}/v3",
        username="imagecache",
        password="secret-password",
        project_name="service",
    )
    with pytest.raises(IdentityUnavailable, match="auth_url: Keystone unreachable"):
        ServiceIdentity(auth, timeout=2).token()


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"password": " "}, "keystone.password"),
        ({"username": ""}, "keystone.username"),
        ({"project_name": ""}, "keystone.project_name"),
        ({"auth_url": "keystone:5000"}, "keystone.auth_url"),
    ],
)
def test_incomplete_credentials_are_refused_naming_the_key(
    changes: dict[str, str], named: str
) -> None:
    values = {
        "auth_url": "http://127.0.0.1:5000/v3",
        "username": "imagecache",
        "password": "secret-password",
        "project_name": "service",
        **changes,
    }
    with pytest.raises(ConfigurationError, match=named) as raised:
        KeystoneAuth(**values).check()
    assert "secret-password" not in str(raised.value)


def test_tokens_are_validated_and_remembered_for_the_ttl(keystone_peer: KeystonePeer) -> None:
    clock = ManualClock()
    validator = TokenValidator(ServiceIdentity(_password_auth(keystone_peer)), ttl=30, clock=clock)
    alice = validator.validate(keystone_peer.token("alice"))
    assert alice is not None
    assert alice.project_id == keystone_peer.values["KEYSTONE_PEER_PROJECT_ALPHA_ID"]
    assert "member" in alice.roles
    assert not is_admin(alice, ["admin"])
    operator_token = keystone_peer.token("operator")
    operator = validator.validate(operator_token)
    assert is_admin(operator, ["admin"])
    calls = validator.keystone_calls
    for _ in range(10):
        assert validator.validate(operator_token) == operator
    assert validator.keystone_calls == calls  # one Keystone round trip per token per TTL
    assert validator.validate("garbage-token") is None
    assert validator.validate("") is None


def test_a_revoked_token_is_refused_once_its_entry_ends(keystone_peer: KeystonePeer) -> None:
    clock = ManualClock()
    validator = TokenValidator(ServiceIdentity(_password_auth(keystone_peer)), ttl=30, clock=clock)
    token = keystone_peer.token("operator")
    assert is_admin(validator.validate(token), ["admin"])
    keystone_peer.revoke(token)
    assert is_admin(validator.validate(token), ["admin"])  # still within its TTL
    clock.now += 31
    assert validator.validate(token) is None


def test_the_table_of_answers_is_bounded(keystone_peer: KeystonePeer) -> None:
    validator = TokenValidator(
        ServiceIdentity(_password_auth(keystone_peer)), ttl=30, max_entries=3
    )
    for n in range(6):
        assert validator.validate(f"garbage-{n}") is None
    assert len(validator._answers) == 3


def test_a_named_cloud_from_clouds_yaml_with_secure_yaml(
    keystone_peer: KeystonePeer, tmp_path: Path
) -> None:
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(
        "clouds:\n"
        "  edge:\n"
        "    auth:\n"
        f"      auth_url: {keystone_peer.auth_url}\n"
        "      username: imagecache\n"
        "      project_name: service\n"
        "      user_domain_name: Default\n"
        "      project_domain_name: Default\n"
        "    region_name: RegionOne\n"
        "    interface: internal\n"
    )
    (tmp_path / "secure.yaml").write_text(
        "clouds:\n  edge:\n    auth:\n"
        f"      password: {keystone_peer.values['KEYSTONE_PEER_USER_IMAGECACHE_PASSWORD']}\n"
    )
    auth = load_cloud("edge", [tmp_path / "missing.yaml", clouds])
    assert auth.region_name == "RegionOne"
    assert auth.interface == "internal"
    assert auth.password
    assert auth.password not in repr(auth)
    assert ServiceIdentity(auth).token()
    with pytest.raises(ConfigurationError, match="no cloud named 'elsewhere'"):
        load_cloud("elsewhere", [clouds])


def test_keystone_away_refuses_and_comes_back_without_a_restart(
    keystone_short: KeystonePeer,
) -> None:
    ks = keystone_short
    try:
        clock = ManualClock()
        validator = TokenValidator(
            ServiceIdentity(_password_auth(ks), timeout=3, backoff=(0.0, 0.0)),
            ttl=30,
            clock=clock,
        )
        known = ks.token("operator")
        fresh = ks.token("alice")
        assert is_admin(validator.validate(known), ["admin"])
        ks.stop()
        assert is_admin(validator.validate(known), ["admin"])  # remembered answers stand
        with pytest.raises(IdentityUnavailable):
            validator.validate(fresh)  # never asked before: refused, not allowed
        ks.start()
        assert validator.validate(fresh) is not None
    finally:
        if not ks.running():
            ks.start()


def test_short_lived_service_tokens_are_renewed_before_they_expire(
    keystone_short: KeystonePeer, keystone_peer: KeystonePeer
) -> None:
    # keystoneauth renews a token within two minutes of its expiry; with
    # one-minute tokens every call finds its token about to expire, with
    # hour-long ones the first token is kept.
    short = ServiceIdentity(_password_auth(keystone_short))
    assert short.token() != short.token()
    long = ServiceIdentity(_password_auth(keystone_peer))
    assert long.token() == long.token()


def test_keystone_settings_refuse_a_second_door_and_never_echo_secrets() -> None:
    from imagecache.settings import load_settings

    with pytest.raises(ConfigurationError, match="admin_token: not used with") as raised:
        load_settings(
            None,
            keystone={"auth_url": "http://127.0.0.1:5000/v3", "password": "hunter2-hunter2"},
            admin_token="a-static-admin-token-0123",
        )
    assert "hunter2" not in str(raised.value)
    assert "a-static-admin-token" not in str(raised.value)
    with pytest.raises(ConfigurationError, match="trust_identity_headers: not used with"):
        load_settings(
            None, keystone={"auth_url": "http://127.0.0.1:5000/v3"}, trust_identity_headers=True
        )
    with pytest.raises(ConfigurationError, match=r"keystone\.admin_roles: .*at least one role"):
        load_settings(None, keystone={"auth_url": "http://127.0.0.1:5000/v3", "admin_roles": [" "]})


def test_keystone_settings_come_from_the_environment_nested(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from imagecache.settings import load_settings

    monkeypatch.setenv("IMAGECACHE_KEYSTONE__AUTH_URL", "http://127.0.0.1:5000/v3")
    monkeypatch.setenv("IMAGECACHE_KEYSTONE__USERNAME", "imagecache")
    monkeypatch.setenv("IMAGECACHE_KEYSTONE__PASSWORD", "imagecache-pass")
    monkeypatch.setenv("IMAGECACHE_KEYSTONE__PROJECT_NAME", "service")
    settings = load_settings(None)
    assert settings.keystone is not None
    auth = settings.keystone.auth()
    assert auth.password == "imagecache-pass"
    assert "imagecache-pass" not in repr(settings)
    assert settings.replace(workers=2).keystone == settings.keystone
