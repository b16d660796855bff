"""Supervisor tunables, and the only module of ``orchestrator`` that reads ``os.environ``.

Every knob the supervisor, launcher and status commands use that is not a user-facing flag
lives in :class:`Settings` with an ``ORCH_*`` environment override, so that tests can shrink
backoffs and poll intervals without touching code, and every other module receives plain
values. The environment handed to torchrun is also captured here (:func:`inherited_environment`)
so that the launcher never reads the process environment itself.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

LOG_FORMATS = ("json", "console")
NOTICE_SOURCES = ("aws", "gce")


def notice_source_names(raw: str) -> list[str]:
    """``"aws, GCE"`` -> ``["aws", "gce"]`` (order kept, duplicates and blanks dropped)."""
    names: list[str] = []
    for part in raw.split(","):
        name = part.strip().lower()
        if name and name not in names:
            names.append(name)
    return names


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Tunables of the supervisor; see ``ENV_NAMES`` for the variable overriding each one."""

    #: First restart delay; doubles per consecutive failure up to ``backoff_max_s``.
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    #: Uniform random jitter added to each delay, so that many nodes do not relaunch in lockstep.
    backoff_jitter_s: float = 1.0
    #: How often the supervisor loop polls the worker group and heartbeats.
    poll_interval_s: float = 0.2
    #: How often snapshots are listed (retention, newest_local_step) and state.json refreshed.
    scan_interval_s: float = 1.0
    #: torchrun's own ``--monitor-interval``: how fast it notices a dead rank.
    monitor_interval_s: float = 0.1
    #: Process-group timeout passed to workers: a collective never waits torch's 30 minutes.
    pg_timeout_s: float = 60.0
    #: Consecutive failed attempts without progress after which the supervisor gives up early.
    crash_loop_attempts: int = 3
    #: Bound on waiting for SIGKILLed processes to disappear.
    kill_wait_s: float = 10.0
    #: Bound on draining torchrun's output after it exited.
    tee_join_s: float = 5.0
    #: ``status --watch`` refresh period and overall bound.
    watch_interval_s: float = 2.0
    watch_max_s: float = 24 * 3600.0
    #: Mirror: first delay after a transient object-store error; doubles up to ``mirror_retry_max_s``.
    mirror_retry_initial_s: float = 1.0
    mirror_retry_max_s: float = 30.0
    mirror_retry_jitter_s: float = 1.0
    #: Mirror: pause before retrying after a permanent error (403, missing bucket), which stays
    #: reported until an upload succeeds again (credentials fixed, bucket created).
    mirror_permanent_retry_s: float = 60.0
    #: Bound on waiting, at the end of a run, for the mirror to upload what is still missing.
    mirror_flush_timeout_s: float = 300.0
    #: How often the run state is mirrored to ``<prefix>/run/node-<R>/state.json`` (besides
    #: every phase change).
    state_mirror_interval_s: float = 10.0
    #: Multi-node only: multipart uploads older than this are aborted when a mirror starts.
    #: Other nodes' supervisors upload to the same prefix: their live uploads must survive a
    #: relaunch here (a single node aborts every incomplete upload: it is the only writer).
    mirror_stale_upload_age_s: float = 3600.0
    #: Multi-node only: torchrun's c10d ``join_timeout``: how long an attempt waits for the
    #: other nodes (a replacement node being scheduled) before it fails.
    rdzv_join_timeout_s: int = 600
    #: Multi-node only: consecutive relaunches after a closed rendezvous (another node's failed
    #: attempt still tearing down) that spend no restart; after that they count as failures.
    rdzv_closed_retries: int = 10
    #: Tries of the launch preflight (and of each restore step) against a failing endpoint.
    mirror_preflight_attempts: int = 3
    #: ``json`` or ``console``; None picks by whether stderr is a terminal.
    log_format: str | None = None
    #: ``ORCH_FAULTS`` rules (tests only): the mirror's ``mirror_*`` points SIGKILL the
    #: supervisor; worker points reach the workers through their inherited environment.
    faults: str = ""
    #: Cloud preemption-notice sources polled by the supervisor, comma separated: ``aws``
    #: (EC2 spot instance-action via IMDSv2), ``gce`` (``instance/preempted``). Empty: off.
    notice_sources: str = ""
    #: Base URL of the EC2 instance metadata service (tests point it at a local fake).
    aws_metadata_url: str = "http://169.254.169.254"
    #: Base URL of the GCE metadata server.
    gce_metadata_url: str = "http://metadata.google.internal"
    #: Minimum time between two checks of each notice source.
    notice_interval_s: float = 5.0
    #: Bound on each metadata request (connect and read); a check never blocks much longer.
    notice_timeout_s: float = 1.0
    #: Lifetime requested for an IMDSv2 session token; refreshed before it expires.
    aws_token_ttl_s: int = 21600
    #: Signals that mean "preempted": emergency snapshot at the next step boundary, mirror
    #: flush within ``--grace``, exit 75. Comma separated names without ``SIG`` (``TERM,USR1``:
    #: SLURM ``--signal``); SIGINT always stays a plain interrupt.
    preempt_signals: str = "TERM,USR1"

    def __post_init__(self) -> None:
        for name in (
            "backoff_initial_s",
            "backoff_max_s",
            "poll_interval_s",
            "scan_interval_s",
            "monitor_interval_s",
            "pg_timeout_s",
            "kill_wait_s",
            "tee_join_s",
            "watch_interval_s",
            "watch_max_s",
            "mirror_retry_initial_s",
            "mirror_retry_max_s",
            "mirror_permanent_retry_s",
            "mirror_flush_timeout_s",
            "state_mirror_interval_s",
            "mirror_stale_upload_age_s",
            "rdzv_join_timeout_s",
            "notice_interval_s",
            "notice_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{ENV_NAMES[name]} must be > 0, got {getattr(self, name)}")
        if self.backoff_jitter_s < 0:
            raise ValueError(f"{ENV_NAMES['backoff_jitter_s']} must be >= 0")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"{ENV_NAMES['backoff_max_s']} must be >= {ENV_NAMES['backoff_initial_s']}"
            )
        if self.mirror_retry_jitter_s < 0:
            raise ValueError(f"{ENV_NAMES['mirror_retry_jitter_s']} must be >= 0")
        if self.mirror_retry_max_s < self.mirror_retry_initial_s:
            raise ValueError(
                f"{ENV_NAMES['mirror_retry_max_s']} must be >= {ENV_NAMES['mirror_retry_initial_s']}"
            )
        if self.mirror_preflight_attempts < 1:
            raise ValueError(f"{ENV_NAMES['mirror_preflight_attempts']} must be >= 1")
        if self.crash_loop_attempts < 1:
            raise ValueError(f"{ENV_NAMES['crash_loop_attempts']} must be >= 1")
        if self.rdzv_closed_retries < 0:
            raise ValueError(f"{ENV_NAMES['rdzv_closed_retries']} must be >= 0")
        unknown = set(notice_source_names(self.notice_sources)) - set(NOTICE_SOURCES)
        if unknown:
            raise ValueError(
                f"{ENV_NAMES['notice_sources']} has unknown sources {sorted(unknown)}; "
                f"known: {list(NOTICE_SOURCES)}"
            )
        if not 1 <= self.aws_token_ttl_s <= 21600:
            raise ValueError(f"{ENV_NAMES['aws_token_ttl_s']} must be in 1..21600")
        if self.log_format is not None and self.log_format not in LOG_FORMATS:
            raise ValueError(f"ORCH_LOG_FORMAT must be one of {LOG_FORMATS}, got {self.log_format!r}")
        preempt_signal_numbers(self.preempt_signals)  # ValueError names a bad one

    def worker_log_format(self) -> str:
        """The log format workers are told to use: explicit, else follow the supervisor's tty."""
        if self.log_format is not None:
            return self.log_format
        return "console" if sys.stderr.isatty() else "json"


ENV_NAMES: dict[str, str] = {
    "backoff_initial_s": "ORCH_RESTART_BACKOFF_INITIAL_S",
    "backoff_max_s": "ORCH_RESTART_BACKOFF_MAX_S",
    "backoff_jitter_s": "ORCH_RESTART_BACKOFF_JITTER_S",
    "poll_interval_s": "ORCH_POLL_INTERVAL_S",
    "scan_interval_s": "ORCH_SCAN_INTERVAL_S",
    "monitor_interval_s": "ORCH_TORCHRUN_MONITOR_INTERVAL_S",
    "pg_timeout_s": "ORCH_PG_TIMEOUT_S",
    "crash_loop_attempts": "ORCH_CRASH_LOOP_ATTEMPTS",
    "kill_wait_s": "ORCH_KILL_WAIT_S",
    "tee_join_s": "ORCH_TEE_JOIN_S",
    "watch_interval_s": "ORCH_WATCH_INTERVAL_S",
    "watch_max_s": "ORCH_WATCH_MAX_S",
    "mirror_retry_initial_s": "ORCH_MIRROR_RETRY_INITIAL_S",
    "mirror_retry_max_s": "ORCH_MIRROR_RETRY_MAX_S",
    "mirror_retry_jitter_s": "ORCH_MIRROR_RETRY_JITTER_S",
    "mirror_permanent_retry_s": "ORCH_MIRROR_PERMANENT_RETRY_S",
    "mirror_flush_timeout_s": "ORCH_MIRROR_FLUSH_TIMEOUT_S",
    "state_mirror_interval_s": "ORCH_STATE_MIRROR_INTERVAL_S",
    "mirror_stale_upload_age_s": "ORCH_MIRROR_STALE_UPLOAD_AGE_S",
    "rdzv_join_timeout_s": "ORCH_RDZV_JOIN_TIMEOUT_S",
    "rdzv_closed_retries": "ORCH_RDZV_CLOSED_RETRIES",
    "mirror_preflight_attempts": "ORCH_MIRROR_PREFLIGHT_ATTEMPTS",
    "log_format": "ORCH_LOG_FORMAT",
    "faults": "ORCH_FAULTS",
    "notice_sources": "ORCH_NOTICE_SOURCES",
    "aws_metadata_url": "ORCH_AWS_METADATA_URL",
    "gce_metadata_url": "ORCH_GCE_METADATA_URL",
    "notice_interval_s": "ORCH_NOTICE_INTERVAL_S",
    "notice_timeout_s": "ORCH_NOTICE_TIMEOUT_S",
    "aws_token_ttl_s": "ORCH_AWS_TOKEN_TTL_S",
    "preempt_signals": "ORCH_PREEMPT_SIGNALS",
}

_INT_FIELDS = frozenset(
    {"crash_loop_attempts", "mirror_preflight_attempts", "aws_token_ttl_s", "rdzv_join_timeout_s",
     "rdzv_closed_retries"}
)
_STR_FIELDS = frozenset(
    {
        "log_format",
        "faults",
        "notice_sources",
        "aws_metadata_url",
        "gce_metadata_url",
        "preempt_signals",
    }
)

#: Signals that can never mean "preempted": SIGINT stays an interrupt, the rest can't be caught.
_NOT_PREEMPT = frozenset({"INT", "KILL", "STOP"})


def preempt_signal_numbers(raw: str) -> tuple[int, ...]:
    """``"TERM, sigusr1"`` -> ``(15, 10)``; ValueError for an unknown or uncatchable name."""
    out: list[int] = []
    for part in raw.split(","):
        name = part.strip().upper().removeprefix("SIG")
        if not name:
            continue
        if name in _NOT_PREEMPT:
            raise ValueError(f"ORCH_PREEMPT_SIGNALS: SIG{name} cannot be a preemption signal")
        try:
            num = int(signal.Signals["SIG" + name])
        except KeyError:
            raise ValueError(f"ORCH_PREEMPT_SIGNALS: unknown signal {part.strip()!r}") from None
        if num not in out:
            out.append(num)
    return tuple(out)


def _parse_float(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def _parse_int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``env`` (default: the process environment); ValueError names a bad one."""
    source = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(Settings):
        var = ENV_NAMES[f.name]
        raw = source.get(var, "").strip()
        if not raw:
            continue
        parse: Callable[[str, str], Any]
        if f.name in _STR_FIELDS:
            values[f.name] = raw
            continue
        parse = _parse_int if f.name in _INT_FIELDS else _parse_float
        values[f.name] = parse(var, raw)
    return Settings(**values)


def inherited_environment() -> dict[str, str]:
    """A copy of the supervisor's environment: the base of every torchrun child's environment.

    ``ORCH_FAULTS`` and the user's own variables (``OMP_NUM_THREADS``, AWS credentials, ...)
    reach the workers through it untouched.
    """
    return dict(os.environ)
