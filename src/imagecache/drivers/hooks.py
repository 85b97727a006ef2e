"""Named points in a driver's commit where a test may hold or stop it, instead of patching.

Like fill/hooks.py for the coordinator: ``FileBackedDriver`` calls each method
of its ``commit_hooks`` at one place, once per commit (never per chunk), and a
driver nobody gave hooks uses ``NO_COMMIT_HOOKS``, whose methods do nothing.
A test sets ``driver.commit_hooks`` to a subclass overriding the point it
needs: to hold a commit between its rename and its record (a download then
must wait for the record), or to kill the process there (the crash tests).
"""

from __future__ import annotations


class CommitHooks:
    """Every point a no-op; override the ones a test needs."""

    def renamed(self, image_id: str) -> None:
        """Blocking, in the committing thread: the file is in place, its record is next.

        Raising here fails the commit as a failed record would (the file moves to invalid/).
        """


NO_COMMIT_HOOKS = CommitHooks()
