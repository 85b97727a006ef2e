"""``GET /v2/schemas/...``: the JSON schemas Glance clients fetch before any command.

python-glanceclient's shell downloads ``/v2/schemas/image``,
``/v2/schemas/metadefs/namespace`` and ``/v2/schemas/metadefs/resource_type``
the first time it runs for a user (it keeps them in ``~/.glanceclient``), and
falls back to the v1 API, which this service does not speak, when all three
fail. So on a user's first ``glance`` command every verb failed against a
non-Glance origin (found on a fresh machine: ``glance cache-list`` printed
the v1 usage). A Glance origin's own schemas are relayed (they describe its
properties and its policy); the others get these, which describe the image
document ``proxy._synthesised_image`` answers. Any other schema name is 404.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from imagecache.errors import ResourceNotFound
from imagecache.server import proxy
from imagecache.server.state import STATE
from imagecache.upstreams.glance import GlanceUpstream

_STRING = {"type": "string"}
_NULLABLE_STRING = {"type": ["null", "string"]}
_NULLABLE_INTEGER = {"type": ["null", "integer"]}

# The fields of the synthesised image document. Properties the schema does not
# list are strings (``additionalProperties``), as Glance's own schema allows.
_IMAGE_PROPERTIES: dict[str, Any] = {
    "id": {**_STRING, "description": "the image's id (here: its name at the origin)"},
    "name": _NULLABLE_STRING,
    "status": {
        "type": "string",
        "enum": ["queued", "saving", "active", "killed", "deleted", "pending_delete"],
    },
    "size": _NULLABLE_INTEGER,
    "virtual_size": _NULLABLE_INTEGER,
    "checksum": _NULLABLE_STRING,
    "os_hash_algo": _NULLABLE_STRING,
    "os_hash_value": _NULLABLE_STRING,
    "disk_format": _NULLABLE_STRING,
    "container_format": _NULLABLE_STRING,
    "visibility": {"type": "string", "enum": ["public", "private", "shared", "community"]},
    "protected": {"type": "boolean"},
    "os_hidden": {"type": "boolean"},
    "owner": _NULLABLE_STRING,
    "min_disk": {"type": "integer"},
    "min_ram": {"type": "integer"},
    "tags": {"type": "array", "items": _STRING},
    "created_at": _STRING,
    "updated_at": _STRING,
    "file": _STRING,
    "self": _STRING,
    "schema": _STRING,
}

# Read-only base properties: glanceclient's patch logic must not try to set them.
_READ_ONLY = {"id", "status", "size", "checksum", "file", "self", "schema"}


def _image() -> dict[str, Any]:
    properties = {
        name: {**spec, "readOnly": True} if name in _READ_ONLY else spec
        for name, spec in _IMAGE_PROPERTIES.items()
    }
    return {"name": "image", "properties": properties, "additionalProperties": _STRING}


def _images() -> dict[str, Any]:
    return {
        "name": "images",
        "properties": {
            "images": {"type": "array", "items": _image()},
            "schema": _STRING,
            "first": _STRING,
            "next": _STRING,
        },
        "links": [
            {"rel": "first", "href": "{first}"},
            {"rel": "next", "href": "{next}"},
            {"rel": "describedby", "href": "{schema}"},
        ],
    }


def _metadefs(name: str) -> dict[str, Any]:
    # An origin that is not Glance has no metadata definitions: the schema says
    # what one would look like, so the client's cache of schemas is complete.
    return {
        "name": name,
        "properties": {
            "name" if name == "resource_type" else "namespace": _STRING,
            "created_at": _STRING,
            "updated_at": _STRING,
        },
        "additionalProperties": False,
    }


_OWN: dict[str, Callable[[], dict[str, Any]]] = {
    "image": _image,
    "images": _images,
    "metadefs/namespace": lambda: _metadefs("namespace"),
    "metadefs/resource_type": lambda: _metadefs("resource_type"),
}


async def schema(request: web.Request) -> web.StreamResponse:
    """The named schema: the Glance origin's, or this service's own for other origins."""
    if isinstance(request.app[STATE].upstream, GlanceUpstream):
        return await proxy.relay(request)
    name = request.match_info["name"]
    build = _OWN.get(name)
    if build is None:
        raise ResourceNotFound(f"no schema {name!r}: this origin has {', '.join(sorted(_OWN))}")
    return web.json_response(build())
