"""An edge Glance that only caches images kept at the far side (bench/edge.py glance-cache).

What an operator of a Glance 2026.1 edge site can do without sharing the
central database: the edge Glance's ``http`` store (read-only, fetches on
GET) holds each image as a location ``http://<origin across the link>/<id>``
added with the location API (``POST /v2/images/{id}/locations``, API 2.17),
and its image cache middleware (flavor ``headers+cachemanagement``,
``image_cache_dir``) tees the first whole GET into the edge's cache.

What it takes, beyond glance-peer.sh's own configuration (written to
``$HOME/.glance/glance.conf.d/``, which oslo.config reads after the script's
glance-api.conf, so the shared script stays as it is):

- ``enabled_backends = fs:file, web:http``: the location API refuses a
  normal user's URL unless an http store is enabled;
- ``[import_filtering_opts] allowed_hosts`` / ``allowed_ports``: location
  URLs pass web-download's filter, which drops loopback addresses and every
  port but 80 and 443 unless the host is listed; the origin's relay is on
  loopback at a port of its own;
- ``do_secure_hash = false`` with ``validation_data`` (the sha512 the origin
  publishes): with the default ``true`` the location task reads the whole
  image across the link to hash it at registration;
- the ``headers`` auth mode: the location task records the caller's project
  as its owner, and the noauth context has none (``tasks.owner`` NOT NULL:
  HTTP 500). The trusted identity headers stand in for what
  keystonemiddleware would set from a member's token; the stock policy
  (``add_image_location``: service or project member) applies.

Pure but for ``EdgeGlance``, which drives a started peer through its
``http_json``/``http_status`` (passed in: this module must load without
bench/peers.py, whose name clashes with tests/peers).
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

PROJECT = "edge"
# A member of the edge's project: creates and reads the images.
MEMBER = {
    "X-Identity-Status": "Confirmed",
    "X-Roles": "member,reader",
    "X-Project-Id": PROJECT,
    "X-User-Id": "edge-user",
    "X-Auth-Token": "trusted-headers",
}
# The operator: the cache API (/v2/cache) is admin only.
ADMIN = dict(MEMBER, **{"X-Roles": "admin,member,reader", "X-User-Id": "edge-admin"})


def edge_conf(origin_url: str) -> str:
    """The settings the edge Glance needs to hold images at ``origin_url`` (see the module doc)."""
    parts = urllib.parse.urlsplit(origin_url)
    if parts.scheme != "http" or not parts.hostname or parts.port is None:
        raise ValueError(f"need http://host:port, got {origin_url!r}")
    return (
        "# Written by bench/edge_glance.py: read after glance-peer.sh's glance-api.conf.\n"
        "[DEFAULT]\n"
        "enabled_backends = fs:file, web:http\n"
        "do_secure_hash = false\n"
        "\n"
        "[import_filtering_opts]\n"
        f"allowed_hosts = [{parts.hostname}]\n"
        f"allowed_ports = [{parts.port}]\n"
    )


def location_body(url: str, sha512: str) -> dict[str, object]:
    """``POST /v2/images/{id}/locations``: the image at ``url`` and the hash it must have."""
    digest = sha512.strip().lower()
    if len(digest) != 128 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"not a sha512 hex digest: {sha512!r}")
    return {"url": url, "validation_data": {"os_hash_algo": "sha512", "os_hash_value": digest}}


def curl_headers(headers: Mapping[str, str]) -> list[str]:
    """``-H 'Name: value'`` arguments for curl."""
    out: list[str] = []
    for name, value in headers.items():
        out += ["-H", f"{name}: {value}"]
    return out


Json = Callable[..., object]
Status = Callable[..., int]


@dataclass
class EdgeGlance:
    """Register the origin's images at a running edge Glance, and drop them from its cache."""

    url: str  # the edge Glance
    origin_url: str  # the far side (the relay), as the edge Glance reaches it
    http_json: Json
    http_status: Status
    ids: dict[str, str] = field(default_factory=dict)  # origin image id -> edge Glance id

    def register(self, origin_id: str, sha512: str, within: float = 60.0) -> str:
        """A new image whose only location is the origin's copy; its id once it is active."""
        image = self.http_json(
            self.url + "/v2/images",
            "POST",
            {"name": f"edge-{origin_id}", "disk_format": "raw", "container_format": "bare"},
            headers=MEMBER,
        )
        assert isinstance(image, dict)
        image_id = str(image["id"])
        body = location_body(f"{self.origin_url}/{origin_id}", sha512)
        self.http_json(f"{self.url}/v2/images/{image_id}/locations", "POST", body, headers=MEMBER)
        # The location task runs in the background (202): poll until it is done.
        deadline = time.monotonic() + within
        while True:
            info = self.http_json(f"{self.url}/v2/images/{image_id}", headers=MEMBER)
            assert isinstance(info, dict)
            if info.get("status") == "active":
                break
            if info.get("status") not in ("queued", "importing") or time.monotonic() > deadline:
                raise RuntimeError(f"edge Glance image {image_id}: status {info.get('status')}")
            time.sleep(0.2)  # polling the task's visible outcome
        self.ids[origin_id] = image_id
        return image_id

    def file_url(self, origin_id: str) -> str:
        return f"{self.url}/v2/images/{self.ids[origin_id]}/file"

    def evict(self, origin_id: str) -> list[str]:
        """Drop the image from the edge's cache (so the next round is cold); notes for the row."""
        image_id = self.ids.get(origin_id)
        if image_id is None:
            return ["never registered"]
        cached = self.http_json(self.url + "/v2/cache", headers=ADMIN)
        assert isinstance(cached, dict)
        listed = [str(item["image_id"]) for item in cached.get("cached_images", [])]
        notes = [] if image_id in listed else ["the edge Glance did not cache the image"]
        status = self.http_status(f"{self.url}/v2/cache/{image_id}", "DELETE", headers=ADMIN)
        if status not in (204, 404):
            notes.append(f"DELETE /v2/cache/{image_id}: HTTP {status}")
        return notes
