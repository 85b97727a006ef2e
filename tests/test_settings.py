"""Settings: one TOML file, the environment, explicit overrides; every bad value named."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imagecache import ConfigurationError, Settings, load_settings
from imagecache.settings import GiB, MiB
from imagecache.units import (
    _SIZE_UNITS,
    DURATION_FORMS,
    SIZE_FORMS,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)


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


def test_the_log_level_variable_of_old_still_sets_the_level_in_any_case(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert (load_settings().log_level, load_settings().log_format) == ("INFO", "text")
    monkeypatch.setenv("IMAGECACHE_LOG_LEVEL", "debug")
    assert load_settings().log_level == "DEBUG"
    monkeypatch.setenv("IMAGECACHE_LOG_LEVEL", "loud")
    with pytest.raises(ConfigurationError, match=r"log_level: .*'DEBUG'"):
        load_settings()
    monkeypatch.delenv("IMAGECACHE_LOG_LEVEL")
    monkeypatch.setenv("IMAGECACHE_LOG_FORMAT", "xml")
    with pytest.raises(ConfigurationError, match=r"log_format: .*'text' or 'json'"):
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


def test_a_file_is_read_without_a_model_class_of_its_own(tmp_path: Path) -> None:
    # A subclass of Settings per file made pydantic build the whole validator
    # again at every start (issue 18, start-up); the file's values still win
    # over the defaults, and a later load without the file sees none of them.
    config = write_toml(tmp_path, "workers = 3\n")
    settings = load_settings(config)
    assert type(settings) is Settings
    assert settings.workers == 3
    assert load_settings(None).workers == 1
    assert settings.replace(bind_port=1).workers == 3


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


# --- sizes and durations with units ------------------------------------------------

KiB = 1024

SIZES = [
    (1073741824, 1073741824),
    ("1073741824", 1073741824),
    (" 42 ", 42),
    ("7B", 7),
    ("10K", 10 * KiB),
    ("10KiB", 10 * KiB),
    ("10KB", 10_000),
    ("500MB", 500_000_000),
    ("500M", 500 * MiB),
    ("500MiB", 500 * MiB),
    ("10G", 10 * GiB),
    ("10GiB", 10 * GiB),
    ("10gib", 10 * GiB),
    ("10 GiB", 10 * GiB),
    ("10GB", 10 * 1000**3),
    ("1.5G", 1536 * MiB),
    ("0.5KiB", 512),
    ("2T", 2 * 1024**4),
    ("2TiB", 2 * 1024**4),
    ("2TB", 2 * 1000**4),
]
DURATIONS = [
    (90, 90.0),
    (2.5, 2.5),
    ("90", 90.0),
    ("2.5", 2.5),
    ("250ms", 0.25),
    ("30s", 30.0),
    ("5m", 300.0),
    ("1h", 3600.0),
    ("1d", 86400.0),
    ("1w", 7 * 86400.0),
    ("1h30m", 5400.0),
    ("1m 30s", 90.0),
    ("1H", 3600.0),
    ("0.5s", 0.5),
]
BAD_SIZES = ["10 gigs", "ten", "10GiBs", "1.5.5G", "G", "", "-5G", "10Gi", True]
BAD_DURATIONS = ["5 minutes", "m5", "soon", "", "1h-30m", "-5s", "30 sec", True]


@pytest.mark.parametrize(("spelling", "expected"), SIZES, ids=repr)
@pytest.mark.parametrize("key", ["image_cache_max_size", "free_space_watermark"])
def test_a_size_parses_in_every_accepted_spelling(
    key: str, spelling: object, expected: int
) -> None:
    assert getattr(load_settings(None, **{key: spelling}), key) == expected


@pytest.mark.parametrize(("spelling", "expected"), DURATIONS, ids=repr)
@pytest.mark.parametrize("key", ["prune_interval", "upstream_timeout", "node_dead_after"])
def test_a_duration_parses_in_every_accepted_spelling(
    key: str, spelling: object, expected: float
) -> None:
    assert getattr(load_settings(None, **{key: spelling}), key) == pytest.approx(expected)


@pytest.mark.parametrize("spelling", BAD_SIZES, ids=repr)
def test_a_wrong_size_names_the_key_and_the_accepted_forms(spelling: object) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(None, image_cache_max_size=spelling)
    message = str(caught.value)
    assert message.startswith("invalid settings: image_cache_max_size: not a size; use ")
    assert SIZE_FORMS in message


@pytest.mark.parametrize("spelling", BAD_DURATIONS, ids=repr)
def test_a_wrong_duration_names_the_key_and_the_accepted_forms(spelling: object) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(None, scrub_interval=spelling)
    message = str(caught.value)
    assert message.startswith("invalid settings: scrub_interval: ")
    assert DURATION_FORMS in message


def test_whole_second_settings_take_units_but_no_fraction() -> None:
    settings = load_settings(None, image_cache_stall_time="2h", idle_ttl="30d")
    assert (settings.image_cache_stall_time, settings.idle_ttl) == (7200, 30 * 86400)
    assert isinstance(settings.idle_ttl, int)
    with pytest.raises(ConfigurationError, match=r"idle_ttl: .*whole seconds"):
        load_settings(None, idle_ttl="1.5s")


def test_units_work_in_the_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_toml(
        tmp_path,
        'image_cache_max_size = "20GiB"\nscrub_interval = "12h"\nscrub_bytes_per_second = "10MB"\n',
    )
    monkeypatch.setenv("IMAGECACHE_FREE_SPACE_WATERMARK", "512MiB")
    monkeypatch.setenv("IMAGECACHE_PRUNE_INTERVAL", "90s")
    settings = load_settings(config)
    assert settings.image_cache_max_size == 20 * GiB
    assert settings.scrub_interval == 12 * 3600
    assert settings.scrub_bytes_per_second == 10_000_000
    assert settings.free_space_watermark == 512 * MiB
    assert settings.prune_interval == 90
    monkeypatch.setenv("IMAGECACHE_PRUNE_INTERVAL", "90 sekunden")
    with pytest.raises(ConfigurationError, match=r"prune_interval: .*250ms"):
        load_settings(config)


@given(st.integers(min_value=0, max_value=2**50), st.sampled_from(sorted(_SIZE_UNITS)))
def test_any_whole_number_with_any_size_unit_parses(number: int, unit: str) -> None:
    assert parse_size(f"{number}{unit}") == number * _SIZE_UNITS[unit.lower()]
    assert parse_size(f"{number}{unit.upper()}") == number * _SIZE_UNITS[unit.lower()]


@given(st.integers(min_value=0, max_value=2**50))
def test_a_size_shown_in_its_shortest_form_reads_back_the_same(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(st.integers(min_value=0, max_value=10**11))
def test_a_duration_shown_in_its_shortest_form_reads_back_the_same(millis: int) -> None:
    seconds = millis / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-9)
