"""Settings: one TOML file, the environment, explicit overrides; every bad value named."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagecache import ConfigurationError, Settings, load_settings
from imagecache.settings import GiB


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own IMAGECACHE_* variables must not leak into these tests.
    import os

    for key in list(os.environ):
        if key.startswith("IMAGECACHE_"):
            monkeypatch.delenv(key)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "imagecache.toml"
    path.write_text(text)
    return path


def test_defaults_are_glances() -> None:
    settings = load_settings()
    assert settings.image_cache_dir is None
    assert settings.image_cache_driver == "sqlite"
    assert settings.image_cache_max_size == 10 * GiB
    assert settings.image_cache_stall_time == 86400
    assert settings.image_cache_sqlite_db == "cache.db"
    assert settings.bind_host == "127.0.0.1"


def test_precedence_overrides_then_env_then_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_toml(
        tmp_path,
        'image_cache_dir = "/from/file"\n'
        "image_cache_max_size = 111\n"
        "image_cache_stall_time = 222\n"
        'image_cache_driver = "xattr"\n',
    )
    monkeypatch.setenv("IMAGECACHE_IMAGE_CACHE_MAX_SIZE", "333")
    monkeypatch.setenv("IMAGECACHE_IMAGE_CACHE_STALL_TIME", "444")
    settings = load_settings(config, image_cache_stall_time=555, image_cache_driver=None)
    assert settings.image_cache_dir == Path("/from/file")  # file only
    assert settings.image_cache_max_size == 333  # env beats file
    assert settings.image_cache_stall_time == 555  # override beats env
    assert settings.image_cache_driver == "xattr"  # a None override is no override


def test_unknown_key_in_the_file_is_rejected_by_name(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "image_cache_maxsize = 5\n")
    with pytest.raises(ConfigurationError, match="image_cache_maxsize"):
        load_settings(config)


def test_unknown_override_is_rejected_by_name() -> None:
    with pytest.raises(ConfigurationError, match="no_such_option"):
        load_settings(None, no_such_option=1)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("image_cache_max_size", -1),
        ("image_cache_stall_time", "soon"),
        ("image_cache_driver", "memcached"),
        ("image_cache_sqlite_db", "../cache.db"),
        ("bind_port", 70000),
        ("max_image_fraction", 0),
        ("upstream", "ftp:/srv/images"),
        ("upstream", "no-target"),
        ("header_timeout", 0),
        ("keepalive_timeout", -1),
        ("max_connections", 0),
        ("worker_restart_limit", -1),
        ("worker_restart_window", 0),
    ],
)
def test_bad_value_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=key):
        load_settings(None, **{key: value})


def test_bad_value_in_the_environment_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGECACHE_IMAGE_CACHE_MAX_SIZE", "ten gigs")
    with pytest.raises(ConfigurationError, match="image_cache_max_size"):
        load_settings()


def test_bad_value_in_the_file_names_the_key(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "image_cache_stall_time = -5\n")
    with pytest.raises(ConfigurationError, match="image_cache_stall_time"):
        load_settings(config)


def test_missing_file_and_bad_toml_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_settings(tmp_path / "absent.toml")
    broken = write_toml(tmp_path, "image_cache_dir = \n")
    with pytest.raises(ConfigurationError, match=str(broken)):
        load_settings(broken)


@pytest.mark.parametrize("key", ["admin_token", "cluster_token"])
def test_secrets_are_never_echoed(key: str, tmp_path: Path) -> None:
    secret = "s3cr3t-value-never-shown"
    settings = load_settings(None, **{key: secret})
    assert secret not in repr(settings)
    assert secret not in str(settings)
    assert getattr(settings, key).get_secret_value() == secret
    # Kept through replace(), still hidden.
    changed = settings.replace(image_cache_stall_time=1)
    assert getattr(changed, key).get_secret_value() == secret
    # A bad value for a secret is named, its content is not.
    with pytest.raises(ConfigurationError, match=key) as caught:
        load_settings(None, **{key: ["not", secret]})
    assert secret not in str(caught.value)


def test_a_misspelt_secret_key_is_named_but_its_value_not_echoed(tmp_path: Path) -> None:
    secret = "leaked-if-echoed"
    config = write_toml(tmp_path, f'admin_tokn = "{secret}"\n')
    with pytest.raises(ConfigurationError, match="admin_tokn") as caught:
        load_settings(config)
    assert secret not in str(caught.value)


def test_settings_are_frozen_and_replace_validates() -> None:
    settings = load_settings(None, image_cache_max_size=5)
    with pytest.raises(ValueError, match="frozen"):
        settings.image_cache_max_size = 6
    assert settings.replace(image_cache_max_size=7).image_cache_max_size == 7
    assert settings.image_cache_max_size == 5
    with pytest.raises(ConfigurationError, match="image_cache_max_size"):
        settings.replace(image_cache_max_size=-1)
    assert isinstance(settings, Settings)
    assert settings.largest_cacheable_image == 2  # half of 5, rounded down
