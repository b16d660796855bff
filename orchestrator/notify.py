"""Alerts (``launch --notify URL``): the run's incidents as messages, through apprise.

Skeleton: the seam the supervisor's CLI uses. :func:`attach` subscribes a notifier to the run's
event log when ``--notify`` is given; it must never block or crash the supervisor.
"""

from __future__ import annotations

from orchestrator.config import LaunchConfig
from orchestrator.runstate import EventLog
from orchestrator.settings import Settings


class Notifier:
    """Sends alerts for the events it is handed (:meth:`on_event`) on its own thread."""

    def on_event(self, doc: dict[str, object]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Send what is queued within a bounded time, then stop."""
        raise NotImplementedError


def attach(config: LaunchConfig, events: EventLog, *, run_id: str, settings: Settings) -> Notifier | None:
    """A notifier subscribed to ``events`` when ``config.notify`` names URLs, else None."""
    if not config.notify:
        return None
    raise NotImplementedError("--notify is not implemented yet")
