"""``imagecache preheat``: start a preheat job on a service, follow it to the end, say how it went.

The job runs on the nodes themselves (``server/preheat.py``); this side only
talks to one service over REST (``POST /v2/cache/preheat``, then ``GET
/v2/cache/preheat/{id}`` every ``interval`` seconds), draws a progress bar per
node on stderr, and prints the result per node and image, or the job's JSON.

Exit codes (documented in docs/cluster.md, "Preheat jobs"):

- ``0``: the job is done and every node has every image (cached, or skipped
  because it had it already);
- ``1``: an error before the job could be followed (the service unreachable,
  a bad request: unknown node or site, no cluster mode, ...), as every verb;
- ``2``: a usage error, as every verb;
- ``3``: the job is done and some node lacks some image (failed, or its node
  is not live);
- ``4``: ``--timeout`` passed before the job was done (it goes on running on
  the nodes; ``imagecache preheat --job ID`` follows it again);
- ``5``: the job was cancelled (``imagecache preheat --cancel ID``, or
  ``DELETE /v2/cache/preheat/{id}``) before every node had every image.

``--list`` (``GET /v2/cache/preheat``) and ``--cancel`` exit 0, or 1 as any
error: an unknown job, a job already finished (nothing to cancel).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
from collections.abc import Callable
from typing import IO, Any

from imagecache.client import RemoteManager
from imagecache.errors import ServiceError

EXIT_OK = 0
EXIT_INCOMPLETE = 3
EXIT_TIMEOUT = 4
EXIT_CANCELLED = 5
# What the service answers for a job that will not change any more by itself.
_ENDED = frozenset({"done", "cancelled"})

BAR_WIDTH = 20
# The count columns of the list, in the order an operator reads a job's progress.
LIST_COUNTS = ("cached", "skipped", "failed", "pending", "running", "cancelled")


def start_job(manager: RemoteManager, images: list[str], nodes: list[str]) -> int:
    answer = manager._call(
        "POST", "/v2/cache/preheat", {"images": images, "nodes": nodes}, extension=True
    )
    if not isinstance(answer, dict) or not isinstance(answer.get("id"), int):
        raise ServiceError("POST /v2/cache/preheat answered no job id")
    return int(answer["id"])


def read_job(manager: RemoteManager, job_id: int) -> dict[str, Any]:
    return _job_call(manager, "GET", job_id)


def _job_call(manager: RemoteManager, method: str, job_id: int) -> dict[str, Any]:
    def missing() -> ServiceError:
        return ServiceError(f"no preheat job {job_id} at {manager.base}", 404)

    # Not an "extension" call: its 404 is an unknown job (a Glance, which has no
    # such route, never gave out a job id; start_job says so).
    job = manager._call(method, f"/v2/cache/preheat/{job_id}", not_found=missing)
    if not isinstance(job, dict) or "nodes" not in job:
        raise ServiceError(f"{method} /v2/cache/preheat/{job_id} answered no job")
    return job


def list_jobs(manager: RemoteManager, limit: int | None, state: str | None) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode(
        {k: v for k, v in (("limit", limit), ("state", state)) if v is not None}
    )
    path = "/v2/cache/preheat" + (f"?{query}" if query else "")
    answer = manager._call("GET", path, extension=True)
    jobs = answer.get("jobs") if isinstance(answer, dict) else None
    if not isinstance(jobs, list):
        raise ServiceError("GET /v2/cache/preheat answered no job list")
    return [job for job in jobs if isinstance(job, dict)]


def cancel_job(manager: RemoteManager, job_id: int) -> dict[str, Any]:
    """Cancel the job; the service answers it, cancelled (docs/cluster.md, "Preheat jobs")."""
    return _job_call(manager, "DELETE", job_id)


def list_rows(jobs: list[dict[str, Any]], when: Callable[[float], str]) -> list[list[str]]:
    """Id, created, state, images, target and counts of each job, for the list's table."""
    rows = []
    for job in jobs:
        counts = job.get("counts", {})
        rows.append(
            [
                str(job.get("id")),
                when(float(job.get("created_at") or 0)),
                str(job.get("state", "?")),
                _few(job.get("images", [])),
                _few(job.get("target", [])),
                *(str(counts.get(state, 0)) for state in LIST_COUNTS),
            ]
        )
    return rows


def _few(values: list[Any], shown: int = 3) -> str:
    """A list for one table cell: the first few, then how many more (a job has up to 100)."""
    head = ",".join(str(v) for v in values[:shown])
    return head + (f" +{len(values) - shown}" if len(values) > shown else "")


def follow(
    read: Callable[[], dict[str, Any]],
    *,
    timeout: float,
    interval: float,
    on_change: Callable[[dict[str, Any]], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[dict[str, Any], bool]:
    """Read the job until it is done or ``timeout`` passes: the last reading, and if done."""
    deadline = clock() + timeout
    while True:
        job = read()
        if on_change is not None:
            on_change(job)
        if job.get("state") in _ENDED:
            return job, True
        left = deadline - clock()
        if left <= 0:
            return job, False
        sleep(min(interval, left))


def exit_code(job: dict[str, Any], done: bool) -> int:
    if not done:
        return EXIT_TIMEOUT
    if job.get("ok"):
        return EXIT_OK  # cancelled too late to matter: every node has every image
    return EXIT_CANCELLED if job.get("state") == "cancelled" else EXIT_INCOMPLETE


class NodeBars:
    """One progress line per node on a terminal, redrawn in place; elsewhere, one line per change.

    A line is ``URL [###xx-----] finished/total`` and the states of its items:
    ``#`` an image the node has, ``x`` one it ended without, ``-`` one to come.
    Off a terminal (a log, a CI job) redrawing would only garble the output,
    so each node's line is written again only when its count moves.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self._drawn = 0
        self._last: dict[str, tuple[int, int]] = {}

    def __call__(self, job: dict[str, Any]) -> None:
        nodes = job.get("nodes", {})
        width = max((len(url) for url in nodes), default=0)
        lines = []
        for url, node in sorted(nodes.items()):
            line = _bar_line(url.ljust(width), node)
            counts = (int(node.get("finished", 0)), int(node.get("total", 0)))
            if self.tty or self._last.get(url) != counts:
                lines.append(line)
            self._last[url] = counts
        if self.tty:
            if self._drawn:
                self.stream.write(f"\x1b[{self._drawn}F")  # back to the first bar
            self.stream.write("".join(f"\x1b[2K{line}\n" for line in lines))
            self._drawn = len(lines)
        else:
            self.stream.write("".join(f"{line}\n" for line in lines))
        self.stream.flush()


def _bar_line(url: str, node: dict[str, Any]) -> str:
    total = max(int(node.get("total", 0)), 1)
    finished = int(node.get("finished", 0))
    images = node.get("images", {})
    # '#' the node has the image, 'x' it ended without, '-' not yet.
    good = sum(1 for entry in images.values() if entry.get("state") in ("cached", "skipped"))
    good = min(good, finished) if images else finished
    ended = BAR_WIDTH * finished // total
    filled = BAR_WIDTH * good // total
    bar = "#" * filled + "x" * (ended - filled) + "-" * (BAR_WIDTH - ended)
    states = sorted({entry.get("state", "?") for entry in images.values()})
    news = ",".join(states)
    if not node.get("alive", True):
        news = "node not live"
    return f"{url}  [{bar}]  {finished}/{total}  {news}"


def result_rows(job: dict[str, Any]) -> list[list[str]]:
    """Node, image, state and reason of every item, for the final table."""
    rows = []
    for url, node in sorted(job.get("nodes", {}).items()):
        for image_id, entry in sorted(node.get("images", {}).items()):
            size = entry.get("bytes")
            rows.append(
                [
                    url,
                    image_id,
                    str(entry.get("state", "?")),
                    "" if size is None else str(size),
                    str(entry.get("reason") or ""),
                ]
            )
    return rows


def summary(job: dict[str, Any], done: bool) -> str:
    counts = job.get("counts", {})
    shown = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()) if n)
    if not done:
        return f"Preheat job {job.get('id')} is still running ({shown}); follow it with --job."
    verdict = "every node has every image" if job.get("ok") else "some nodes lack some images"
    ended = "cancelled" if job.get("state") == "cancelled" else "done"
    return f"Preheat job {job.get('id')} {ended}: {verdict} ({shown})."


def cancel_summary(job: dict[str, Any]) -> str:
    running = job.get("counts", {}).get("running", 0)
    tail = f"; {running} running now will finish on their nodes" if running else ""
    return (
        f"Preheat job {job.get('id')} cancelled: "
        f"{job.get('cancelled_now', 0)} pending items will not run{tail}."
    )


def as_json(job: dict[str, Any], done: bool) -> str:
    return json.dumps({**job, "finished": done}, indent=2, sort_keys=True)


__all__ = [
    "EXIT_CANCELLED",
    "EXIT_INCOMPLETE",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "LIST_COUNTS",
    "NodeBars",
    "as_json",
    "cancel_job",
    "cancel_summary",
    "exit_code",
    "follow",
    "list_jobs",
    "list_rows",
    "read_job",
    "result_rows",
    "start_job",
    "summary",
]
