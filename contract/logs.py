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
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"(secret|password|passwd|token|credential|authorization|access_key)", re.I)
# The userinfo runs up to the last "@" of the authority (a password may contain "@"); a raw "/",
# "?" or "#" ends the authority, so credentials must be percent-encoded there anyway.
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/?#\s]+@", re.I)
_MAX_DEPTH = 8


def redact(value: str) -> str:
    """Strip `user:password@` from URLs inside a string."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", value)


def _redact_value(value: Any, depth: int) -> Any:
    """Redact strings, and nested mappings and sequences (a config dict, a list of URLs)."""
    if isinstance(value, str):
        return redact(value)
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {
            k: "***" if isinstance(k, str) and _SECRET_KEYS.search(k) else _redact_value(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact_value(v, depth + 1) for v in value]
    if isinstance(value, tuple):  # namedtuples too: rendered like plain tuples anyway
        return tuple(_redact_value(v, depth + 1) for v in value)
    return value


def _redact_processor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        if _SECRET_KEYS.search(key):
            event[key] = "***"
        else:
            event[key] = _redact_value(value, 0)
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
            structlog.processors.format_exc_info,
            # After format_exc_info: exception messages often carry URLs with credentials.
            _redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**bound)
