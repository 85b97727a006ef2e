"""Named points in a fill where a test may hold or watch it, instead of patching internals.

``FillCoordinator`` calls each method of its ``hooks`` at one place (below);
the methods of ``FillHooks`` do nothing, and a coordinator built without hooks
uses ``NO_HOOKS``: a call per fill, never per chunk, and no extra trip to a
thread. A test subclasses ``FillHooks`` and overrides the points it needs,
e.g. to block the decision thread until it has started a second request.

Blocking points run in a thread of the disk executor and may wait (with a
timeout: a hook that never returns holds that thread). Observing points run
on the event loop and must not block.
"""

from __future__ import annotations

from imagecache.fill.flight import Flight


class FillHooks:
    """Every point a no-op; override the ones a test needs."""

    def deciding(self, image_id: str) -> None:
        """Blocking, in the decision thread: before it decides who fills ``image_id``."""

    def looking_for_remote(self, image_id: str) -> None:
        """Blocking, in a thread: before looking for another process's fill of ``image_id``."""

    def looked_for_remote(self, image_id: str, found: bool) -> None:
        """Blocking, in the same thread: after the look; ``found``: it is being followed."""

    def joining(self, image_id: str) -> None:
        """On the loop: a request asks for the flight of ``image_id`` (``join``)."""

    def joined(self, flight: Flight) -> None:
        """On the loop: ``join`` returns ``flight``, decided."""

    def watching(self, image_id: str) -> None:
        """On the loop: a request asks to share a running fill of ``image_id`` (``watch``)."""

    def before_commit(self, image_id: str) -> None:
        """Blocking, in the writer's thread: the fill is verified, its commit is next."""


NO_HOOKS = FillHooks()
