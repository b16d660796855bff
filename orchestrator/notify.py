"""Alerts (``launch --notify URL``): the run's incidents as short messages, sent through apprise.

:func:`attach` subscribes a :class:`Notifier` to the run's event log. On the emitting thread
(the supervisor loop, the mirror thread) :class:`AlertBuilder` turns the few events that matter
into alerts (pure bookkeeping: one incident, one message; mirror failures deduplicated) and
queues them; a daemon thread sends each alert to every URL with bounded time per request
(connect and read timeouts), a few tries with backoff (tenacity), then gives up with
``notify.failed``. The queue is bounded (the oldest alert is dropped, and the next message
says how many were), and :meth:`Notifier.close` sends what is left within a bounded time.
Nothing here may block or crash the supervisor, and no URL is ever logged whole: apprise URLs
carry tokens, sometimes in the host part, so only :func:`redact`'s form appears in logs.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote

import apprise
import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    wait_exponential,
)

from contract.codes import Phase
from contract.paths import RunPaths
from orchestrator.config import NOTIFY_KINDS, LaunchConfig
from orchestrator.runstate import EventLog, read_events
from orchestrator.settings import Settings

log = structlog.get_logger("orchestrator.notify")

#: Alerts waiting to be sent; beyond this the oldest is dropped (a dead endpoint must not let
#: a crash loop's alerts grow the supervisor's memory without bound).
QUEUE_SIZE = 100
#: First wait between two tries of one send; doubles up to :data:`RETRY_MAX_S`.
RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 8.0
#: Longest root cause or error kept in a message (a traceback tail is enough to recognise it).
MAX_CAUSE_CHARS = 600
MAX_TITLE_CHARS = 200

_LEVELS = {
    "failure": apprise.NotifyType.FAILURE,
    "gave_up": apprise.NotifyType.FAILURE,
    "hang": apprise.NotifyType.FAILURE,
    "diverged": apprise.NotifyType.FAILURE,
    "preempted": apprise.NotifyType.WARNING,
    "mirror": apprise.NotifyType.WARNING,
    "recovered": apprise.NotifyType.SUCCESS,
    "finished": apprise.NotifyType.SUCCESS,
}
#: Supervisor events whose ``step`` is the training step reached (``resume_selected``'s is a
#: snapshot step, and mirror events name the snapshot they upload).
_STEP_EVENTS = frozenset({
    "supervisor.attempt_ended", "supervisor.progress_resumed", "supervisor.finished",
    "supervisor.preempt_requested", "supervisor.preempt_deadline_passed",
})


@dataclass(frozen=True)
class Alert:
    """One message: ``kind`` (of :data:`NOTIFY_KINDS`), a one-line title, a short body."""

    kind: str
    title: str
    body: str
    #: The event it stands for, and that event's time (latency is measured from it).
    event: str
    time: float


def _clip(text: object, limit: int) -> str:
    one = " ".join(str(text).split()) if limit <= MAX_TITLE_CHARS else str(text).strip()
    return one if len(one) <= limit else one[: limit - 3] + "..."


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _num(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"


@dataclass
class _PendingFailure:
    """An ``attempt_failed`` waiting for its verdict (``backoff`` or ``gave_up``), which the
    supervisor emits in the same turn: one incident becomes one message."""

    doc: dict[str, Any]
    hang_silent_s: float | None
    #: The hang's forensics: where every rank's stack was written, or why not.
    hang_stacks: str | None = None


@dataclass
class AlertBuilder:
    """Events in, alerts out: the state that makes one message per incident. No I/O, no clock
    (event times only), so it is tested with plain dicts. Not thread-safe: callers serialise."""

    run_id: str
    node_rank: int
    kinds: frozenset[str]
    #: A mirror failure with the same error is alerted again at most this often (event time).
    mirror_repeat_s: float = 3600.0
    host: str = field(default_factory=socket.gethostname)

    _step: int | None = field(default=None, init=False)
    _pending: _PendingFailure | None = field(default=None, init=False)
    _hang: dict[str, Any] | None = field(default=None, init=False)
    #: The last attempt's end (``attempt_ended``, or a preemption's) and whether an incident
    #: happened since the last recovery: the next ``progress_resumed`` is then a recovery.
    _last_end: dict[str, Any] | None = field(default=None, init=False)
    _incident: bool = field(default=False, init=False)
    _mirror_seen: dict[str, tuple[float, int]] = field(default_factory=dict, init=False)

    def feed(self, doc: Mapping[str, Any]) -> list[Alert]:
        """The alerts ``doc`` (an event document) completes, in order; kinds not selected are
        left out here, so nothing unwanted is queued."""
        event = doc.get("event")
        if not isinstance(event, str):
            return []
        out: list[Alert] = []
        if event.startswith("supervisor.") and self._pending is not None:
            out.extend(self._verdict(doc))
        if event in _STEP_EVENTS:
            step = _int(doc.get("step"))
            if step is not None:
                self._step = step if self._step is None else max(self._step, step)
        handler = _HANDLERS.get(event)
        if handler is not None:
            alert = handler(self, dict(doc))
            if alert is not None:
                out.append(alert)
        return [a for a in out if a.kind in self.kinds]

    def flush(self) -> list[Alert]:
        """A failure still waiting for its verdict (the run ended in between), as it stands."""
        if self._pending is None:
            return []
        alert = self._failure_alert(self._pending, phase=None, next_text=None)
        self._pending = None
        return [alert] if alert.kind in self.kinds else []

    def forget_alerts(self) -> None:
        """After a replay of an earlier launch's events: keep the recovery bookkeeping only."""
        self._pending = None
        self._hang = None
        self._mirror_seen.clear()

    # -- message layout ----------------------------------------------------------------------

    def _alert(self, kind: str, doc: Mapping[str, Any], headline: str, lines: Iterable[str],
               *, phase: str | None, step: int | None = None) -> Alert:
        step = self._step if step is None else step
        attempt = _int(doc.get("attempt"))
        context = [f"run {self.run_id}", f"node {self.node_rank} ({self.host})"]
        if attempt is not None:
            context.append(f"attempt {attempt}")
        state = [f"phase {phase}" if phase else "", f"step {'none yet' if step is None else step}"]
        body = "\n".join([*lines, ", ".join(context), ", ".join(s for s in state if s)])
        title = _clip(f"{self.run_id} node {self.node_rank}: {headline}", MAX_TITLE_CHARS)
        event = str(doc.get("event"))
        when = _num(doc.get("time"))
        return Alert(kind=kind, title=title, body=body, event=event,
                     time=time.time() if when is None else when)

    # -- attempts: failure, hang, gave up --------------------------------------------------

    def _on_hang(self, doc: dict[str, Any]) -> None:
        self._hang = doc
        self._incident = True

    def _on_attempt_ended(self, doc: dict[str, Any]) -> None:
        self._last_end = doc

    def _on_failed(self, doc: dict[str, Any]) -> None:
        hang = self._hang
        silent = stacks = None
        if hang is not None and hang.get("attempt") == doc.get("attempt"):
            silent = _num(hang.get("silent_s"))
            stacks = hang.get("stacks") if isinstance(hang.get("stacks"), str) else None
        self._hang = None
        self._pending = _PendingFailure(doc=doc, hang_silent_s=silent, hang_stacks=stacks)
        self._incident = True

    def _verdict(self, doc: Mapping[str, Any]) -> list[Alert]:
        pending = self._pending
        assert pending is not None
        self._pending = None
        event = doc.get("event")
        if event == "supervisor.backoff":
            restarts, limit = _int(doc.get("restarts")), _int(doc.get("max_restarts"))
            delay = _num(doc.get("delay_s")) or 0.0
            budget = f" {restarts}/{limit}" if restarts is not None and limit is not None else ""
            return [self._failure_alert(pending, phase=Phase.RECOVERING.value,
                                        next_text=f"restart{budget} in {delay:.1f}s")]
        if event == "supervisor.gave_up" and "gave_up" in self.kinds:
            return []  # the gave-up message says it all (root cause, restarts)
        return [self._failure_alert(
            pending,
            phase=Phase.FAILED.value if event == "supervisor.gave_up" else None,
            next_text="giving up" if event == "supervisor.gave_up" else None,
        )]

    def _failure_alert(self, pending: _PendingFailure, *, phase: str | None,
                       next_text: str | None) -> Alert:
        doc = pending.doc
        attempt = doc.get("attempt")
        code = doc.get("exit_code")
        cause = _clip(doc.get("root_cause") or "unknown", MAX_CAUSE_CHARS)
        lines = [f"root cause: {cause}"]
        rank = _int(doc.get("failed_rank"))
        if rank is not None:
            lines.append(f"first failing rank: {rank}")
        if next_text:
            lines.append(f"next: {next_text}")
        step = self._step
        at = "" if step is None else f" at step {step}"
        tail = f"; {next_text}" if next_text else ""
        if pending.hang_silent_s is not None and "hang" in self.kinds:
            headline = (f"hang: no progress for {pending.hang_silent_s:.0f}s{at}, "
                        f"attempt {attempt} killed{tail}")
            if pending.hang_stacks:
                lines.append(_clip(pending.hang_stacks, MAX_CAUSE_CHARS))
            return self._alert("hang", doc, headline, lines, phase=phase)
        headline = f"attempt {attempt} failed (exit {code}){at}{tail}: {_clip(cause, 80)}"
        return self._alert("failure", doc, headline, lines, phase=phase)

    def _on_gave_up(self, doc: dict[str, Any]) -> Alert:
        self._incident = True
        cause = _clip(doc.get("root_cause") or doc.get("reason") or "unknown", MAX_CAUSE_CHARS)
        restarts = doc.get("restarts")
        lines = [f"root cause: {cause}", f"reason: {doc.get('reason')}, restarts spent: {restarts}",
                 "the run stopped (exit 1); relaunch the same command to resume from the newest "
                 "valid snapshot"]
        headline = f"gave up after {restarts} restarts: {_clip(cause, 80)}"
        return self._alert("gave_up", doc, headline, lines, phase=Phase.FAILED.value)

    # -- recovery ------------------------------------------------------------------------

    def _on_resumed(self, doc: dict[str, Any]) -> Alert | None:
        end, attempt = self._last_end, _int(doc.get("attempt"))
        if not self._incident or end is None or attempt is None:
            return None
        end_attempt = _int(end.get("attempt"))
        if end_attempt is not None and end_attempt >= attempt:
            return None
        self._incident = False
        resume = _int(doc.get("resume_step"))
        lost_step = _int(end.get("step"))
        replayed = None if lost_step is None else max(0, lost_step - (resume or 0))
        step_time = _num(doc.get("step_time")) or _num(doc.get("time"))
        beat = _num(end.get("last_heartbeat_at"))
        since = "since the last heartbeat" if beat is not None else "since the failure was seen"
        start = beat if beat is not None else _num(end.get("time"))
        lost = None if step_time is None or start is None else max(0.0, step_time - start)
        origin = "a fresh start (no snapshot)" if resume is None else f"step {resume}"
        parts = [f"resumed from {origin}"]
        if lost is not None:
            parts.append(f"{_duration(lost)} lost")
        if replayed is not None:
            parts.append(f"{replayed} steps replayed")
        lines = [f"resumed from {origin}; first new step {doc.get('step')}",
                 f"time lost: {'unknown' if lost is None else _duration(lost)} ({since} of "
                 f"attempt {end.get('attempt')} to the first new step)",
                 f"steps replayed: {'unknown' if replayed is None else replayed} "
                 f"(attempt {end.get('attempt')} had reached step {lost_step})"]
        return self._alert("recovered", doc, "recovered: " + ", ".join(parts), lines,
                           phase=Phase.RUNNING.value, step=_int(doc.get("step")))

    # -- preemption ----------------------------------------------------------------------

    def _on_preempted(self, doc: dict[str, Any]) -> Alert:
        snap = _int(doc.get("snapshot_step"))
        # No attempt_ended on this path: the recovery is measured from here.
        self._last_end = {"attempt": doc.get("attempt"), "step": snap if snap is not None
                          else self._step, "last_heartbeat_at": None, "time": doc.get("time")}
        self._incident = True
        where = f"emergency snapshot at step {snap}" if snap is not None else \
            f"newest local snapshot step {doc.get('newest_local_step')}"
        lines = [f"source: {doc.get('signal')}; {where}",
                 "exit 75: relaunch the same command to resume"]
        return self._alert("preempted", doc, f"preempted: {where}, exit 75", lines,
                           phase=Phase.PREEMPTED.value, step=snap)

    def _on_preempt_failed(self, doc: dict[str, Any]) -> Alert:
        self._incident = True
        cause = _clip(doc.get("root_cause") or "unknown", MAX_CAUSE_CHARS)
        return self._alert("preempted", doc, f"preemption failed: {_clip(cause, 100)}",
                           [f"root cause: {cause}", "no emergency snapshot: a relaunch resumes "
                            "from the newest valid snapshot"], phase=Phase.FAILED.value)

    def _on_workers_preempted(self, doc: dict[str, Any]) -> Alert:
        self._incident = True
        step = _int(doc.get("step"))
        at = "" if step is None else f" after a snapshot at step {step}"
        return self._alert("preempted", doc, f"workers preempted{at}; relaunching",
                           ["the ranks were signalled directly and stopped after an emergency "
                            "snapshot; relaunching at once (no restart spent)"],
                           phase=Phase.STARTING.value)

    # -- the rest ------------------------------------------------------------------------

    def _on_mirror_failed(self, doc: dict[str, Any]) -> Alert | None:
        error = _clip(doc.get("error") or "unknown", MAX_CAUSE_CHARS)
        flavour = "local" if doc.get("local") else "conflict" if doc.get("conflict") else "remote"
        # Same failure, other step or byte count: digits do not make a new incident.
        key = flavour + ":" + re.sub(r"\d+", "#", error)[:200]
        now = _num(doc.get("time")) or 0.0
        seen = self._mirror_seen.get(key)
        if seen is not None and now - seen[0] < self.mirror_repeat_s:
            self._mirror_seen[key] = (seen[0], seen[1] + 1)
            return None
        if len(self._mirror_seen) >= 64:  # bounded: the oldest key goes
            self._mirror_seen.pop(next(iter(self._mirror_seen)))
        self._mirror_seen[key] = (now, 0)
        step = doc.get("step")
        lines = [f"error: {error}",
                 f"snapshot step: {step}" if step is not None else "while listing the remote",
                 "uploads pause and retry; local snapshots not yet mirrored are kept"]
        if seen is not None and seen[1]:
            lines.append(f"({seen[1]} more such failures since the last alert)")
        what = {"local": "local snapshot cannot be mirrored",
                "conflict": "remote step owned by another snapshot"}.get(flavour, "mirror failing")
        return self._alert("mirror", doc, f"{what}: {_clip(error, 100)}", lines, phase=None)

    def _on_mirror_behind(self, doc: dict[str, Any]) -> Alert:
        pending = doc.get("pending_steps")
        count = len(pending) if isinstance(pending, list) else pending
        lines = [f"not uploaded: {pending}; newest remote step {doc.get('newest_remote_step')}, "
                 f"lag {doc.get('lag_steps')} steps"]
        if doc.get("error"):
            lines.append(f"error: {_clip(doc.get('error'), MAX_CAUSE_CHARS)}")
        lines.append("the local snapshots are kept; the next launch uploads them")
        return self._alert("mirror", doc, f"mirror behind at the end of the run: {count} "
                           f"snapshot(s) not uploaded", lines, phase=None)

    def _on_diverged(self, doc: dict[str, Any]) -> Alert:
        first = doc.get("first_divergence_step")
        lines = [f"first divergence at step {first} on rank {doc.get('rank')} (checked through "
                 f"step {doc.get('checked_through_step')})",
                 "the resumed run does not reproduce the failed attempt's losses bit for bit"]
        return self._alert("diverged", doc, f"resume diverged at step {first}", lines,
                           phase=None)

    def _on_finished(self, doc: dict[str, Any]) -> Alert:
        step = _int(doc.get("step"))
        return self._alert("finished", doc, f"finished at step {step}",
                           ["the run finished (exit 0)"], phase=Phase.DONE.value, step=step)


_HANDLERS: dict[str, Callable[[AlertBuilder, dict[str, Any]], Alert | None]] = {
    "supervisor.hang_detected": lambda b, d: b._on_hang(d),
    "supervisor.attempt_ended": lambda b, d: b._on_attempt_ended(d),
    "supervisor.attempt_failed": lambda b, d: b._on_failed(d),
    "supervisor.gave_up": AlertBuilder._on_gave_up,
    "supervisor.progress_resumed": AlertBuilder._on_resumed,
    "supervisor.preempted": AlertBuilder._on_preempted,
    "supervisor.preempt_failed": AlertBuilder._on_preempt_failed,
    "supervisor.workers_preempted": AlertBuilder._on_workers_preempted,
    "mirror.failed": AlertBuilder._on_mirror_failed,
    "mirror.behind": AlertBuilder._on_mirror_behind,
    "resume.diverged": AlertBuilder._on_diverged,
    "supervisor.finished": AlertBuilder._on_finished,
}


# -- sending -------------------------------------------------------------------------------


class Target(Protocol):
    """Where alerts go: an apprise plugin (``notify`` returns False on failure)."""

    def notify(self, *args: Any, **kwargs: Any) -> bool: ...


def redact(url: str, plugin: object | None = None) -> str:
    """``scheme://host[:port]`` of ``url``, and only when the plugin's host is a real host name:
    many apprise schemes carry a token there (``slack://TokenA/...``, ``tgram://bot-token/``),
    which then shows as ``scheme://***``."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else "?"
    if not re.fullmatch(r"[a-z0-9+.-]{1,20}", scheme):
        scheme = "?"
    tokens = getattr(plugin, "template_tokens", None)
    host = getattr(plugin, "host", None)
    if not isinstance(tokens, Mapping) or "host" not in tokens or not isinstance(host, str) \
            or not host:
        return f"{scheme}://***"
    port = getattr(plugin, "port", None)
    return f"{scheme}://{host}" + (f":{port}" if isinstance(port, int) else "")


def secrets_of(url: str, shown: str) -> list[str]:
    """The parts of ``url`` that may be secret (all but the scheme and what :func:`redact`
    shows), longest first: error texts are scrubbed of them before they are logged."""
    rest = url.split("://", 1)[-1]
    shown_parts = set(re.split(r"[/:]+", shown.split("://", 1)[-1]))
    parts = {p for p in re.split(r"[/:@?&=#,]+", rest) if len(p) >= 3} - shown_parts
    parts |= {unquote(p) for p in parts}
    return sorted(parts, key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


@dataclass
class Destination:
    """One ``--notify`` URL, instantiated once: the plugin, its redacted name, its secrets."""

    target: Target
    name: str
    secrets: list[str] = field(default_factory=list)


def destination(url: str, *, timeout_s: float) -> Destination | None:
    """The apprise plugin of ``url`` with our connect and read timeouts (unless the URL sets
    its own ``cto=``/``rto=``, apprise's parameters); None when apprise cannot use the URL
    (unknown scheme, malformed, a plugin's missing dependency), which is logged redacted."""
    _quiet_apprise()
    plugin = apprise.Apprise.instantiate(url)
    name = redact(url, plugin)
    if plugin is None:
        log.warning("notify.url_invalid", target=name,
                    error="apprise does not accept this URL (scheme, format or a missing plugin "
                    "dependency); no alerts go there")
        return None
    query = url.split("?", 1)[1] if "?" in url else ""
    given = {p.split("=", 1)[0].lower() for p in query.split("&")}
    # apprise's default is 4 s each (15 s connect for email); requests applies the read timeout
    # to each socket read, so a hung endpoint costs at most connect + read per request.
    if "cto" not in given:
        plugin.socket_connect_timeout = timeout_s
    if "rto" not in given:
        plugin.socket_read_timeout = timeout_s
    return Destination(target=plugin, name=name, secrets=secrets_of(url, name))


class _SendFailed(Exception):
    pass


class _AppriseLogs(logging.Handler):
    """Where apprise's own log messages go instead of the terminal: some name the URL or the
    request URL, token included (``Unparseable URL slack://T.../...``). Messages of a thread
    that is collecting (:func:`_collecting`) explain its failed send and are kept, scrubbed
    before use; the rest are dropped."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        lines: list[str] | None = getattr(self.local, "lines", None)
        if lines is not None:
            with contextlib.suppress(Exception):  # a broken log record never fails a send
                lines.append(record.getMessage())


_APPRISE_LOGS = _AppriseLogs()


def _quiet_apprise() -> None:
    """Route the ``apprise`` logger to :data:`_APPRISE_LOGS` only (idempotent); WARNING keeps
    its debug dumps (payloads, request URLs) from even being formatted."""
    logger = logging.getLogger("apprise")
    if _APPRISE_LOGS not in logger.handlers:
        logger.addHandler(_APPRISE_LOGS)
    logger.propagate = False
    logger.setLevel(logging.WARNING)


@contextlib.contextmanager
def _collecting() -> Iterator[list[str]]:
    lines: list[str] = []
    _APPRISE_LOGS.local.lines = lines
    try:
        yield lines
    finally:
        _APPRISE_LOGS.local.lines = None


class _Sender:
    """One destination's queue and daemon thread: a hung or dead endpoint delays only its own
    alerts, never another URL's."""

    def __init__(self, dest: Destination, owner: Notifier, queue_size: int) -> None:
        self.dest = dest
        self._owner = owner
        self.queue: collections.deque[Alert] = collections.deque(maxlen=queue_size)
        self.cond = threading.Condition()
        self.dropped = 0
        self.closing = False
        self.deadline: float | None = None
        self.crash: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="orchestrator-notify",
                                       daemon=True)
        self.thread.start()

    def put(self, alerts: list[Alert], now: float) -> None:
        with self.cond:
            if self.deadline is not None and now >= self.deadline:
                self.dropped += len(alerts)
                return
            for alert in alerts:
                if len(self.queue) == self.queue.maxlen:
                    self.dropped += 1  # the deque drops the oldest itself
                self.queue.append(alert)
            self.cond.notify_all()

    def _main(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.closing:
                        self.cond.wait()
                    if not self.queue or self._owner._past(self.deadline):
                        return
                    alert = self.queue.popleft()
                    dropped, self.dropped = self.dropped, 0
                if dropped:
                    log.warning("notify.dropped", target=self.dest.name, alerts=dropped,
                                queue_size=self.queue.maxlen)
                    alert = Alert(kind=alert.kind, title=alert.title, event=alert.event,
                                  time=alert.time, body=alert.body + f"\n({dropped} earlier "
                                  "alerts were dropped: the alert queue was full)")
                self._owner._deliver(self, alert)
        except BaseException as exc:  # surfaced by on_event / close (notify.crashed)
            self.crash = exc

    def sleep(self, seconds: float) -> None:
        """A retry wait that close() cuts short (the last tries then fit in its bound)."""
        with self.cond:
            if not self.closing:
                self.cond.wait(seconds)


class Notifier:
    """Queues the alerts of the events it is handed (:meth:`on_event`); sends them on one daemon
    thread per URL; :meth:`close` sends what is left within ``close_timeout_s``."""

    def __init__(
        self,
        destinations: list[Destination],
        builder: AlertBuilder,
        *,
        attempts: int = 3,
        close_timeout_s: float = 10.0,
        queue_size: int = QUEUE_SIZE,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = RETRY_MAX_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._builder = builder
        self._attempts = attempts
        self._close_timeout_s = close_timeout_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._monotonic = monotonic
        self._build_lock = threading.Lock()
        self._crash_reported = False
        self._counts_lock = threading.Lock()
        self.sent = 0
        self.failed = 0
        _quiet_apprise()
        self._senders = [_Sender(d, self, queue_size) for d in destinations]

    # -- the emitting threads ------------------------------------------------------------------

    def on_event(self, doc: dict[str, Any]) -> None:
        """Turn ``doc`` into alerts and queue them: dict work under a short lock, no I/O."""
        with self._build_lock:
            alerts = self._builder.feed(doc)
        if alerts:
            now = self._monotonic()
            for sender in self._senders:
                sender.put(alerts, now)
        if not self._crash_reported and any(s.crash is not None for s in self._senders):
            self._report_crash()

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Send what is queued within ``close_timeout_s``, then stop. Never raises: what is
        left unsent is logged (``notify.unsent``), a crash of a thread ``notify.crashed``."""
        with self._build_lock:
            last = self._builder.flush()
        deadline = self._monotonic() + self._close_timeout_s
        for sender in self._senders:
            if last:
                sender.put(last, self._monotonic())
            with sender.cond:
                sender.closing = True
                sender.deadline = deadline
                sender.cond.notify_all()
        for sender in self._senders:
            # A request in flight is bounded by its own timeouts; the thread is a daemon, so
            # one hung beyond the deadline never holds the process.
            sender.thread.join(max(0.0, deadline - self._monotonic()) + 0.2)
            with sender.cond:
                left = len(sender.queue) + sender.dropped
                sender.queue.clear()
            alive = sender.thread.is_alive()
            if alive or left:
                log.warning("notify.unsent", target=sender.dest.name, alerts=left,
                            in_flight=alive, timeout_s=self._close_timeout_s)
        if not self._crash_reported and any(s.crash is not None for s in self._senders):
            self._report_crash()

    def _report_crash(self) -> None:
        self._crash_reported = True
        for sender in self._senders:
            exc = sender.crash
            if exc is not None:
                log.error("notify.crashed", target=sender.dest.name, error=repr(exc),
                          exc_info=(type(exc), exc, exc.__traceback__))

    # -- the sending threads ---------------------------------------------------------------

    def _past(self, deadline: float | None) -> bool:
        return deadline is not None and self._monotonic() >= deadline

    def _deliver(self, sender: _Sender, alert: Alert) -> None:
        dest = sender.dest

        def stop(rs: RetryCallState) -> bool:
            if rs.attempt_number >= self._attempts:
                return True
            # Closing: no try that would start after the deadline.
            deadline = sender.deadline
            return deadline is not None and self._monotonic() + rs.upcoming_sleep >= deadline

        retrying = Retrying(
            stop=stop,
            wait=wait_exponential(multiplier=self._retry_initial_s, max=self._retry_max_s),
            retry=retry_if_exception_type(_SendFailed),
            sleep=sender.sleep,
            reraise=True,
        )
        tries = 0
        try:
            for attempt in retrying:
                with attempt:
                    tries += 1
                    self._send_once(dest, alert)
        except _SendFailed as exc:
            with self._counts_lock:
                self.failed += 1
            log.warning("notify.failed", target=dest.name, kind=alert.kind,
                        source_event=alert.event, attempts=tries,
                        error=scrub(str(exc), dest.secrets))
            return
        with self._counts_lock:
            self.sent += 1
        log.info("notify.sent", target=dest.name, kind=alert.kind, source_event=alert.event,
                 attempts=tries, latency_s=round(time.time() - alert.time, 3))

    def _send_once(self, dest: Destination, alert: Alert) -> None:
        with _collecting() as lines:
            try:
                ok = dest.target.notify(body=alert.body, title=alert.title, notify_type=_LEVELS.get(
                    alert.kind, apprise.NotifyType.INFO))
            except Exception as exc:  # a plugin's bug is one failed send, not a dead notifier
                raise _SendFailed(f"{type(exc).__name__}: {exc}") from None
        if not ok:
            detail = "; ".join(lines[-3:]) or "apprise reported a failed send"
            raise _SendFailed(_clip(detail, MAX_CAUSE_CHARS))


def attach(config: LaunchConfig, events: EventLog, *, run_id: str, settings: Settings) -> Notifier | None:
    """A notifier subscribed to ``events`` when ``config.notify`` names URLs, else None.

    The run's earlier events (previous launches on this dir) are replayed into the builder
    without sending, so that the first step after a relaunch is reported as the recovery from
    the preemption or failure that stopped the last launch.
    """
    if not config.notify:
        return None
    destinations = [d for d in (destination(u, timeout_s=settings.notify_timeout_s)
                                for u in config.notify) if d is not None]
    if not destinations:
        return None
    kinds = frozenset(NOTIFY_KINDS if config.notify_on is None else config.notify_on)
    builder = AlertBuilder(run_id=run_id, node_rank=config.node_rank, kinds=kinds,
                           mirror_repeat_s=settings.notify_repeat_s)
    for doc in read_events(RunPaths.of(config.checkpoint_dir)):
        builder.feed(doc)
    builder.forget_alerts()
    notifier = Notifier(destinations, builder, attempts=settings.notify_attempts,
                        close_timeout_s=settings.notify_close_timeout_s)
    events.subscribe(notifier.on_event)
    log.info("notify.attached", targets=[d.name for d in destinations], kinds=sorted(kinds))
    return notifier
