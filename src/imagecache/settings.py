"""Typed settings, built once from a TOML file and the environment, then passed down.

Option names follow Glance where Glance has the option (``image_cache_dir``,
``image_cache_driver``, ...), so an operator's existing values carry over.
Precedence, highest first: explicit overrides (the CLI's flags), environment
variables prefixed ``IMAGECACHE_`` (``IMAGECACHE_IMAGE_CACHE_DIR``), the TOML
file, the defaults below. Unknown keys in the file are errors, so a typo never
silently leaves a default in place.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from imagecache.errors import ConfigurationError

GiB = 1024**3
MiB = 1024**2
# The shortest secret accepted. A token is a bearer credential compared with
# what any caller sends, so it must not be guessable: 16 characters of a
# random token (``openssl rand -hex 16`` gives 32) is at least 64 bits even
# when only hex digits are used, while an empty value (an unset shell
# variable expanded to nothing), a word or a PIN is refused at start-up rather
# than quietly making every caller match it.
MIN_SECRET_LENGTH = 16

DriverName = Literal["sqlite", "xattr", "central"]
AbandonPolicy = Literal["finish", "abort"]


class Settings(BaseSettings):
    """Every knob of imagecache; one immutable value per process."""

    model_config = SettingsConfigDict(
        env_prefix="IMAGECACHE_",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    # --- Glance's own option names -------------------------------------------------
    image_cache_dir: Path | None = None
    image_cache_driver: DriverName = "sqlite"
    image_cache_max_size: int = Field(default=10 * GiB, ge=0)
    image_cache_stall_time: int = Field(default=86400, ge=0)
    image_cache_sqlite_db: str = "cache.db"
    worker_self_reference_url: str | None = None

    # --- how fills write --------------------------------------------------------------
    # Drop a fill's pages from the page cache once they are on disk and 128 MiB
    # behind it (readers following the fill stay within that). Off by default:
    # an LRU cache should keep the image it has just fetched where the next
    # request for it is cheapest, and the kernel's own LRU already keeps a
    # streaming write from pushing out pages in active use. Worth turning on
    # where images are far larger than memory, or on VMs that hand idle memory
    # back to the hypervisor, where page cache made from fresh memory costs ten
    # times more: there it made 1 GiB misses 1.43x faster (docs/service.md;
    # docs/benchmarks.md, "Miss path work, part 5").
    fill_drop_behind: bool = False

    # --- the service ----------------------------------------------------------------
    # Loopback by default: exposing a cache is an explicit decision.
    bind_host: str = "127.0.0.1"
    bind_port: int = Field(default=9393, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    # "KIND:TARGET", e.g. "directory:/srv/images" or "glance:http://127.0.0.1:9292".
    upstream: str | None = None
    upstream_timeout: float = Field(default=30.0, gt=0)
    # The base URL clients reach this service at, e.g. "https://cache.edge1:9393",
    # for the links of /versions and the redirect of GET /v2. None: each
    # request's own scheme and Host header (right unless a TLS terminator or a
    # load balancer stands in front).
    public_url: str | None = None
    admin_token: SecretStr | None = None
    # Only behind a proxy that authenticates callers and sets X-Roles itself.
    trust_identity_headers: bool = False
    # How long the origin's "this caller may download this image" is remembered.
    auth_cache_ttl: float = Field(default=30.0, ge=0)
    # What a fill does when the client that started it disconnects.
    abandoned_fill: AbandonPolicy = "finish"
    # The nice value (-20..19) of the thread that hashes a fill, None = the
    # process's own. The hash bounds a fill; on a busy machine a priority above
    # the rest of the process (negative: needs CAP_SYS_NICE or LimitNICE=)
    # keeps it on a CPU. Measured +12% on a 2-vCPU VM (docs/benchmarks.md).
    fill_hash_nice: int | None = Field(default=None, ge=-20, le=19)
    # http upstream: also fetch <url>.sha512 / .sha256 / .md5 files for checksums.
    http_checksum_sidecar: bool = False
    # s3 upstream: endpoint (None = AWS itself) and region; credentials come from
    # the standard AWS chain (env, ~/.aws, instance role), never from here.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None

    # --- capacity ---------------------------------------------------------------------
    free_space_watermark: int = Field(default=1 * GiB, ge=0)
    # An image larger than this fraction of image_cache_max_size is streamed, not cached.
    max_image_fraction: float = Field(default=0.5, gt=0, le=1)
    # Unread for this long (seconds) and not pinned: evicted. 0 = never.
    idle_ttl: int = Field(default=0, ge=0)

    # --- maintenance, all inside the service; 0 disables a job --------------------------
    prune_interval: float = Field(default=300.0, ge=0)
    clean_interval: float = Field(default=3600.0, ge=0)
    queue_interval: float = Field(default=60.0, ge=0)
    scrub_interval: float = Field(default=86400.0, ge=0)
    scrub_bytes_per_second: int = Field(default=50 * MiB, ge=0)
    prefetch_concurrency: int = Field(default=2, ge=1, le=64)
    prefetch_retries: int = Field(default=3, ge=0, le=20)

    # --- cluster ------------------------------------------------------------------------
    database_url: str | None = None
    node_heartbeat_interval: float = Field(default=5.0, gt=0)
    node_dead_after: float = Field(default=20.0, gt=0)
    cluster_token: SecretStr | None = None

    @field_validator("*")
    @classmethod
    def _a_real_secret(cls, value: Any) -> Any:
        # Every SecretStr setting, present and future, gets this check (not a
        # list of names a new secret could be left out of). The message never
        # contains the value: it ends up in logs and terminals.
        if not isinstance(value, SecretStr):
            return value
        secret = value.get_secret_value()
        if not secret.strip():
            raise ValueError("is empty or only whitespace; leave it unset or give a real secret")
        if secret != secret.strip():
            raise ValueError("starts or ends with whitespace (a copy-and-paste slip?)")
        if len(secret) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"is shorter than {MIN_SECRET_LENGTH} characters; "
                "use a random token, e.g. `openssl rand -hex 16`"
            )
        return value

    @field_validator("image_cache_sqlite_db")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        if not value or "/" in value or value in {".", ".."}:
            raise ValueError("must be a plain file name inside image_cache_dir")
        return value

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")) or "?" in value or "#" in value:
            raise ValueError("must be an http:// or https:// base URL without query")
        return value

    @field_validator("upstream")
    @classmethod
    def _kind_and_target(cls, value: str | None) -> str | None:
        if value is None:
            return None
        kind, sep, target = value.partition(":")
        if not sep or not target:
            raise ValueError("must look like KIND:TARGET, e.g. directory:/srv/images")
        if kind not in {"directory", "http", "glance", "s3"}:
            raise ValueError(f"unknown upstream kind {kind!r}; use directory, http, glance or s3")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = settings_cls.model_config.get("toml_file")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @property
    def largest_cacheable_image(self) -> int:
        """Images above this many bytes are streamed through, never cached."""
        return int(self.image_cache_max_size * self.max_image_fraction)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some values changed, validated like the original."""
        return load_settings(None, **{**self._explicit_values(), **changes})

    def _explicit_values(self) -> dict[str, Any]:
        values = self.model_dump()
        for key in secret_settings():
            secret = getattr(self, key)
            values[key] = secret.get_secret_value() if secret is not None else None
        return values


def secret_settings() -> tuple[str, ...]:
    """The names of every secret setting (every ``SecretStr`` field), in declaration order."""
    return tuple(
        name
        for name, field in Settings.model_fields.items()
        if SecretStr in get_args(field.annotation) or field.annotation is SecretStr
    )


def secret_matches(secret: SecretStr | None, given: str | None) -> bool:
    """Whether a request's ``given`` credential is ``secret``; the one comparison of secrets.

    False when the secret is unset or empty and when nothing (or an empty
    value) was given, whatever the other side: an unset secret matches no
    header, so a missing setting can never let a caller in. Constant time in
    the content (``hmac.compare_digest``).
    """
    if secret is None or given is None:
        return False
    expected = secret.get_secret_value()
    if not expected or not given:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings from a TOML file, the environment and overrides.

    Overrides whose value is ``None`` are ignored, so a CLI can pass every flag.
    Any invalid value raises ``ConfigurationError`` naming the key.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    cls: type[Settings] = Settings
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigurationError(f"config file {os.fspath(path)!r} does not exist")

        class _FromFile(Settings):
            model_config = SettingsConfigDict(toml_file=path)

        cls = _FromFile
    try:
        return cls(**given)
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc)) from exc
    except ValueError as exc:  # a TOML syntax error surfaces as ValueError
        raise ConfigurationError(f"config file {config_file}: {exc}") from exc


_SECRET_WORDS = ("token", "secret", "password")


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "settings"
        # Never echo a secret back into a log or terminal. An unknown key may be a
        # misspelt secret ("admin_tokn"), so its value is never shown either.
        if error["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown setting")
            continue
        secret = any(word in key for word in _SECRET_WORDS)
        shown = "<hidden>" if secret else repr(error.get("input"))
        problems.append(f"{key}: {error['msg']} (got {shown})")
    return "invalid settings: " + "; ".join(problems)
