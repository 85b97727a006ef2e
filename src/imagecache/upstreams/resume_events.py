"""What resuming a broken origin body reports, to whoever counts it: a sink passed in.

``upstreams/resume.py`` calls ``resume_outcome`` as each resume ends; the
service's ``server/metrics.py`` ``Metrics`` implements the protocol
(structurally) as ``imagecache_upstream_resumes_total{outcome}``, and
``create_upstream(..., resume_events=...)`` hands it to the http, glance and
s3 upstreams. A program that uses the library without the service gets
``NO_RESUME_EVENTS``.

Unlike the fill's events, these are called from the fill pump's thread as
well as from the event loop: an implementation must be thread-safe and
return at once (no I/O). prometheus-client's counters are both.
"""

from __future__ import annotations

from typing import Literal, Protocol

# How one resume ended: ``resumed`` (the origin continued the same image; one
# per break, so a body broken twice and resumed twice counts 2), ``refused``
# (the origin's answer did not continue the same image: the body fails rather
# than splice two versions), ``exhausted`` (the attempts ran out on a body
# that kept breaking: the error of a body without resuming).
ResumeOutcome = Literal["resumed", "refused", "exhausted"]
RESUME_OUTCOMES: tuple[ResumeOutcome, ...] = ("resumed", "refused", "exhausted")


class ResumeEvents(Protocol):
    """The sink resumable bodies report to (any thread; returns at once)."""

    def resume_outcome(self, outcome: ResumeOutcome) -> None:
        """A resume of a broken body ended with ``outcome``."""


class _NoResumeEvents:
    def resume_outcome(self, outcome: ResumeOutcome) -> None:
        pass


NO_RESUME_EVENTS: ResumeEvents = _NoResumeEvents()

__all__ = ["NO_RESUME_EVENTS", "RESUME_OUTCOMES", "ResumeEvents", "ResumeOutcome"]
