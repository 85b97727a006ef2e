"""What a service process starts once its socket accepts: serving comes first.

At start-up a process does what the first request needs (the settings, the
cache's metadata, the app) and starts accepting; only then the rest:
reconciliation and the scheduled jobs (maintenance.py), the metrics publisher
of a pre-forked service, the cluster heartbeat, the Keystone role check. They
used to start in aiohttp's ``on_startup``, before the socket accepted, so their
threads (a reconciliation scanning the whole directory, the role check
importing keystoneauth1) competed with the start of serving.

``imagecache serve`` (server/run.py) calls ``defer(app)`` before setting the
app up and ``start(app)`` once it accepts. An app served any other way
(aiohttp's test server) starts them in ``on_startup``, as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

Starter = Callable[[], Awaitable[None]]

_STARTERS = web.AppKey("background_starters", list[Starter])
_DEFERRED = web.AppKey("background_deferred", bool)


def install(app: web.Application) -> None:
    """Give ``app`` its list of starters, run in ``on_startup`` unless ``defer``red."""
    app[_STARTERS] = []

    async def on_startup(app: web.Application) -> None:
        if not app.get(_DEFERRED, False):
            await start(app)

    app.on_startup.append(on_startup)


def add(app: web.Application, starter: Starter) -> None:
    """Run ``starter`` once the app serves; it starts tasks and returns at once."""
    app[_STARTERS].append(starter)


def defer(app: web.Application) -> None:
    """Hold the starters back until ``start(app)``; before the app is set up (it freezes)."""
    app[_DEFERRED] = True


async def start(app: web.Application) -> None:
    """Run the starters, in the order they were added."""
    for starter in app[_STARTERS]:
        await starter()
