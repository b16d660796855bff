"""Metrics (``launch --metrics-port P`` / ``--metrics-file PATH``): Prometheus text.

Skeleton: the seam the supervisor's CLI uses. :func:`attach` subscribes to the run's events and
returns an object that also takes every :class:`~orchestrator.runstate.RunState` the supervisor
publishes (:meth:`RunMetrics.on_state`).
"""

from __future__ import annotations

from orchestrator.config import LaunchConfig
from orchestrator.runstate import EventLog, RunState
from orchestrator.settings import Settings


class RunMetrics:
    """The run's metrics, served over HTTP and/or written to a textfile."""

    def on_event(self, doc: dict[str, object]) -> None:
        raise NotImplementedError

    def on_state(self, state: RunState) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def attach(config: LaunchConfig, events: EventLog, *, run_id: str, settings: Settings) -> RunMetrics | None:
    """Metrics subscribed to ``events`` when a port or file is configured, else None."""
    if config.metrics_port is None and config.metrics_file is None:
        return None
    raise NotImplementedError("--metrics-port/--metrics-file are not implemented yet")
