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
from collections.abc import Mapping
from dataclasses import dataclass

from contract.env import LOG_FORMATS
from contract.settings import env_var, load, setting

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
    """Tunables of the supervisor; each field is bound to its ``ORCH_*`` variable in
    :data:`contract.settings.REGISTRY`, which holds its default and documentation."""

    #: First restart delay; doubles per consecutive failure up to ``backoff_max_s``.
    backoff_initial_s: float = setting("ORCH_RESTART_BACKOFF_INITIAL_S")
    backoff_max_s: float = setting("ORCH_RESTART_BACKOFF_MAX_S")
    #: Uniform random jitter added to each delay, so that many nodes do not relaunch in lockstep.
    backoff_jitter_s: float = setting("ORCH_RESTART_BACKOFF_JITTER_S")
    #: How often the supervisor loop polls the worker group and heartbeats.
    poll_interval_s: float = setting("ORCH_POLL_INTERVAL_S")
    #: How often snapshots are listed (retention, newest_local_step) and state.json refreshed.
    scan_interval_s: float = setting("ORCH_SCAN_INTERVAL_S")
    #: torchrun's own ``--monitor-interval``: how fast it notices a dead rank.
    monitor_interval_s: float = setting("ORCH_TORCHRUN_MONITOR_INTERVAL_S")
    #: Process-group timeout passed to workers: a collective never waits torch's 30 minutes.
    pg_timeout_s: float = setting("ORCH_PG_TIMEOUT_S")
    #: Consecutive failed attempts without progress after which the supervisor gives up early.
    crash_loop_attempts: int = setting("ORCH_CRASH_LOOP_ATTEMPTS")
    #: Bound on waiting for SIGKILLed processes to disappear.
    kill_wait_s: float = setting("ORCH_KILL_WAIT_S")
    #: Bound on the hung ranks' stack dump before the watchdog kills them (0: none).
    hang_dump_timeout_s: float = setting("ORCH_HANG_DUMP_TIMEOUT_S")
    #: Bound on draining torchrun's output after it exited.
    tee_join_s: float = setting("ORCH_TEE_JOIN_S")
    #: ``status --watch`` refresh period and overall bound.
    watch_interval_s: float = setting("ORCH_WATCH_INTERVAL_S")
    watch_max_s: float = setting("ORCH_WATCH_MAX_S")
    #: Mirror: first delay after a transient object-store error; doubles up to ``mirror_retry_max_s``.
    mirror_retry_initial_s: float = setting("ORCH_MIRROR_RETRY_INITIAL_S")
    mirror_retry_max_s: float = setting("ORCH_MIRROR_RETRY_MAX_S")
    mirror_retry_jitter_s: float = setting("ORCH_MIRROR_RETRY_JITTER_S")
    #: Mirror: pause before retrying after a permanent error (403, missing bucket), which stays
    #: reported until an upload succeeds again (credentials fixed, bucket created).
    mirror_permanent_retry_s: float = setting("ORCH_MIRROR_PERMANENT_RETRY_S")
    #: Bound on waiting, at the end of a run, for the mirror to upload what is still missing.
    mirror_flush_timeout_s: float = setting("ORCH_MIRROR_FLUSH_TIMEOUT_S")
    #: How often the run state is mirrored to ``<prefix>/run/node-<R>/state.json`` (besides
    #: every phase change).
    state_mirror_interval_s: float = setting("ORCH_STATE_MIRROR_INTERVAL_S")
    #: Multi-node only: multipart uploads older than this are aborted when a mirror starts.
    #: Other nodes' supervisors upload to the same prefix: their live uploads must survive a
    #: relaunch here (a single node aborts every incomplete upload: it is the only writer).
    mirror_stale_upload_age_s: float = setting("ORCH_MIRROR_STALE_UPLOAD_AGE_S")
    #: Multi-node only: torchrun's c10d ``join_timeout``: how long an attempt waits for the
    #: other nodes (a replacement node being scheduled) before it fails.
    rdzv_join_timeout_s: int = setting("ORCH_RDZV_JOIN_TIMEOUT_S")
    #: ``--nodes MIN:MAX`` only: c10d's ``last_call_timeout``, how long a rendezvous that has
    #: MIN nodes still waits for the others before the group forms without them.
    rdzv_last_call_s: int = setting("ORCH_RDZV_LAST_CALL_S")
    #: Multi-node only: consecutive relaunches after a closed rendezvous (another node's failed
    #: attempt still tearing down) that spend no restart; after that they count as failures.
    rdzv_closed_retries: int = setting("ORCH_RDZV_CLOSED_RETRIES")
    #: Tries of the launch preflight (and of each restore step) against a failing endpoint.
    mirror_preflight_attempts: int = setting("ORCH_MIRROR_PREFLIGHT_ATTEMPTS")
    #: Mirror threads (upload, hashing, part workers) at nice 19 and the lowest best-effort
    #: I/O priority (orchestrator.throttle.lower_thread_priority).
    mirror_nice: bool = setting("ORCH_MIRROR_NICE")
    #: Mirror bandwidth cap: MB/s, ``auto`` (orchestrator.throttle.AutoCap) or None (unlimited);
    #: read it through :meth:`mirror_cap`.
    mirror_max_mbps: str | None = setting("ORCH_MIRROR_MAX_MBPS")
    #: ``auto``: the floor of the cap and the window over which step rates are compared.
    mirror_auto_min_mbps: float = setting("ORCH_MIRROR_AUTO_MIN_MBPS")
    mirror_auto_window_s: float = setting("ORCH_MIRROR_AUTO_WINDOW_S")
    #: ``json`` or ``console``; None picks by whether stderr is a terminal.
    log_format: str | None = setting("ORCH_LOG_FORMAT")
    #: ``ORCH_FAULTS`` rules (tests only): the mirror's ``mirror_*`` points SIGKILL the
    #: supervisor; worker points reach the workers through their inherited environment.
    faults: str = setting("ORCH_FAULTS")
    #: Cloud preemption-notice sources polled by the supervisor, comma separated: ``aws``
    #: (EC2 spot instance-action via IMDSv2), ``gce`` (``instance/preempted``). Empty: off.
    notice_sources: str = setting("ORCH_NOTICE_SOURCES")
    #: Base URL of the EC2 instance metadata service (tests point it at a local fake).
    aws_metadata_url: str = setting("ORCH_AWS_METADATA_URL")
    #: Base URL of the GCE metadata server.
    gce_metadata_url: str = setting("ORCH_GCE_METADATA_URL")
    #: Minimum time between two checks of each notice source.
    notice_interval_s: float = setting("ORCH_NOTICE_INTERVAL_S")
    #: Bound on each metadata request (connect and read); a check never blocks much longer.
    notice_timeout_s: float = setting("ORCH_NOTICE_TIMEOUT_S")
    #: Lifetime requested for an IMDSv2 session token; refreshed before it expires.
    aws_token_ttl_s: int = setting("ORCH_AWS_TOKEN_TTL_S")
    #: Signals that mean "preempted": emergency snapshot at the next step boundary, mirror
    #: flush within ``--grace``, exit 75. Comma separated names without ``SIG`` (``TERM,USR1``:
    #: SLURM ``--signal``); SIGINT always stays a plain interrupt.
    preempt_signals: str = setting("ORCH_PREEMPT_SIGNALS")
    #: Alerts (``--notify``): connect and read timeout of each request (a URL's own apprise
    #: ``cto=``/``rto=`` wins), tries per alert and URL, the bound on sending what is left when
    #: the run ends, and how often a persisting mirror failure is alerted again.
    notify_timeout_s: float = setting("ORCH_NOTIFY_TIMEOUT_S")
    notify_attempts: int = setting("ORCH_NOTIFY_ATTEMPTS")
    notify_close_timeout_s: float = setting("ORCH_NOTIFY_CLOSE_TIMEOUT_S")
    notify_repeat_s: float = setting("ORCH_NOTIFY_REPEAT_S")

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
            "rdzv_last_call_s",
            "notice_interval_s",
            "notice_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{env_var(Settings, name)} must be > 0, got {getattr(self, name)}")
        for name in ("backoff_jitter_s", "hang_dump_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{env_var(Settings, name)} must be >= 0")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"{env_var(Settings, 'backoff_max_s')} must be >= {env_var(Settings, 'backoff_initial_s')}"
            )
        if self.mirror_retry_jitter_s < 0:
            raise ValueError(f"{env_var(Settings, 'mirror_retry_jitter_s')} must be >= 0")
        if self.mirror_retry_max_s < self.mirror_retry_initial_s:
            raise ValueError(
                f"{env_var(Settings, 'mirror_retry_max_s')} must be >= {env_var(Settings, 'mirror_retry_initial_s')}"
            )
        self.mirror_cap()  # ValueError names ORCH_MIRROR_MAX_MBPS
        for name in ("mirror_auto_min_mbps", "mirror_auto_window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{env_var(Settings, name)} must be > 0, got {getattr(self, name)}")
        if self.mirror_preflight_attempts < 1:
            raise ValueError(f"{env_var(Settings, 'mirror_preflight_attempts')} must be >= 1")
        if self.crash_loop_attempts < 1:
            raise ValueError(f"{env_var(Settings, 'crash_loop_attempts')} must be >= 1")
        if self.rdzv_closed_retries < 0:
            raise ValueError(f"{env_var(Settings, 'rdzv_closed_retries')} must be >= 0")
        unknown = set(notice_source_names(self.notice_sources)) - set(NOTICE_SOURCES)
        if unknown:
            raise ValueError(
                f"{env_var(Settings, 'notice_sources')} has unknown sources {sorted(unknown)}; "
                f"known: {list(NOTICE_SOURCES)}"
            )
        if not 1 <= self.aws_token_ttl_s <= 21600:
            raise ValueError(f"{env_var(Settings, 'aws_token_ttl_s')} must be in 1..21600")
        if self.log_format is not None and self.log_format not in LOG_FORMATS:
            raise ValueError(f"ORCH_LOG_FORMAT must be one of {LOG_FORMATS}, got {self.log_format!r}")
        preempt_signal_numbers(self.preempt_signals)  # ValueError names a bad one
        for name in ("notify_timeout_s", "notify_close_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{env_var(Settings, name)} must be > 0, got {getattr(self, name)}")
        if self.notify_attempts < 1:
            raise ValueError(f"{env_var(Settings, 'notify_attempts')} must be >= 1")
        if self.notify_repeat_s < 0:
            raise ValueError(f"{env_var(Settings, 'notify_repeat_s')} must be >= 0")

    def mirror_cap(self) -> float | str | None:
        """``ORCH_MIRROR_MAX_MBPS`` parsed: MB/s (> 0), ``"auto"``, or None (unlimited)."""
        raw = (self.mirror_max_mbps or "").strip().lower()
        if not raw:
            return None
        if raw == "auto":
            return "auto"
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise ValueError(
                f"{env_var(Settings, 'mirror_max_mbps')} must be a number of MB/s > 0 or auto, "
                f"got {self.mirror_max_mbps!r}"
            )
        return value

    def worker_log_format(self) -> str:
        """The log format workers are told to use: explicit, else follow the supervisor's tty."""
        if self.log_format is not None:
            return self.log_format
        return "console" if sys.stderr.isatty() else "json"




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


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``env`` (default: the process environment); ValueError names a bad one."""
    return load(Settings, env)


#: The variables ``check-resume`` sets for the runs it launches (inherited by their ranks).
STOP_AT_STEP_VAR = "ORCH_STOP_AT_STEP"
FAULTS_VAR = "ORCH_FAULTS"


def inherited_environment() -> dict[str, str]:
    """A copy of the supervisor's environment: the base of every torchrun child's environment.

    ``ORCH_FAULTS`` and the user's own variables (``OMP_NUM_THREADS``, AWS credentials, ...)
    reach the workers through it untouched.
    """
    return dict(os.environ)
