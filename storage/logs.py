"""Structured logging set up once per process, shared by supervisor and workers.

Every event carries `run_id`, `node_rank`, `rank` and `attempt` (bound through structlog's
contextvars) so that events from all processes of a run can be merged and filtered. Output is
JSON when stderr is not a terminal, readable console lines when it is. Values that look like
credentials are redacted before rendering: logs must never carry secrets.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"(secret|password|passwd|token|credential|authorization|access_key)", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


def redact(value: str) -> str:
    """Strip `user:password@` from URLs inside a string."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", value)


def _redact_processor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        if _SECRET_KEYS.search(key):
            event[key] = "***"
        elif isinstance(value, str):
            event[key] = redact(value)
    return event


def configure_logging(*, fmt: str | None = None, level: int = logging.INFO, **bound: Any) -> None:
    """Configure structlog for this process and bind run-wide context (run_id, rank, ...).

    Calling it again rebinds the context (a new attempt) without stacking processors.
    """
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    if fmt not in ("json", "console"):
        raise ValueError(f"log format must be 'json' or 'console', got {fmt!r}")
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact_processor,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**bound)
