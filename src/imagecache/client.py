"""A small synchronous client of the service's management API, for the CLI's remote mode.

It speaks Glance's ``/v2/cache`` routes (so it also works against a Glance API
with its cache on, for the verbs Glance has) plus our additions
(``/v2/cache/stats``, ``/v2/cache/verify``, ``/v2/cache/{id}/pin``), and the
legacy ``/v2/queued_images/{id}`` for removing one queue entry. ``urllib`` is
enough for a handful of admin calls and costs no event loop.

HTTP failures become one ``ServiceError`` with a message an operator can act
on; the token is sent as ``X-Auth-Token`` and never appears in a message.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from imagecache.errors import (
    ConfigurationError,
    ImageCacheError,
    ImageNotCached,
    ImageNotQueued,
    ServiceError,
)

# Only records (stdlib-only values) and errors: a remote call must not load the
# engine, the drivers or the settings model (tests/test_architecture.py).
from imagecache.records import (
    AdoptReport,
    CachedImage,
    CleanResult,
    NodeInfo,
    NodeListing,
    PrefetchOutcome,
    PrefetchReport,
    Progress,
    PruneResult,
    QueuedImage,
    QueueResult,
    ScrubOutcome,
    ScrubReport,
)

_TAGS = re.compile(r"<[^>]*>")
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class RemoteManager:
    """The management verbs against a running service (see ``manage.CacheManager``)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        prefetch_timeout: float = 3600.0,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigurationError(f"--url must be an http(s) URL, got {url!r}")
        self.base = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.prefetch_timeout = prefetch_timeout

    def close(self) -> None:
        """Nothing held between calls."""

    # --- transport ------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        not_found: Callable[[], ImageCacheError] | None = None,
        extension: bool = False,
    ) -> Any:
        request = urllib.request.Request(self.base + path, method=method)  # noqa: S310
        request.add_header("Accept", "application/json")
        if self.token:
            request.add_header("X-Auth-Token", self.token)
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, data=data, timeout=self.timeout) as response:  # noqa: S310
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc, method, path, not_found, extension) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServiceError(
                f"cannot reach the imagecache service at {self.base}: {reason}"
            ) from exc
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ServiceError(f"{method} {path}: the service answered something not JSON") from exc

    def _http_error(
        self,
        exc: urllib.error.HTTPError,
        method: str,
        path: str,
        not_found: Callable[[], ImageCacheError] | None,
        extension: bool,
    ) -> ImageCacheError:
        status = exc.code
        if status in (401, 403):
            hint = "check --token / IMAGECACHE_TOKEN" if self.token else "pass --token"
            return ServiceError(
                f"the service refused the request (HTTP {status}): not authorized; {hint}", status
            )
        if status in (404, 405) and extension:
            # Glance's own cache API has no such route (it answers 404 or 405).
            return ServiceError(
                f"{self.base} does not offer {method} {path} (HTTP {status}): "
                "that verb needs an imagecache service, not Glance's own cache API",
                status,
            )
        if status == 404 and not_found is not None:
            return not_found()
        detail = _error_detail(exc)
        return ServiceError(f"{method} {path} failed (HTTP {status}): {detail}", status)

    def _state(self) -> dict[str, Any]:
        # details=true: our queue details beside Glance's document (a Glance ignores it).
        state = self._call("GET", "/v2/cache?details=true")
        if not isinstance(state, dict):
            raise ServiceError("GET /v2/cache answered no cache state")
        return state

    @staticmethod
    def _quote(image_id: str) -> str:
        return urllib.parse.quote(image_id, safe="")

    # --- verbs ----------------------------------------------------------------------------

    def list_cached(self) -> list[CachedImage]:
        return [_cached(entry) for entry in self._state().get("cached_images", [])]

    def list_cluster(self) -> list[NodeListing]:

        state = self._call("GET", "/v2/cache?all_nodes=true")
        cluster = state.get("cluster") if isinstance(state, dict) else None
        if not isinstance(cluster, dict):
            raise ServiceError(
                f"{self.base} answered GET /v2/cache?all_nodes=true without a cluster listing: "
                "--all-nodes needs an imagecache service in cluster mode"
            )
        return [
            NodeListing(
                NodeInfo(
                    url=str(url),
                    heartbeat=float(node.get("heartbeat") or 0.0),
                    started=float(node.get("started") or 0.0),
                    alive=bool(node.get("alive")),
                    site=str(node.get("site") or ""),  # a service older than sites has none
                ),
                [_cached(entry) for entry in node.get("cached_images", [])],
            )
            for url, node in sorted(cluster.items())
        ]

    def list_queued(self) -> list[QueuedImage]:
        return _queued(self._state())

    def queue_image(self, image_id: str) -> QueueResult:
        state = self._state()
        if image_id in {entry["image_id"] for entry in state.get("cached_images", [])}:
            return QueueResult.ALREADY_CACHED
        if image_id in state.get("queued_images", []):
            return QueueResult.ALREADY_QUEUED
        self._call(
            "PUT",
            f"/v2/cache/{self._quote(image_id)}",
            not_found=lambda: ServiceError(f"image {image_id!r} not found upstream", 404),
        )
        return QueueResult.QUEUED

    def delete_cached_image(self, image_id: str) -> None:
        self._call(
            "DELETE",
            f"/v2/cache/{self._quote(image_id)}",
            not_found=lambda: ImageNotCached(image_id),
        )

    def delete_all_cached_images(self) -> int:
        count = len(self._state().get("cached_images", []))
        self._call("DELETE", "/v2/cache", headers={"x-image-cache-clear-target": "cache"})
        return count

    def delete_queued_image(self, image_id: str) -> None:
        if image_id not in self._state().get("queued_images", []):
            raise ImageNotQueued(image_id)
        self._call(
            "DELETE",
            f"/v2/queued_images/{self._quote(image_id)}",
            not_found=lambda: ImageNotQueued(image_id),
        )

    def delete_all_queued_images(self) -> int:
        count = len(self._state().get("queued_images", []))
        self._call("DELETE", "/v2/cache", headers={"x-image-cache-clear-target": "queue"})
        return count

    def prune(self) -> PruneResult:
        answer = self._call("POST", "/v2/cache/prune") or {}
        return PruneResult(
            int(answer.get("total_files_pruned", 0)), int(answer.get("total_bytes_pruned", 0))
        )

    def clean(self) -> CleanResult | None:
        answer = self._call("POST", "/v2/cache/clean")
        if isinstance(answer, dict) and "invalid" in answer:
            return CleanResult(int(answer["invalid"]), int(answer.get("stalled", 0)))
        return None  # Glance answers 200 with an empty body

    def prefetch(self, start: Callable[[int], Progress]) -> PrefetchReport:
        """Re-submit every queued image (``PUT /v2/cache/{id}``) and wait for the queue to drain."""
        began = time.time()
        queued = list(self._state().get("queued_images", []))
        advance = start(len(queued))
        for image_id in queued:
            self._call("PUT", f"/v2/cache/{self._quote(image_id)}")
        report = PrefetchReport()
        deadline = time.monotonic() + self.prefetch_timeout
        pending = set(queued)
        while pending:
            state = self._state()
            cached = {entry["image_id"] for entry in state.get("cached_images", [])}
            details = {q.image_id: q for q in _queued(state)}
            for image_id in sorted(pending):
                detail = details.get(image_id)
                if image_id in cached and detail is None:
                    report.outcomes[image_id] = PrefetchOutcome.CACHED
                elif detail is None:
                    report.outcomes[image_id] = PrefetchOutcome.FAILED
                    report.errors[image_id] = "removed from the queue without being cached"
                elif detail.error and (detail.failed_at or 0) >= began:
                    report.outcomes[image_id] = PrefetchOutcome.FAILED
                    report.errors[image_id] = detail.error
                else:
                    continue
                pending.discard(image_id)
                advance(image_id, 1)
            if pending:
                if time.monotonic() > deadline:
                    raise ServiceError(f"prefetch still running after {self.prefetch_timeout:.0f}s")
                time.sleep(0.5)  # polling a remote service; nothing to wait on locally
        return report

    def verify(self, image_id: str | None, start: Callable[[int], Progress]) -> ScrubReport:
        # The service verifies in one call; the bar shows its answer image by image.
        self._require_extensions()
        answer = self._call(
            "POST",
            "/v2/cache/verify",
            body={"image_id": image_id} if image_id else {},
            not_found=lambda: ImageNotCached(image_id or "?"),
        )
        report = ScrubReport(bytes_read=int(answer.get("bytes_read", 0)))
        for key, value in answer.get("images", {}).items():
            report.outcomes[key] = ScrubOutcome(value)
        advance = start(len(report.outcomes))
        for key in report.outcomes:
            advance(key, 1)
        return report

    def stats(self) -> dict[str, Any]:
        answer = self._call("GET", "/v2/cache/stats", extension=True)
        return dict(answer) if isinstance(answer, dict) else {}

    def _require_extensions(self) -> None:
        """Fail clearly, before acting, when the service is a plain Glance API."""
        self._call("GET", "/v2/cache/stats", extension=True)

    def set_pinned(self, image_id: str, pinned: bool) -> bool:
        self._require_extensions()
        # The listing says whether it was pinned before (see LocalManager.set_pinned).
        before = next((i for i in self.list_cached() if i.image_id == image_id), None)
        if before is None:
            raise ImageNotCached(image_id)
        if before.pinned == pinned:
            return False
        self._call(
            "PUT" if pinned else "DELETE",
            f"/v2/cache/{self._quote(image_id)}/pin",
            not_found=lambda: ImageNotCached(image_id),
        )
        return True

    def import_glance_cache(self, source: Path, keep_source: bool) -> AdoptReport:
        raise ConfigurationError(
            "import-glance-cache adopts files on this host's disk: run it with --cache-dir "
            "on the cache node (with the service stopped), not with --url"
        )


@dataclass(frozen=True, slots=True)
class NodeQueueResult:
    """What queueing one image on one node came to: a ``QueueResult`` or an error."""

    url: str
    result: QueueResult | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "result": self.result.value if self.result is not None else "error",
            "error": self.error,
        }


def queue_on_nodes(
    image_id: str,
    urls: Sequence[str],
    token: str | None,
    concurrency: int,
    *,
    timeout: float = 30.0,
) -> list[NodeQueueResult]:
    """Queue ``image_id`` on each node (``PUT /v2/cache/{id}``), at most ``concurrency`` at once.

    Every node gets its own answer; one that cannot be reached or refuses is
    reported and does not stop the others. Bad URLs are refused before any
    node is asked.
    """
    managers = [RemoteManager(url, token, timeout=timeout) for url in urls]

    def queue(manager: RemoteManager) -> QueueResult:
        return manager.queue_image(image_id)

    results = fan_out(managers, queue, concurrency)
    return [
        NodeQueueResult(m.base, None, str(r))
        if isinstance(r, ImageCacheError)
        else NodeQueueResult(m.base, r)
        for m, r in zip(managers, results, strict=True)
    ]


def fan_out(
    items: Sequence[_Item], call: Callable[[_Item], _Result], concurrency: int
) -> list[_Result | ImageCacheError]:
    """``call`` on every item, at most ``concurrency`` running at a time, answers in order.

    Threads, because each call is a blocking ``urllib`` request and the CLI
    has no event loop. An ``ImageCacheError`` is that item's answer; anything
    else is a bug and propagates.
    """
    if concurrency < 1:
        raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")

    def guarded(item: _Item) -> _Result | ImageCacheError:
        try:
            return call(item)
        except ImageCacheError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(guarded, items))


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The server's reason as one short line (Glance wraps it in JSON and HTML)."""
    try:
        raw = exc.read().decode("utf-8", "replace")
    except OSError:
        raw = ""
    text = raw
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        for key in ("message", "error", "detail", "title"):
            if isinstance(parsed.get(key), str):
                text = str(parsed[key])
                break
    line = " ".join(_TAGS.sub(" ", text).split())
    return line[:200] or str(exc.reason or "error")


def _cached(entry: dict[str, Any]) -> CachedImage:
    return CachedImage(
        image_id=str(entry["image_id"]),
        size=int(entry.get("size") or 0),
        hits=int(entry.get("hits") or 0),
        last_accessed=float(entry.get("last_accessed") or 0.0),
        last_modified=float(entry.get("last_modified") or 0.0),
        checksum=entry.get("checksum"),
        hash_algo=entry.get("os_hash_algo"),
        hash_value=entry.get("os_hash_value"),
        pinned=bool(entry.get("pinned", False)),
    )


def _queued(state: dict[str, Any]) -> list[QueuedImage]:
    details = state.get("queued_details")
    if isinstance(details, list):
        return [
            QueuedImage(
                image_id=str(d["image_id"]),
                queued_at=float(d.get("queued_at") or 0.0),
                error=d.get("error"),
                attempts=int(d.get("attempts") or 0),
                failed_at=d.get("failed_at"),
            )
            for d in details
        ]
    # A plain Glance answer: ids only.
    return [QueuedImage(str(image_id), 0.0) for image_id in state.get("queued_images", [])]
