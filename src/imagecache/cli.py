"""The ``imagecache`` command: a thin click shell over the library and the REST API.

Each verb parses its arguments, calls one method of a ``CacheManager`` (local:
``manage.LocalManager``; remote: ``client.RemoteManager``) and renders the
answer as a table for people or JSON for scripts (``--json``, before or after
the verb). Errors are one line on stderr (``Error: ...``) with exit code 1;
``--debug`` shows the traceback; usage errors are one line too, exit code 2.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from imagecache import __version__
from imagecache.errors import ConfigurationError, ImageCacheError, NotInClusterMode

if TYPE_CHECKING:
    # Types only: manage.py imports the whole engine (cache, drivers, fills), which
    # a remote verb (--url) never runs; LocalManager is imported where it is built.
    from imagecache.client import RemoteManager
    from imagecache.manage import CacheManager
    from imagecache.records import Progress
    from imagecache.upstreams.base import Upstream

_ENV_URL = "IMAGECACHE_URL"
_ENV_TOKEN = "IMAGECACHE_TOKEN"  # noqa: S105 - the name of a variable, not a secret


@dataclass
class _Options:
    """The group's options, handed to every verb."""

    config: Path | None
    cache_dir: Path | None
    upstream: str | None
    url: str | None
    token: str | None
    as_json: bool
    debug: bool

    def manager(self, *, create: bool = False) -> CacheManager:
        """The verbs' manager; a local cache is made only where ``create`` says so."""
        if self.url:
            from imagecache.client import RemoteManager

            return RemoteManager(self.url, self.token)
        from imagecache.cache import ImageCache
        from imagecache.manage import LocalManager
        from imagecache.prefetch import prefetch_config
        from imagecache.settings import load_settings

        settings = load_settings(
            self.config, image_cache_dir=self.cache_dir, upstream=self.upstream
        )
        if settings.image_cache_dir is None:
            raise click.UsageError(
                "say which cache: --cache-dir DIR, --config FILE (image_cache_dir), "
                f"or --url URL for a running service (or set {_ENV_URL})"
            )
        if not create:
            _require_cache(settings.image_cache_dir, settings.image_cache_sqlite_db)
        origin: Callable[[], Upstream] | None = None
        if (spec := settings.upstream) is not None:

            def open_origin() -> Upstream:
                # Opened by the prefetch verb alone, so the other verbs never import the upstreams.
                from imagecache.upstreams import create_upstream

                return create_upstream(spec, settings)

            origin = open_origin
        return LocalManager(ImageCache(settings), prefetch_config(settings), origin)


def _require_cache(path: Path, db_name: str) -> None:
    """Refuse a directory that is not a cache, before opening would make it one.

    Opening a cache creates its directories and database, so a mistyped
    ``--cache-dir`` given to ``stats`` or ``list-cached`` used to answer "0
    images" from a brand-new empty cache, exit 0. Only the verbs that put
    images into a cache (``queue-image``, ``import-glance-cache``) and
    ``serve`` may start a new one; every other verb reads or acts on what a
    cache already holds, and an empty new cache would only hide the typo.
    """
    from imagecache.layout import SUBDIRS, is_cache_dir

    shown = os.fspath(path)
    if not path.exists():
        raise ConfigurationError(f"cache directory {shown!r} does not exist")
    if not is_cache_dir(path, db_name):
        markers = ", ".join(f"{sub}/" for sub in SUBDIRS) + f" or {db_name}"
        raise ConfigurationError(
            f"{shown!r} is not a cache directory (it has no {markers}); "
            "check --cache-dir or image_cache_dir"
        )


@contextlib.contextmanager
def _library_logging(debug: bool) -> Iterator[None]:
    """Library logs on stderr: everything with --debug, else nothing; restored afterwards.

    Without --debug every outcome a verb cares about is in its answer (a
    failed prefetch is listed with its error), and stray warnings would tear
    the progress bars apart. Restored so that in-process callers (tests, a
    Python shell) keep their own logging.
    """
    logger = logging.getLogger("imagecache")
    saved = (logger.handlers, logger.level, logger.propagate)
    if debug:
        handler: logging.Handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.NullHandler()
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.DEBUG if debug else logging.CRITICAL)
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved[0], saved[2]
        logger.setLevel(saved[1])


class _OneLineUsageError(click.UsageError):
    """A usage error shown as one line, like every other error of the CLI.

    click shows three (the usage, a hint, the error), which drowns the one
    that matters and breaks the "errors are one line" promise scripts rely on.
    """

    def show(self, file: Any = None) -> None:
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"Error: {self.format_message()}{hint}", err=True, file=file)


def _one_line(exc: click.UsageError) -> _OneLineUsageError:
    if isinstance(exc, _OneLineUsageError):
        return exc
    return _OneLineUsageError(exc.format_message(), exc.ctx)  # exit code 2, as click's


def _flag_anywhere(name: str, attribute: str, help_text: str) -> click.Option:
    """A verb's copy of a group flag, so ``imagecache stats --json`` means ``--json stats``."""

    def set_flag(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        options = ctx.find_object(_Options)
        if value and options is not None:
            setattr(options, attribute, True)

    return click.Option([name], is_flag=True, expose_value=False, callback=set_flag, help=help_text)


class _Group(click.Group):
    """Turns our errors into one clear line and exit code 1 (a traceback with --debug).

    Usage errors are one line too, exit code 2. ``--json`` and ``--debug`` are
    accepted after the verb as well as before it: every verb but ``serve``
    gets its own copy of both.
    """

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if (name or cmd.name) != "serve":
            cmd.params.append(_flag_anywhere("--json", "as_json", "Print JSON instead of tables."))
            cmd.params.append(_flag_anywhere("--debug", "debug", "Show a traceback on errors."))
        super().add_command(cmd, name)

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc) from None
        except (ImageCacheError, OSError) as exc:
            if _debug_requested(ctx):
                raise
            message = str(exc) or type(exc).__name__
            click.echo(f"Error: {message}", err=True)
            ctx.exit(1)


def _debug_requested(ctx: click.Context) -> bool:
    options = ctx.obj
    return bool(isinstance(options, _Options) and options.debug)


@click.group(cls=_Group)
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML settings file (image_cache_dir, upstream, ...).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Work on this cache directory directly.",
)
@click.option("--upstream", help="Origin for prefetch in local mode, KIND:TARGET.")
@click.option("--url", envvar=_ENV_URL, help=f"A running service instead (env {_ENV_URL}).")
@click.option("--token", envvar=_ENV_TOKEN, help=f"Its admin token (env {_ENV_TOKEN}).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
@click.version_option(__version__, prog_name="imagecache")
@click.pass_context
def main(
    ctx: click.Context,
    config: Path | None,
    cache_dir: Path | None,
    upstream: str | None,
    url: str | None,
    token: str | None,
    as_json: bool,
    debug: bool,
) -> None:
    """A Glance-compatible image cache and edge caching proxy."""
    if url and (config or cache_dir):
        # An explicit local cache beats a service URL that only came from the environment.
        if ctx.get_parameter_source("url") is click.core.ParameterSource.ENVIRONMENT:
            url = None
        else:
            raise click.UsageError("use either --url (a service) or --config/--cache-dir (local)")
    ctx.obj = _Options(config, cache_dir, upstream, url, token, as_json, debug)


@contextlib.contextmanager
def _manager(ctx: click.Context, *, create: bool = False) -> Iterator[CacheManager]:
    options = _options(ctx)
    with _library_logging(options.debug):
        manager = options.manager(create=create)
        try:
            yield manager
        finally:
            manager.close()


def _options(ctx: click.Context) -> _Options:
    options = ctx.find_object(_Options)
    assert options is not None, "main() sets the options"
    return options


# --- rendering ----------------------------------------------------------------------------


def iec(size: int | None) -> str:
    """Bytes in IEC units: 512 B, 1.5 KiB, 10.0 GiB."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def utc(epoch: float | None) -> str:
    if not epoch:
        return "-"
    moment = datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _emit(ctx: click.Context, data: Any, human: Callable[[], str]) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if _options(ctx).as_json else human())


@contextlib.contextmanager
def _progress(
    ctx: click.Context, label: str, in_bytes: bool = False
) -> Iterator[Callable[[int], Progress]]:
    """A ``start(total)`` that opens a progress bar on stderr (none with --json)."""
    with contextlib.ExitStack() as stack:

        def start(total: int) -> Progress:
            if _options(ctx).as_json:
                return lambda _item, _n: None
            bar = stack.enter_context(
                click.progressbar(
                    length=total,
                    label=label,
                    file=sys.stderr,
                    show_pos=not in_bytes,
                    show_percent=in_bytes,
                    item_show_func=_show_item,
                )
            )

            def advance(item: str, n: int) -> None:
                bar.update(n, item)

            return advance

        yield start


def _show_item(item: str | None) -> str | None:
    return item


def _confirm(force: bool, question: str) -> None:
    if not force:
        click.confirm(question, abort=True)


_force = click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")


# --- the verbs ----------------------------------------------------------------------------


@main.command("list-cached")
@click.option(
    "--all-nodes",
    is_flag=True,
    help="Every node of the cluster (cluster mode only), with a Node column.",
)
@click.pass_context
def list_cached(ctx: click.Context, all_nodes: bool) -> None:
    """List cached images."""
    if all_nodes:
        _list_cluster(ctx)
        return
    with _manager(ctx) as manager:
        images = manager.list_cached()
    rows = [
        [
            image.image_id,
            iec(image.size),
            str(image.hits),
            utc(image.last_accessed) if image.hits else "never",
            utc(image.last_modified),
            "yes" if image.pinned else "",
        ]
        for image in images
    ]
    headers = ["ID", "Size", "Hits", "Last accessed (UTC)", "Last modified (UTC)", "Pinned"]
    _emit(
        ctx,
        [image.as_dict() for image in images],
        lambda: _table(headers, rows) if rows else "No cached images.",
    )


def _list_cluster(ctx: click.Context) -> None:
    """``list-cached --all-nodes``: one row per copy, and a row for a node that holds none."""
    with _manager(ctx) as manager:
        listing = manager.list_cluster()
    rows: list[list[str]] = []
    for entry in listing:
        state = "live" if entry.node.alive else "dead"
        site = entry.node.site or "-"  # a cell of its own even for no site
        if not entry.images:
            rows.append([entry.node.url, site, state, "-", "", "", "", ""])
        for image in entry.images:
            rows.append(
                [
                    entry.node.url,
                    site,
                    state,
                    image.image_id,
                    iec(image.size),
                    str(image.hits),
                    utc(image.last_accessed) if image.hits else "never",
                    "yes" if image.pinned else "",
                ]
            )
    headers = ["Node", "Site", "State", "ID", "Size", "Hits", "Last accessed (UTC)", "Pinned"]
    _emit(
        ctx,
        {entry.node.url: entry.as_dict() for entry in listing},
        lambda: _table(headers, rows) if rows else "No nodes registered.",
    )


@main.command("list-queued")
@click.pass_context
def list_queued(ctx: click.Context) -> None:
    """List queued images, with the last prefetch error of each."""
    with _manager(ctx) as manager:
        queued = manager.list_queued()
    rows = [[q.image_id, utc(q.queued_at), str(q.attempts), q.error or ""] for q in queued]
    _emit(
        ctx,
        [q.as_dict() for q in queued],
        lambda: (
            _table(["ID", "Queued (UTC)", "Tries", "Last error"], rows)
            if rows
            else "No queued images."
        ),
    )


@main.command("queue-image")
@click.argument("image_id")
@click.option(
    "--nodes",
    help="Comma-separated node URLs, or 'all' for every live node of the cluster: "
    "queue the image on each of them (uses --token).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="With --nodes: how many nodes are asked at once.",
)
@click.pass_context
def queue_image(ctx: click.Context, image_id: str, nodes: str | None, concurrency: int) -> None:
    """Queue an image for prefetching (on one cache, or on several nodes with --nodes)."""
    if nodes is not None:
        _queue_on_nodes(ctx, image_id, nodes, concurrency)
        return
    with _manager(ctx, create=True) as manager:
        result = manager.queue_image(image_id)
    messages = {
        "queued": f"Queued image {image_id}.",
        "already_cached": f"Image {image_id} is already cached.",
        "being_cached": f"Image {image_id} is being cached now.",
        "already_queued": f"Image {image_id} is already queued.",
    }
    _emit(ctx, {"image_id": image_id, "result": result.value}, lambda: messages[result.value])


def _queue_on_nodes(ctx: click.Context, image_id: str, nodes: str, concurrency: int) -> None:
    from imagecache.client import queue_on_nodes

    urls = [url.strip() for url in nodes.split(",") if url.strip()]
    if _ALL_NODES in urls and len(urls) > 1:
        raise click.UsageError("--nodes takes either 'all' or node URLs, not both")
    if urls == [_ALL_NODES]:
        urls = _live_nodes(ctx)
    else:
        if not urls:
            raise click.UsageError("--nodes needs at least one node URL")
        if len(set(urls)) != len(urls):
            raise click.UsageError("--nodes names a node twice")
        _refuse_unused_cache(ctx)
    with _library_logging(_options(ctx).debug):
        results = queue_on_nodes(image_id, urls, _options(ctx).token, concurrency)
    rows = [[r.url, str(r.as_dict()["result"]), r.error or ""] for r in results]
    _emit(
        ctx,
        {"image_id": image_id, "nodes": {r.url: r.as_dict() for r in results}},
        lambda: _table(["Node", "Result", "Error"], rows),
    )
    if not all(r.ok for r in results):
        ctx.exit(1)


_ALL_NODES = "all"


def _refuse_unused_cache(ctx: click.Context) -> None:
    """``--nodes URL,...`` with ``--url``, ``--config`` or ``--cache-dir``: a usage error.

    The URLs are the nodes asked, so a cache named as well would go unused.
    ``--config`` could be read for an admin token, but ``admin_token`` is each
    node's own setting (only ``cluster_token`` is shared) and every remote call
    takes ``--token``, so it is refused like the others: an operator who meant
    "the nodes of this cluster" is pointed at ``--nodes all``. A ``--url`` from
    the environment was not asked for on this command line: ignored, as
    ``main()`` ignores it when a local cache is named.
    """
    options = _options(ctx)
    url_source = ctx.find_root().get_parameter_source("url")
    given = [
        name
        for name, value in (
            ("--url", options.url and url_source is not click.core.ParameterSource.ENVIRONMENT),
            ("--config", options.config),
            ("--cache-dir", options.cache_dir),
        )
        if value
    ]
    if given:
        named = "/".join(given)
        raise click.UsageError(
            f"--nodes URL,... and {named} cannot be used together: the image is queued on "
            f"the URLs given; to queue it on every live node of the cluster behind {named}, "
            "use --nodes all"
        )


def _live_nodes(ctx: click.Context) -> list[str]:
    """``--nodes all``: the live nodes, listed as ``list-cached --all-nodes`` lists them.

    That is from the central database of the local config (``--config`` or
    ``--cache-dir``), or from the service at ``--url``. Opening a node's own
    cache registers that node, so run with a node's config it is listed live
    even if its service is down; asking it then reports that it cannot be reached.
    """
    try:
        with _manager(ctx) as manager:
            listing = manager.list_cluster()
    except NotInClusterMode as exc:
        raise NotInClusterMode("queue-image --nodes all") from exc
    urls = [entry.node.url for entry in listing if entry.node.alive]
    if not urls:
        raise click.ClickException("--nodes all: no node of the cluster is alive")
    return urls


@main.command("delete-cached-image")
@click.argument("image_id")
@_force
@click.pass_context
def delete_cached_image(ctx: click.Context, image_id: str, force: bool) -> None:
    """Delete one cached image (and its queue entry)."""
    _confirm(force, f"Delete cached image {image_id}?")
    with _manager(ctx) as manager:
        manager.delete_cached_image(image_id)
    _emit(ctx, {"deleted": image_id}, lambda: f"Deleted cached image {image_id}.")


@main.command("delete-all-cached-images")
@_force
@click.pass_context
def delete_all_cached_images(ctx: click.Context, force: bool) -> None:
    """Delete every cached image."""
    _confirm(force, "Delete ALL cached images?")
    with _manager(ctx) as manager:
        count = manager.delete_all_cached_images()
    _emit(ctx, {"num_deleted": count}, lambda: f"Deleted {count} cached images.")


@main.command("delete-queued-image")
@click.argument("image_id")
@_force
@click.pass_context
def delete_queued_image(ctx: click.Context, image_id: str, force: bool) -> None:
    """Remove one image from the queue."""
    _confirm(force, f"Delete queued image {image_id}?")
    with _manager(ctx) as manager:
        manager.delete_queued_image(image_id)
    _emit(ctx, {"deleted": image_id}, lambda: f"Deleted queued image {image_id}.")


@main.command("delete-all-queued-images")
@_force
@click.pass_context
def delete_all_queued_images(ctx: click.Context, force: bool) -> None:
    """Empty the queue."""
    _confirm(force, "Delete ALL queued images?")
    with _manager(ctx) as manager:
        count = manager.delete_all_queued_images()
    _emit(ctx, {"num_deleted": count}, lambda: f"Deleted {count} queued images.")


@main.command()
@click.pass_context
def prune(ctx: click.Context) -> None:
    """Evict least recently used images until the cache is under its size limit."""
    with _manager(ctx) as manager:
        result = manager.prune()
    _emit(
        ctx,
        {"total_files_pruned": result.files, "total_bytes_pruned": result.bytes},
        lambda: f"Pruned {result.files} images, {iec(result.bytes)}.",
    )


@main.command()
@click.pass_context
def clean(ctx: click.Context) -> None:
    """Delete invalid files and stalled fills."""
    with _manager(ctx) as manager:
        result = manager.clean()
    if result is None:
        _emit(ctx, {"cleaned": True}, lambda: "Cleaned.")
        return
    _emit(
        ctx,
        {"invalid": result.invalid, "stalled": result.stalled},
        lambda: f"Removed {result.invalid} invalid files and {result.stalled} stalled fills.",
    )


@main.command()
@click.pass_context
def prefetch(ctx: click.Context) -> None:
    """Fetch every queued image into the cache now."""
    with _manager(ctx) as manager, _progress(ctx, "Prefetching") as start:
        report = manager.prefetch(start)

    def human() -> str:
        if not report.outcomes:
            return "Nothing queued."
        # One line per image; a failure carries its reason on that line.
        return "\n".join(
            f"{i}: {o.value}: {report.errors[i]}" if i in report.errors else f"{i}: {o.value}"
            for i, o in report.outcomes.items()
        )

    _emit(ctx, report.as_dict(), human)
    if not report.ok:
        ctx.exit(1)


@main.command()
@click.argument("images", nargs=-1)
@click.option(
    "--nodes",
    multiple=True,
    help="'all' (every live node), a site, or node URLs; comma-separated or repeated.",
)
@click.option("--job", "job_id", type=click.IntRange(min=1), help="Follow this job instead.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=3600.0,
    show_default=True,
    help="Stop following after this many seconds (exit code 4; the job goes on).",
)
@click.option(
    "--interval", type=click.FloatRange(min=0.05), default=1.0, help="Seconds between polls."
)
@click.option("--list", "list_jobs", is_flag=True, help="List the jobs, newest first.")
@click.option(
    "--state",
    type=click.Choice(["running", "done", "cancelled"]),
    help="With --list: only the jobs in this state.",
)
@click.option(
    "--limit", type=click.IntRange(min=1), help="With --list: at most this many (default 20)."
)
@click.option(
    "--cancel",
    "cancel_id",
    type=click.IntRange(min=1),
    help="Cancel this job: its pending items never run.",
)
@click.pass_context
def preheat(
    ctx: click.Context,
    images: tuple[str, ...],
    nodes: tuple[str, ...],
    job_id: int | None,
    timeout: float,
    interval: float,
    list_jobs: bool,
    state: str | None,
    limit: int | None,
    cancel_id: int | None,
) -> None:
    """Cache images on many nodes of a cluster and follow the job (needs --url).

    Exit code 0 when every node has every image, 3 when the job ended without,
    4 when --timeout passed first, 5 when the job was cancelled (docs/cluster.md,
    "Preheat jobs"). --list lists the jobs; --cancel JOB cancels one.
    """
    from imagecache import preheating
    from imagecache.client import RemoteManager
    from imagecache.errors import ServiceError

    options = _options(ctx)
    if not options.url:
        raise click.UsageError(
            f"preheat asks a node of the cluster: give --url URL (or set {_ENV_URL})"
        )
    targets = [t.strip() for value in nodes for t in value.split(",") if t.strip()]
    if list_jobs or cancel_id is not None:
        _preheat_jobs(ctx, RemoteManager(options.url, options.token), list_jobs, cancel_id)
        return
    if state is not None or limit is not None:
        raise click.UsageError("--state and --limit go with --list")
    if job_id is None and not (images and targets):
        raise click.UsageError("preheat needs images and --nodes, or --job ID")
    if job_id is not None and (images or targets):
        raise click.UsageError("--job follows an existing job: give no images or --nodes")
    manager = RemoteManager(options.url, options.token)
    with _library_logging(options.debug):
        if job_id is None:
            job_id = preheating.start_job(manager, list(images), targets)
            if not options.as_json:
                click.echo(f"Preheat job {job_id}", err=True)  # for --job ID later
        try:
            job, done = preheating.follow(
                lambda: preheating.read_job(manager, job_id),
                timeout=timeout,
                interval=interval,
                on_change=None if options.as_json else preheating.NodeBars(),
            )
        except ServiceError as exc:
            if exc.status is not None and exc.status < 500:
                raise  # refused or no such job: nothing to follow again
            # The service went away or failed: the nodes go on with the job.
            raise ServiceError(
                f"{exc}; job {job_id} goes on: follow it with 'imagecache preheat --job {job_id}'",
                exc.status,
            ) from exc
    if options.as_json:
        click.echo(preheating.as_json(job, done))
    else:
        headers = ["Node", "Image", "Result", "Bytes", "Reason"]
        click.echo(_table(headers, preheating.result_rows(job)))
        click.echo(preheating.summary(job, done))
    ctx.exit(preheating.exit_code(job, done))


def _preheat_jobs(
    ctx: click.Context, manager: RemoteManager, list_jobs: bool, cancel_id: int | None
) -> None:
    """``preheat --list`` and ``preheat --cancel JOB``: one call each, no following."""
    from imagecache import preheating

    params = ctx.params
    if list_jobs and cancel_id is not None:
        raise click.UsageError("--list and --cancel are separate calls: give one")
    if params["images"] or params["nodes"] or params["job_id"] is not None:
        raise click.UsageError("--list and --cancel take no images, --nodes or --job")
    if cancel_id is not None and (params["state"] is not None or params["limit"] is not None):
        raise click.UsageError("--state and --limit go with --list")
    with _library_logging(_options(ctx).debug):
        if cancel_id is not None:
            job = preheating.cancel_job(manager, cancel_id)
            _emit(ctx, job, lambda: preheating.cancel_summary(job))
            return
        jobs = preheating.list_jobs(manager, params["limit"], params["state"])
    headers = ["Id", "Created", "State", "Images", "Nodes", *preheating.LIST_COUNTS]
    _emit(
        ctx,
        {"jobs": jobs},
        lambda: (
            _table([h.capitalize() for h in headers], preheating.list_rows(jobs, utc))
            if jobs
            else "No preheat jobs."
        ),
    )


@main.command()
@click.argument("image_id", required=False)
@click.pass_context
def verify(ctx: click.Context, image_id: str | None) -> None:
    """Re-hash cached files (one, or all); quarantine those that do not match."""
    with _manager(ctx) as manager, _progress(ctx, "Verifying", in_bytes=True) as start:
        report = manager.verify(image_id, start)

    def human() -> str:
        counts: dict[str, int] = {}
        for outcome in report.outcomes.values():
            counts[outcome.value] = counts.get(outcome.value, 0) + 1
        summary = ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "nothing"
        count = len(report.outcomes)
        noun = "image" if count == 1 else "images"
        lines = [f"Verified {count} {noun} ({iec(report.bytes_read)}): {summary}."]
        lines += [f"{i}: corrupt, moved to invalid/" for i in report.corrupt]
        return "\n".join(lines)

    _emit(ctx, report.as_dict(), human)
    if not report.ok:
        ctx.exit(1)


@main.command()
@click.pass_context
def stats(ctx: click.Context) -> None:
    """Show counts, sizes and limits."""
    with _manager(ctx) as manager:
        values = manager.stats()

    def human() -> str:
        shown = {key: _stat_value(key, value) for key, value in values.items()}
        width = max(len(key) for key in shown)
        return "\n".join(f"{key.replace('_', ' ').ljust(width)}  {v}" for key, v in shown.items())

    _emit(ctx, values, human)


def _stat_value(key: str, value: Any) -> str:
    """One ``stats`` value for people: sizes in IEC units, counters by job as ``job n, ...``."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_stat_value(k, v)}" for k, v in value.items()) or "-"
    if isinstance(value, int) and key.endswith(("bytes", "size", "watermark")):
        return iec(value)
    return str(value)


@main.command()
@click.argument("image_id")
@click.pass_context
def pin(ctx: click.Context, image_id: str) -> None:
    """Exempt a cached image from eviction."""
    _set_pinned(ctx, image_id, True)


@main.command()
@click.argument("image_id")
@click.pass_context
def unpin(ctx: click.Context, image_id: str) -> None:
    """Make a pinned image evictable again."""
    _set_pinned(ctx, image_id, False)


def _set_pinned(ctx: click.Context, image_id: str, pinned: bool) -> None:
    """Pin or unpin, saying when there was nothing to do (exit 0: the state is as asked)."""
    with _manager(ctx) as manager:
        changed = manager.set_pinned(image_id, pinned)
    if changed:
        message = f"{'Pinned' if pinned else 'Unpinned'} image {image_id}."
    else:
        message = f"Image {image_id} was {'already' if pinned else 'not'} pinned."
    _emit(ctx, {"image_id": image_id, "pinned": pinned, "changed": changed}, lambda: message)


@main.command("import-glance-cache")
@click.argument("source", type=click.Path(file_okay=False, path_type=Path))
@click.option("--copy", is_flag=True, help="Copy the files, leaving the Glance cache intact.")
@click.pass_context
def import_glance_cache(ctx: click.Context, source: Path, copy: bool) -> None:
    """Adopt an existing Glance image_cache_dir (files, cache.db or xattrs, queue)."""
    with _manager(ctx, create=True) as manager:
        report = manager.import_glance_cache(source, keep_source=copy)
    adopted = sum(1 for o in report.outcomes.values() if o.value == "adopted")
    skipped = [i for i, o in report.outcomes.items() if o.value == "skipped"]

    def human() -> str:
        line = (
            f"Adopted {adopted} images ({iec(report.bytes)}) from {os.fspath(source)} "
            f"using {report.metadata_source}; queued {report.queued}."
        )
        return line + (f"\nSkipped: {', '.join(skipped)}" if skipped else "")

    _emit(ctx, report.as_dict(), human)


# --- the service --------------------------------------------------------------------------


@main.command()
@click.option(
    "--config",
    "serve_config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML settings file; the options below override it.",
)
@click.option("--host", help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, help="Port to bind (default 9393; 0 picks a free one).")
@click.option(
    "--cache-dir",
    "serve_cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The cache directory (image_cache_dir).",
)
@click.option("--upstream", "serve_upstream", help="The origin, KIND:TARGET.")
@click.option("--workers", type=int, help="Worker processes sharing the port and the cache.")
@click.pass_context
def serve(
    ctx: click.Context,
    serve_config: Path | None,
    host: str | None,
    port: int | None,
    serve_cache_dir: Path | None,
    serve_upstream: str | None,
    workers: int | None,
) -> None:
    """Run the caching proxy service until SIGTERM.

    \b
    The origin, --upstream KIND:TARGET (or upstream in --config), is one of:
      directory:/srv/images
          image files in a directory, with optional NAME.sha256/.sha512 digests
      http:https://origin.example/images/{image_id}
          a URL template; http_checksum_sidecar fetches <url>.sha256 too
      glance:http://127.0.0.1:9292
          a Glance API; it decides who may download an image, cached or not
      s3:bucket/prefix
          objects in an S3 bucket (s3_endpoint_url, s3_region; pip install imagecache[s3])

    Every setting, with its environment variable: docs/settings.md. An annotated
    settings file: etc/imagecache.toml.
    """
    # The service's imports (aiohttp, prometheus_client, the server modules) make
    # objects that live as long as the process, and the collector walked them
    # again and again while they were made: paused, the imports cost about 10%
    # less CPU (bench/startup.py, docs/benchmarks-log.md). Frozen afterwards, no
    # later collection walks them, and the pre-forked workers do not write to
    # the pages they share with the parent (the gc.freeze documentation's advice).
    gc.disable()
    try:
        from imagecache.server.run import serve as run_service
        from imagecache.settings import load_settings
    finally:
        gc.freeze()
        gc.enable()

    options = _options(ctx)
    settings = load_settings(
        serve_config or options.config,
        image_cache_dir=serve_cache_dir or options.cache_dir,
        upstream=serve_upstream or options.upstream,
        bind_host=host,
        bind_port=port,
        workers=workers,
    )
    if settings.image_cache_dir is None or settings.upstream is None:
        raise click.UsageError("serve needs --cache-dir and --upstream (or both in --config)")
    run_service(settings)
