"""Typed settings, built once from a TOML file and the environment, then passed down.

Option names follow Glance where Glance has the option (``image_cache_dir``,
``image_cache_driver``, ...), so an operator's existing values carry over.
Precedence, highest first: explicit overrides (the CLI's flags), environment
variables prefixed ``IMAGECACHE_`` (``IMAGECACHE_IMAGE_CACHE_DIR``), the TOML
file, the defaults below. Unknown keys in the file are errors, so a typo never
silently leaves a default in place.

Each setting's docstring (the string under it) is its description in
docs/settings.md; after adding or changing one, regenerate that file with
``make settings-doc`` (``python -m imagecache.settings_doc``). The generator
reads the docstrings from this file itself: pydantic's
``use_attribute_docstrings`` finds a class's source through ``inspect`` and
tokenizes it at import, about 60 of the 100 ms this module cost every process
at start-up (cProfile and ``python -X importtime``, docs/benchmarks-log.md),
for descriptions only the generator reads.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from imagecache.errors import ConfigurationError
from imagecache.keystone import KeystoneAuth, load_cloud
from imagecache.sites import check_site
from imagecache.units import parse_duration, parse_size

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
LogFormat = Literal["text", "json"]
# Validated upper-cased: IMAGECACHE_LOG_LEVEL=debug has always worked.
LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    BeforeValidator(lambda value: value.upper() if isinstance(value, str) else value),
]
AbandonPolicy = Literal["finish", "abort"]
# The TOML file load_settings is reading, for settings_customise_sources.
_TOML_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "imagecache_settings_toml_file", default=None
)


@dataclass(frozen=True)
class Unit:
    """What a number setting counts; docs/settings.md shows it (``settings_doc``)."""

    name: str


def _whole_seconds(value: object) -> int:
    seconds = parse_duration(value)
    if not seconds.is_integer():
        raise ValueError(
            "must be whole seconds: a whole number (90) or whole numbers with units "
            "s, m, h, d, w, e.g. 90s, 5m, 1h30m, 1d"
        )
    return int(seconds)


def _per_second(value: object) -> int:
    # "50MiB/s" reads as a rate; the bare size ("50MiB") means the same, as for
    # scrub_bytes_per_second.
    if isinstance(value, str) and value.strip().lower().endswith("/s"):
        value = value.strip()[:-2]
    return parse_size(value)


# Every size and duration setting takes the spellings of units.py (10GiB, 1h30m)
# in the file, the environment and the CLI's overrides alike: the values reach
# pydantic the same way, and these validators run before the number check.
ByteSize = Annotated[int, BeforeValidator(parse_size), Unit("bytes")]
Seconds = Annotated[float, BeforeValidator(parse_duration), Unit("seconds")]
WholeSeconds = Annotated[int, BeforeValidator(_whole_seconds), Unit("seconds")]
BytesPerSecond = Annotated[int, BeforeValidator(_per_second), Unit("bytes per second")]


class KeystoneSettings(BaseModel):
    """The cache's own Keystone account, and who may manage the cache.

    Either `cloud` (a cloud named in clouds.yaml, openstacksdk's file) or the
    credentials here: a user and password with a project, or an application
    credential. Environment variables nest with a double underscore:
    `IMAGECACHE_KEYSTONE__AUTH_URL`. See docs/openstack.md.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cloud: str | None = None
    """A cloud named in clouds.yaml (searched as openstacksdk does); replaces the
    credentials below."""
    auth_url: str | None = None
    """Keystone's URL, e.g. `http://keystone:5000/v3`."""
    username: str | None = None
    """The cache's service user (with `password`)."""
    user_id: str | None = None
    """The service user by id instead of name."""
    password: SecretStr | None = None
    """The service user's password."""
    project_name: str | None = None
    """The project the cache's token is scoped to (e.g. `service`)."""
    project_id: str | None = None
    """The project by id instead of name."""
    user_domain_name: str | None = None
    """The user's domain (default `Default` when no id is given)."""
    user_domain_id: str | None = None
    """The user's domain by id."""
    project_domain_name: str | None = None
    """The project's domain (default `Default` when no id is given)."""
    project_domain_id: str | None = None
    """The project's domain by id."""
    application_credential_id: str | None = None
    """An application credential instead of a password (carries its own project)."""
    application_credential_name: str | None = None
    """An application credential by name (needs `username`)."""
    application_credential_secret: SecretStr | None = None
    """The application credential's secret."""
    region_name: str | None = None
    """The region of the catalog the cache looks in."""
    interface: Literal["public", "internal", "admin"] = "public"
    """Which catalog endpoints to use."""
    timeout: Seconds = Field(default=10.0, gt=0)
    """How long one request to Keystone may take."""
    admin_roles: tuple[str, ...] = ("admin",)
    """A caller whose token has one of these roles is an admin of the cache
    (Glance's default policy for its cache API is `role:admin`)."""
    token_cache_ttl: Seconds = Field(default=60.0, ge=0)
    """How long Keystone's answer about a caller's token is remembered: a revoked token
    keeps working on management routes at most this long (keystonemiddleware's
    default is 300 s; a cache's management is rarer and more powerful)."""
    token_cache_size: int = Field(default=10_000, ge=1)
    """At most this many callers' tokens are remembered (least recently used go first)."""

    @field_validator("*")
    @classmethod
    def _a_real_credential(cls, value: Any) -> Any:
        # Empty or blank credentials are refused like every secret; their length
        # is Keystone's policy, not ours (they are never compared with a header).
        return _checked_secret(value, 1)

    @field_validator("admin_roles")
    @classmethod
    def _some_role(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        roles = tuple(role.strip().lower() for role in value if role.strip())
        if not roles:
            raise ValueError("must name at least one role")
        return roles

    def auth(self) -> KeystoneAuth:
        """The credentials as values, checked; from clouds.yaml when ``cloud`` is set."""
        if self.cloud is not None:
            return load_cloud(self.cloud)
        if self.auth_url is None:
            raise ConfigurationError("keystone.auth_url: set it, or keystone.cloud")
        # Every credential field has the same name in both; secrets are revealed
        # only here, on their way to keystoneauth.
        values: dict[str, Any] = {}
        for field in dataclasses.fields(KeystoneAuth):
            if field.name in type(self).model_fields:
                value = getattr(self, field.name)
                values[field.name] = _revealed(value) if isinstance(value, SecretStr) else value
        auth = KeystoneAuth(**values)
        auth.check()
        return auth


def _checked_secret(value: Any, min_length: int) -> Any:
    """``value`` if it is no secret or a usable one; ValueError (never showing it) if not."""
    if not isinstance(value, SecretStr):
        return value
    secret = value.get_secret_value()
    if not secret.strip():
        raise ValueError("is empty or only whitespace; leave it unset or give a real secret")
    if secret != secret.strip():
        raise ValueError("starts or ends with whitespace (a copy-and-paste slip?)")
    if len(secret) < min_length:
        raise ValueError(
            f"is shorter than {min_length} characters; "
            "use a random token, e.g. `openssl rand -hex 16`"
        )
    return value


def _revealed(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


class Settings(BaseSettings):
    """Every knob of imagecache; one immutable value per process.

    Each setting's docstring is its description: docs/settings.md is generated
    from them (``python -m imagecache.settings_doc``), so there is one source.
    """

    model_config = SettingsConfigDict(
        env_prefix="IMAGECACHE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    # --- Glance's own option names -------------------------------------------------
    image_cache_dir: Path | None = None
    """The cache directory. The service and the CLI's local mode need it."""
    image_cache_driver: DriverName = "sqlite"
    """Where metadata lives: `sqlite` (a file in the cache directory), `xattr` (extended
    attributes of the files), `central` (a shared SQL database, for a cluster)."""
    image_cache_max_size: ByteSize = Field(default=10 * GiB, ge=0)
    """Hard limit on the bytes of cached images; fills in flight count against it."""
    image_cache_stall_time: WholeSeconds = Field(default=86400, ge=0)
    """A fill untouched this long whose writer is dead is removed by `clean`."""
    image_cache_sqlite_db: str = "cache.db"
    """The sqlite driver's database, a file name inside `image_cache_dir`."""
    worker_self_reference_url: str | None = None
    """This node's URL as its siblings reach it; its identity in cluster mode."""

    # --- how fills write --------------------------------------------------------------
    fill_drop_behind: bool = False
    """Drop a fill's pages from the page cache once they are on disk and 128 MiB behind
    it (readers following the fill stay within that). Off by default: an LRU cache should
    keep the image it has just fetched where the next request for it is cheapest, and the
    kernel's own LRU already keeps a streaming write from pushing out pages in active use.
    Worth turning on where images are far larger than memory, or on VMs that hand idle
    memory back to the hypervisor, where page cache made from fresh memory costs ten
    times more: there it made 1 GiB misses 1.43x faster (docs/service.md;
    docs/benchmarks-log.md, "Miss path work, part 5")."""

    fill_segments: int = Field(default=1, ge=1, le=64)
    """How many origin connections one fill of an `http`, `s3` or `glance` image may read at
    once, each a `Range` of the image (fill/segments.py). 1 (the default): one connection,
    as always. More is worth it where the origin limits each connection's rate (S3 and
    Swift proxies, nginx `limit_rate`) below the link's; the bytes are still hashed and
    handed to clients in order, and verified before the commit. Only images whose origin
    promises a hash (Content-MD5, sidecars, Glance's checksums) are segmented, so that a
    replaced image cannot be spliced from two versions unseen. A range that starts ahead of
    what the fill has written has its piece fetched next and is served from the fill. Costs,
    while the fill runs, a scratch file of about two pieces per connection beside it on the
    cache's disk (up to the image's size where the filesystem cannot punch holes)."""
    fill_segment_size: ByteSize = Field(default=32 * MiB, ge=64 * 1024)
    """The pieces a segmented fill cuts an image into, each one `Range` request, taken in
    order by its `fill_segments` connections (rounded down to a multiple of 64 KiB).
    Images under twice this size, or of no known size, are read over one connection.
    Smaller pieces keep the fill's hash closer behind its connections; each piece costs
    a request (a round trip to the origin)."""

    # --- the service ----------------------------------------------------------------
    bind_host: str = "127.0.0.1"
    """Address the service binds. Loopback by default: exposing a cache is an explicit
    decision."""
    bind_port: int = Field(default=9393, ge=0, le=65535)
    """Port the service binds; 0 picks a free one."""
    workers: int = Field(default=1, ge=1, le=64)
    """Worker processes sharing the port and the cache."""
    upstream: str | None = None
    """The origin, `KIND:TARGET`: `directory:/srv/images`,
    `http:https://origin.example/images/{image_id}`, `glance:http://127.0.0.1:9292` or
    `s3:bucket/prefix` (`serve --help` explains each)."""
    upstream_timeout: Seconds = Field(default=30.0, gt=0)
    """How long a read from the origin may wait for data before it fails."""
    upstream_resume_attempts: int = Field(default=5, ge=0, le=100)
    """How many times one image body whose connection to the origin broke (reset, timeout,
    short read) is resumed with a `Range` request from the last byte received, in total.
    Each resume must continue the same image (ETag, length, checksums), else the fill fails
    and nothing is cached. 0: never resume; a break fails the fill at once."""
    upstream_resume_backoff: Seconds = Field(default=0.5, ge=0)
    """Seconds before the second resume of a broken body (the first one comes at once);
    doubled for each further one, at most 30 s."""
    public_url: str | None = None
    """The base URL clients reach this service at, e.g. `https://cache.edge1:9393`, for the
    links of `/versions` and the redirect of `GET /v2`. Unset: each request's own scheme
    and Host header (right unless a TLS terminator or a load balancer stands in front)."""
    admin_token: SecretStr | None = None
    """Token (`X-Auth-Token`) that makes a caller admin on the management routes."""
    trust_identity_headers: bool = False
    """Believe `X-Roles` and friends from callers. Only behind a proxy that authenticates
    callers and sets those headers itself."""
    auth_cache_ttl: Seconds = Field(default=30.0, ge=0)
    """How long the origin's "this caller may download this image" is remembered."""
    offline_grace: Seconds = Field(default=0.0, ge=0)
    """A security trade-off, off by default (0): when a Glance origin cannot be reached
    (refused, timed out, 5xx; never when it answers 401/403/404), a cached image is still
    served to a caller whose access to it the origin confirmed at most this long ago.
    Access revoked at the origin during that time is not seen (docs/service.md, "Offline
    grace"). 0: every hit the origin cannot check is refused with 503."""
    metadata_cache_ttl: Seconds = Field(default=10.0, ge=0)
    """How long the origin's answer about an image (size, checksums, status) is remembered
    and shared by every request and worker process, so a herd of clients on one cold image
    costs the origin one metadata read, not one per client. Answers that refuse (not
    found, forbidden, not active) are remembered for at most 2 s of it, so an image
    uploaded or activated just after a refusal is served soon. Errors are never
    remembered. A Glance origin's answers depend on who asks: only an answer that
    describes the image's data is shared, and every caller still passes its own access
    check (`auth_cache_ttl`). 0: every miss asks the origin itself."""
    abandoned_fill: AbandonPolicy = "finish"
    """What a fill does when the client that started it disconnects: `finish` it for the
    cache, or `abort` it."""
    range_starts_fill: bool = True
    """A `Range` request for an uncached image starts the image's fill, as a whole
    download does, and is served from the growing file as its bytes land (Varnish and
    nginx do the same), so clients that read only ranges (aria2c, qemu-img over HTTP)
    cost the origin one image and leave it cached. Off: such a range is read from the
    origin and nothing is cached; a range still shares a fill that is already running."""
    range_wait_limit: Seconds = Field(default=30.0, ge=0)
    """A range that starts past what a fill has written waits for the fill when, at the
    fill's measured rate, it gets there within this many seconds; otherwise (a slow or
    stalled fill, a range far ahead of it) the range is read from the origin, costing
    the origin those bytes again. A waiting range has no headers yet: keep this below the
    shortest whole-request timeout of your clients (qemu's curl driver: 5 s by default).
    0: such a range never waits."""
    fill_hash_nice: int | None = Field(default=None, ge=-20, le=19)
    """The nice value (-20..19) of the thread that hashes a fill; unset = the process's
    own. The hash bounds a fill; on a busy machine a priority above the rest of the
    process (negative: needs CAP_SYS_NICE or LimitNICE=) keeps it on a CPU. Measured +12%
    on a 2-vCPU VM (docs/benchmarks-log.md)."""
    http_checksum_sidecar: bool = False
    """http upstream: also fetch `<url>.sha512` / `.sha256` / `.md5` files for checksums."""
    s3_endpoint_url: str | None = None
    """s3 upstream: the endpoint; unset = AWS itself. Credentials come from the standard
    AWS chain (environment, ~/.aws, instance role), never from here."""
    s3_region: str | None = None
    """s3 upstream: the region."""

    # --- capacity ---------------------------------------------------------------------
    free_space_watermark: ByteSize = Field(default=1 * GiB, ge=0)
    """Fills never take the cache's filesystem below this much free space."""
    max_image_fraction: float = Field(default=0.5, gt=0, le=1)
    """An image larger than this fraction of `image_cache_max_size` is streamed, not
    cached."""
    idle_ttl: WholeSeconds = Field(default=0, ge=0)
    """Unread for this long and not pinned: evicted by the scheduled prune. 0 = never."""

    # --- maintenance, all inside the service; 0 disables a job --------------------------
    prune_interval: Seconds = Field(default=300.0, ge=0)
    """How often the service prunes to the size limit (and `idle_ttl`); 0 = never."""
    clean_interval: Seconds = Field(default=3600.0, ge=0)
    """How often the service removes `invalid/` files and stalled fills; 0 = never."""
    queue_interval: Seconds = Field(default=60.0, ge=0)
    """How often the service retries queued images; 0 = never."""
    scrub_interval: Seconds = Field(default=86400.0, ge=0)
    """How often the service re-hashes cached files; 0 = never."""
    scrub_bytes_per_second: ByteSize = Field(default=50 * MiB, ge=0)
    """How fast the scheduled scrub reads (bytes per second, e.g. `50MiB`); 0 = no limit."""
    prefetch_concurrency: int = Field(default=2, ge=1, le=64)
    """Queued images fetched at once."""
    prefetch_retries: int = Field(default=3, ge=0, le=20)
    """Retries of a transient origin failure, with exponential backoff."""

    # --- origin bandwidth for users first (fill/bandwidth.py) ---------------------------
    background_bandwidth: BytesPerSecond = Field(default=0, ge=0)
    """The most origin bandwidth background fills (the queue worker's and prefetch's, and
    fills whose clients all left) may take together, e.g. `100MiB/s` (or `100MiB`); each
    worker process gets an equal share and does not lend it. 0 (the default): no cap, since
    the cache cannot know its link; clients still come first by
    `background_bandwidth_while_busy`."""
    background_bandwidth_while_busy: BytesPerSecond = Field(default=1 * MiB, ge=0)
    """What background fills of a worker process may take, at most, while that process
    has an on-demand fill running or a client waiting on a fill (shared by the workers as
    `background_bandwidth` is). The default, 1 MiB/s, leaves nearly all of an edge link to
    the clients while keeping the background fills' connections alive (an origin or proxy
    drops an idle one). 0: pause background fills until those clients are served."""

    # --- cluster ------------------------------------------------------------------------
    database_url: str | None = None
    """The central driver's database, e.g.
    `postgresql+psycopg://postgres@127.0.0.1:5432/imagecache`."""
    database_timeout: Seconds = Field(default=5.0, gt=0)
    """How long the central driver waits to connect to its database (and for sent data to be
    acknowledged) before it counts the database as away and serves from its local records."""
    node_heartbeat_interval: Seconds = Field(default=5.0, gt=0)
    """How often a node records that it is alive."""
    node_dead_after: Seconds = Field(default=20.0, gt=0)
    """A node whose heartbeat is older than this is no longer offered as a source."""
    cluster_token: SecretStr | None = None
    """Shared secret nodes send each other (`X-Imagecache-Cluster-Token`) to fetch images
    from a sibling."""
    site: str = ""
    """This node's site (data centre, edge site), e.g. `edge-paris-1`: up to 63 letters,
    digits, `.`, `_` or `-`. A miss fills from a live sibling at the same site, else from
    the origin (docs/cluster.md, "Sites"). Empty (the default): no site; nodes without one
    are all at the same site, as before sites existed."""
    sibling_cross_site: bool = False
    """Also fill from a sibling at another site when none at this node's site holds the
    image, before the origin. For sites whose link to each other is better than their
    link to the origin."""

    # --- OpenStack identity -------------------------------------------------------------
    keystone: KeystoneSettings | None = None
    """The `[keystone]` table (below): the cache's own account for what it does on its
    own, and management authorised by callers' Keystone roles (docs/openstack.md)."""

    # --- connections and workers (docs/service.md, "Timeouts and limits") ---------------
    header_timeout: Seconds = Field(default=15.0, gt=0, le=3600)
    """A complete request header must arrive within this long of the connection opening
    (or of the first byte of a later request on it); slower connections are closed."""
    keepalive_timeout: Seconds = Field(default=75.0, gt=0, le=86400)
    """An idle keep-alive connection is closed after this long."""
    max_connections: int = Field(default=1024, ge=1, le=1_000_000)
    """Connections one worker serves at once; beyond it a new one gets a 503 (lowered at
    start-up to what the open-file limit can carry)."""
    worker_restart_limit: int = Field(default=5, ge=0, le=1000)
    """The pre-fork parent gives up (exits 1) after this many worker restarts within
    `worker_restart_window`."""
    worker_restart_window: Seconds = Field(default=60.0, gt=0)
    """The window over which worker restarts are counted."""

    # --- logging (docs/service.md, "The access log") --------------------------------------
    log_level: LogLevel = "INFO"
    """The least severe level the service logs: `DEBUG`, `INFO`, `WARNING`, `ERROR` or
    `CRITICAL` (any case). Access lines are `INFO`: above it, they are not written."""
    log_format: LogFormat = "text"
    """`text`: one escaped line per record (`TIME PID LEVEL LOGGER: MESSAGE`). `json`: one
    JSON object per line with the same fields (`timestamp`, `pid`, `level`, `logger`,
    `message`), and for an access line its fields as keys of their own (`remote`,
    `method`, `path`, `status`, `bytes`, `completed`, `request_id`, `duration`, `cache`)."""

    @field_validator("*")
    @classmethod
    def _a_real_secret(cls, value: Any) -> Any:
        # Every SecretStr setting, present and future, gets this check (not a
        # list of names a new secret could be left out of). The message never
        # contains the value: it ends up in logs and terminals.
        return _checked_secret(value, MIN_SECRET_LENGTH)

    @field_validator("image_cache_sqlite_db")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        if not value or "/" in value or value in {".", ".."}:
            raise ValueError("must be a plain file name inside image_cache_dir")
        return value

    @field_validator("site")
    @classmethod
    def _site_label(cls, value: str) -> str:
        return check_site(value)

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

    @model_validator(mode="after")
    def _one_authority_for_management(self) -> Settings:
        # With Keystone, Keystone alone says who may manage the cache: a static
        # token shared by operators, or headers trusted from a proxy, beside it
        # would be a second door that Keystone's revocations do not close.
        if self.keystone is not None:
            if self.admin_token is not None:
                raise ValueError("admin_token: not used with [keystone]; remove one of them")
            if self.trust_identity_headers:
                raise ValueError(
                    "trust_identity_headers: not used with [keystone]; remove one of them"
                )
        return self

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
        toml_file = _TOML_FILE.get()
        if toml_file is not None:
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
        if self.keystone is not None:
            table = values["keystone"]
            for key in ("password", "application_credential_secret"):
                table[key] = _revealed(getattr(self.keystone, key))
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
    path = None
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigurationError(f"config file {os.fspath(path)!r} does not exist")
    # The file reaches settings_customise_sources through a context variable, not
    # a subclass of Settings naming it: pydantic builds a class's validator anew
    # for every subclass, and that cost each start as much as the import of this
    # module (docs/benchmarks-log.md, start-up).
    reset = _TOML_FILE.set(path)
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc)) from exc
    except ValueError as exc:  # a TOML syntax error surfaces as ValueError
        raise ConfigurationError(f"config file {config_file}: {exc}") from exc
    finally:
        _TOML_FILE.reset(reset)


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
        # pydantic prefixes a validator's own message with "Value error, "; it says nothing.
        message = error["msg"].removeprefix("Value error, ")
        given = error.get("input")
        if isinstance(given, dict | list | tuple) or not error["loc"]:
            # A whole table or the whole settings: it may hold secrets.
            problems.append(f"{key}: {message}")
            continue
        shown = "<hidden>" if secret else repr(given)
        problems.append(f"{key}: {message} (got {shown})")
    return "invalid settings: " + "; ".join(problems)
