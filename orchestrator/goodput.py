"""Goodput accounting: what each incident (crash, hang, preemption) cost a run, from its files.

Pure functions over the supervisor's ``run/events.jsonl`` (:func:`incidents`, :func:`goodput`,
:func:`summarize`, :func:`to_json`), optionally sharpened by two other records of the same run:
rank 0's determinism journal (``run/journal/rank-0.jsonl``: the time each attempt finished
loading its snapshot, and every completed step, without times) and the committed snapshots'
manifests (``created_at`` at a known step and attempt). :func:`load_evidence` reads all three
from a checkpoint dir; nothing here imports torch.

Definitions (all times are wall-clock seconds, the events' ``time`` field):

- **launch**: the events from one ``supervisor.started`` to the last event before the next one.
  A launch ends at its last event, or at ``now`` when the caller says the run is still going.
- **wall time**: the sum of the launches' durations, i.e. from the first ``supervisor.started``
  to the last event (or ``now``) minus the gaps between launches. A gap between launches
  (after a preemption's exit 75, the time until someone relaunches) is not the orchestrator's
  cost: it is reported apart as ``downtime_between_launches_s`` (per incident and in total) and
  is left out of goodput's denominator.
- **step interval**: the step-weighted median of seconds per step over segments of one attempt
  between two points whose step and time are both measured (first completed step of an attempt,
  snapshot commits, the newest heartbeat before an attempt ended).
- **an incident** is an attempt that did not finish: a ``crash`` (the group exited non-zero),
  a ``hang`` (the watchdog killed it), a ``preemption`` (a signal or cloud notice; the ranks
  saved an emergency snapshot), an ``interrupted`` supervisor (SIGINT) or a ``lost`` attempt
  (no end was recorded: the supervisor itself died). Its parts:

  - ``detect_s``: from the last completed step (the newest heartbeat's time, moved forward by
    the steps rank 0 journaled after it at the step interval) to the supervisor seeing the
    group gone (``attempt_ended``). It includes the group's teardown, except for a hang, where
    ``hang_detected`` separates them (``teardown_s`` = ``attempt_ended`` - ``hang_detected``).
    A preemption is detected at once (``detect_s`` 0); its ``teardown_s`` runs from the last
    step (the emergency snapshot's ``created_at``, else the request) to the group's end. An
    attempt that never completed a step lost all of it: ``detect_s`` then runs from its start.
  - ``restart_s``: from the end to the next ``attempt_started`` (backoff + relaunch). Across
    launches: the rest of the ending launch plus the next launch's time to its first attempt.
  - ``startup_load_s``: from ``attempt_started`` to rank 0's journal start line of the next
    attempt (written once the snapshot is loaded); without a journal, to the first completed
    step (``progress_resumed.step_time``) less the steps it took at the step interval.
  - ``steps_replayed``: the failed attempt's last completed step (heartbeats, or the journal's
    when it has more) minus the step the next attempt resumed from (0 for a fresh start).
  - ``replay_s``: ``steps_replayed`` x the step interval (an estimate).
  - ``lost_s`` = ``detect_s`` + ``teardown_s`` + ``restart_s`` + ``startup_load_s`` +
    ``replay_s`` (parts that are unknown count 0).

- **overhead** that is no incident's: ``startup_s``, the first launch's time from
  ``supervisor.started`` to its first completed step (less that step's interval), and
  ``shutdown_s``, a finished run's time from its last step to ``supervisor.finished`` (final
  snapshot, checksum, exit).
- **goodput** = productive / wall time, productive = wall time - every incident's ``lost_s`` -
  ``startup_s`` - ``shutdown_s``, clamped to [0, 1]; None without a ``supervisor.started``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from contract.documents import JournalEntry, JournalStart, parse_journal_line
from contract.paths import RunPaths
from orchestrator.runstate import read_events
from storage import LocalSnapshotStore

#: Events that end a launch's last attempt for good (no further attempt in that launch).
_TERMINAL = frozenset({
    "supervisor.finished", "supervisor.gave_up", "supervisor.preempted",
    "supervisor.preempt_failed", "supervisor.interrupted",
})
#: Event names whose ``step`` is not a completed step of their attempt (a selection, a resume).
_NOT_PROGRESS = frozenset({"supervisor.resume_selected", "supervisor.resumed_elsewhere",
                           "supervisor.snapshot_invalid", "supervisor.resume_corrupt",
                           "supervisor.already_done"})


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


@dataclass(frozen=True)
class SnapshotPoint:
    """A committed snapshot: ``step`` was complete at ``created_at`` in ``attempt`` (if known)."""

    step: int
    created_at: float
    attempt: int | None = None


@dataclass
class JournalSession:
    """What rank 0's journal says of one attempt: when its snapshot was loaded, its last step."""

    attempt: int
    started_at: float | None
    resumed_from: int
    last_step: int | None = None


@dataclass
class Attempt:
    """One attempt as the events (and journal) tell it."""

    attempt: int
    launch: int
    started_at: float | None = None
    resume_step: int | None = None
    first_step: int | None = None
    first_step_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    end_step: int | None = None
    last_heartbeat_at: float | None = None
    hang_at: float | None = None
    preempt_at: float | None = None
    #: The step complete when the preemption was requested (a heartbeat's, so a lower bound).
    preempt_request_step: int | None = None
    preempted_at: float | None = None
    preempt_step: int | None = None
    finished_at: float | None = None
    interrupted_at: float | None = None
    gave_up: bool = False
    cause: str | None = None
    loaded_at: float | None = None
    journal_last_step: int | None = None
    max_step: int | None = None

    @property
    def kind(self) -> str | None:
        """``None`` for an attempt that finished (or is still running)."""
        if self.finished_at is not None:
            return None
        if self.preempted_at is not None or self.preempt_step is not None:
            return "preemption"
        if self.hang_at is not None:
            return "hang"
        if self.interrupted_at is not None:
            return "interrupted"
        if self.ended_at is not None:
            return None if self.exit_code == 0 else "crash"
        return "lost"

    @property
    def end_time(self) -> float | None:
        """When the supervisor saw the group gone."""
        for t in (self.ended_at, self.preempted_at, self.interrupted_at):
            if t is not None:
                return t
        return None


@dataclass(frozen=True)
class Launch:
    """One ``supervisor.started`` and what followed it."""

    index: int
    started_at: float
    ended_at: float
    #: A terminal event was recorded (else the supervisor is running, or died unrecorded).
    closed: bool


@dataclass(frozen=True, kw_only=True)
class Incident:
    """One attempt that did not finish, and what it cost (see the module docstring)."""

    kind: str
    attempt: int
    next_attempt: int | None
    #: When the supervisor saw the group gone.
    at: float | None
    #: The failed attempt's last completed step.
    step: int | None
    #: The snapshot step the next attempt resumed from (0: a fresh start).
    resume_step: int | None
    exit_code: int | None
    cause: str | None
    detect_s: float | None
    teardown_s: float | None
    restart_s: float | None
    startup_load_s: float | None
    steps_replayed: int | None
    replay_s: float | None
    lost_s: float
    #: Time between this launch's end and the next launch (not counted in goodput).
    downtime_between_launches_s: float | None
    #: A next attempt made progress (False: the run gave up, or is still recovering).
    recovered: bool

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        for key, value in doc.items():
            if isinstance(value, float):
                doc[key] = round(value, 3)
        return doc


@dataclass(frozen=True, kw_only=True)
class Summary:
    """Goodput of a run and its incidents."""

    goodput: float | None
    wall_s: float
    productive_s: float
    lost_s: float
    startup_s: float
    shutdown_s: float
    downtime_between_launches_s: float
    step_interval_s: float | None
    launches: int
    incidents: list[Incident] = field(default_factory=list)

    def detail(self) -> dict[str, Any]:
        """``status --json``'s ``goodput_detail``: how ``goodput`` was computed."""
        return {
            "wall_s": round(self.wall_s, 3),
            "productive_s": round(self.productive_s, 3),
            "lost_s": round(self.lost_s, 3),
            "startup_s": round(self.startup_s, 3),
            "shutdown_s": round(self.shutdown_s, 3),
            "downtime_between_launches_s": round(self.downtime_between_launches_s, 3),
            "step_interval_s": None if self.step_interval_s is None
            else round(self.step_interval_s, 6),
            "launches": self.launches,
        }


# -- reading the evidence ------------------------------------------------------------------


def journal_sessions(records: Iterable[JournalStart | JournalEntry | None]) -> dict[int, JournalSession]:
    """One session per attempt from rank 0's journal records, in file order (old file first)."""
    out: dict[int, JournalSession] = {}
    for record in records:
        if isinstance(record, JournalStart):
            out[record.attempt] = JournalSession(
                attempt=record.attempt, started_at=record.time or None,
                resumed_from=record.resumed_from,
            )
        elif isinstance(record, JournalEntry):
            session = out.get(record.attempt)
            if session is None:  # its start line rotated away
                session = out[record.attempt] = JournalSession(
                    attempt=record.attempt, started_at=None, resumed_from=0)
            if session.last_step is None or record.step > session.last_step:
                session.last_step = record.step
    return out


def read_journal(paths: RunPaths, rank: int = 0) -> list[JournalStart | JournalEntry | None]:
    """Rank ``rank``'s journal records, rotated file first; [] when there is none."""
    out: list[JournalStart | JournalEntry | None] = []
    for path in (paths.journal_old(rank), paths.journal(rank)):
        try:
            with open(path, "rb") as f:
                out.extend(parse_journal_line(line) for line in f)
        except OSError:
            continue
    return out


def snapshot_points(checkpoint_dir: str) -> list[SnapshotPoint]:
    """Every committed local snapshot with a readable manifest, oldest first."""
    if not os.path.isdir(os.path.join(os.path.abspath(checkpoint_dir), "snapshots")):
        return []
    out: list[SnapshotPoint] = []
    for info in LocalSnapshotStore(checkpoint_dir).list():
        if info.manifest is None:
            continue
        out.append(SnapshotPoint(step=info.step, created_at=info.manifest.created_at,
                                 attempt=_int(info.manifest.metadata.get("attempt"))))
    return out


@dataclass(frozen=True)
class Evidence:
    """Everything a checkpoint dir tells about its run's timeline."""

    events: list[dict[str, Any]]
    journal: dict[int, JournalSession]
    snapshots: list[SnapshotPoint]


def load_evidence(checkpoint_dir: str) -> Evidence:
    """Events, rank 0's journal sessions and snapshot points of a checkpoint dir (read only)."""
    paths = RunPaths.of(checkpoint_dir)
    return Evidence(
        events=read_events(paths),
        journal=journal_sessions(read_journal(paths)),
        snapshots=snapshot_points(checkpoint_dir),
    )


# -- the accounting ------------------------------------------------------------------------


def launches(events: Sequence[Mapping[str, Any]], *, now: float | None = None) -> list[Launch]:
    """The launches of a run; the last one ends at ``now`` when given and it has no terminal
    event (a running supervisor)."""
    out: list[Launch] = []
    start: float | None = None
    last: float | None = None
    closed = False
    for event in events:
        t = _num(event.get("time"))
        name = event.get("event")
        if t is None or name == "supervisor.already_done":
            continue
        if name == "supervisor.started":
            if start is not None and last is not None:
                out.append(Launch(len(out), start, last, closed))
            start, last, closed = t, t, False
            continue
        if start is None:
            continue
        last = max(last or t, t)
        if name in _TERMINAL:
            closed = True
    if start is not None and last is not None:
        end = max(last, now) if now is not None and not closed else last
        out.append(Launch(len(out), start, end, closed))
    return out


def attempts(
    events: Sequence[Mapping[str, Any]],
    *,
    journal: Mapping[int, JournalSession] | None = None,
) -> list[Attempt]:
    """Every attempt of the run, in order, as the events and the journal tell it."""
    out: dict[int, Attempt] = {}
    launch = -1
    for event in events:
        name = event.get("event")
        t = _num(event.get("time"))
        if name == "supervisor.started":
            launch += 1
            continue
        number = _int(event.get("attempt"))
        if number is None or t is None or launch < 0:
            continue
        a = out.get(number)
        if a is None:
            a = out[number] = Attempt(attempt=number, launch=launch)
        step = _int(event.get("step"))
        if step is not None and name not in _NOT_PROGRESS and name != "supervisor.preempted":
            a.max_step = step if a.max_step is None else max(a.max_step, step)
        if name == "supervisor.attempt_started":
            a.started_at = t
            a.resume_step = _int(event.get("resume_step"))
        elif name == "supervisor.progress_resumed":
            a.first_step, a.first_step_at = step, _num(event.get("step_time"))
        elif name == "supervisor.attempt_ended":
            a.ended_at, a.exit_code, a.end_step = t, _int(event.get("exit_code")), step
            a.last_heartbeat_at = _num(event.get("last_heartbeat_at"))
            if a.resume_step is None:
                a.resume_step = _int(event.get("resume_step"))
        elif name == "supervisor.attempt_failed":
            cause = event.get("root_cause")
            a.cause = cause if isinstance(cause, str) else a.cause
        elif name == "supervisor.hang_detected":
            a.hang_at = t
        elif name == "supervisor.preempt_requested":
            if a.preempt_at is None:
                a.preempt_at, a.preempt_request_step = t, step
        elif name == "supervisor.preempted":
            a.preempted_at = t
            a.preempt_step = _int(event.get("snapshot_step"))
            if a.exit_code is None:
                a.exit_code = _int(event.get("exit_code"))
            a.cause = f"preempted ({event.get('signal') or 'notice'})"
        elif name == "supervisor.workers_preempted":
            a.preempt_step = step
            a.cause = "preempted (ranks signalled directly)"
        elif name == "supervisor.finished":
            a.finished_at = t
        elif name == "supervisor.interrupted":
            a.interrupted_at = t
            a.cause = f"supervisor interrupted ({event.get('signal')})"
        elif name == "supervisor.gave_up":
            a.gave_up = True
            cause = event.get("root_cause")
            a.cause = cause if isinstance(cause, str) else a.cause
    for a in out.values():
        session = (journal or {}).get(a.attempt)
        if session is not None:
            a.loaded_at = session.started_at
            a.journal_last_step = session.last_step
    return [out[k] for k in sorted(out)]


def step_interval(
    events: Sequence[Mapping[str, Any]],
    *,
    snapshots: Sequence[SnapshotPoint] = (),
    journal: Mapping[int, JournalSession] | None = None,
) -> float | None:
    """Seconds per step: the step-weighted median over measured segments within one attempt."""
    anchors = measured_points(attempts(events, journal=journal), snapshots)
    samples: list[tuple[float, int]] = []
    for points in anchors.values():
        points.sort()
        for (s0, t0), (s1, t1) in itertools.pairwise(points):
            if s1 > s0 and t1 >= t0:
                samples.append(((t1 - t0) / (s1 - s0), s1 - s0))
    if not samples:
        return None
    samples.sort()
    total = sum(w for _, w in samples)
    acc = 0
    for value, weight in samples:
        acc += weight
        if 2 * acc >= total:
            return value
    return samples[-1][0]  # pragma: no cover - the loop always returns


def measured_points(
    runs: Sequence[Attempt], snapshots: Sequence[SnapshotPoint] = ()
) -> dict[int, list[tuple[int, float]]]:
    """Per attempt, the (step, time) pairs that were measured, not estimated: its first
    completed step, its snapshot commits, its newest heartbeat before it ended."""
    out: dict[int, list[tuple[int, float]]] = {}
    for a in runs:
        points = out.setdefault(a.attempt, [])
        if a.first_step is not None and a.first_step_at is not None:
            points.append((a.first_step, a.first_step_at))
        if a.end_step is not None and a.last_heartbeat_at is not None:
            points.append((a.end_step, a.last_heartbeat_at))
    for snap in snapshots:
        if snap.attempt is not None and snap.attempt in out:
            out[snap.attempt].append((snap.step, snap.created_at))
    for points in out.values():
        points[:] = sorted(set(points))
    return out


def _last_step(a: Attempt, points: Sequence[tuple[int, float]], interval: float | None
               ) -> tuple[int | None, float | None]:
    """(last completed step, its estimated time) of an attempt: the newest measured point, moved
    forward at the step interval to the furthest step known to be complete (the journal's, an
    emergency snapshot's); never later than the attempt's end."""
    known = list(points)
    if a.preempt_request_step is not None and a.preempt_at is not None:
        known.append((a.preempt_request_step, a.preempt_at))  # complete by the request
    step, at = max(known) if known else (None, None)
    furthest = max((s for s in (a.preempt_step, a.journal_last_step) if s is not None),
                   default=None)
    if furthest is not None and (step is None or furthest > step):
        if at is not None and step is not None and interval is not None:
            at = at + (furthest - step) * interval
        elif at is None:
            at = a.preempt_at
        step = furthest
    end = a.end_time
    if at is not None and end is not None:
        at = min(at, end)
    return step, at


def incidents(
    events: Sequence[Mapping[str, Any]],
    *,
    now: float | None = None,
    journal: Mapping[int, JournalSession] | None = None,
    snapshots: Sequence[SnapshotPoint] = (),
) -> list[Incident]:
    """Every attempt that did not finish, oldest first, with its cost (module docstring).

    ``now``: the run is still going (its supervisor is alive); a recovery in progress is
    costed up to ``now``.
    """
    return _account(events, now=now, journal=journal, snapshots=snapshots)[0]


def _account(
    events: Sequence[Mapping[str, Any]],
    *,
    now: float | None,
    journal: Mapping[int, JournalSession] | None,
    snapshots: Sequence[SnapshotPoint],
) -> tuple[list[Incident], list[Attempt], list[Launch], float | None]:
    runs = attempts(events, journal=journal)
    spans = launches(events, now=now)
    interval = step_interval(events, snapshots=snapshots, journal=journal)
    points = measured_points(runs, snapshots)
    out: list[Incident] = []
    for i, a in enumerate(runs):
        kind = a.kind
        if kind is None:
            continue
        if kind == "lost" and a.launch == len(spans) - 1 and now is not None:
            continue  # still running
        nxt = runs[i + 1] if i + 1 < len(runs) else None
        out.append(_incident(a, nxt, kind, spans, points.get(a.attempt, []), interval, now))
    return out, runs, spans, interval


def _incident(
    a: Attempt,
    nxt: Attempt | None,
    kind: str,
    spans: Sequence[Launch],
    points: Sequence[tuple[int, float]],
    interval: float | None,
    now: float | None,
) -> Incident:
    step, last_at = _last_step(a, points, interval)
    if step is None and a.started_at is not None:
        step = a.resume_step or 0  # it completed no step: it was where it started
    launch = spans[a.launch] if a.launch < len(spans) else None
    end = a.end_time
    if end is None and launch is not None:  # lost: the launch's last event
        end = launch.ended_at
    progressed = a.first_step is not None or (step is not None and step > (a.resume_step or 0))
    detect: float | None = None
    teardown: float | None = None
    if kind == "preemption":
        detect = 0.0
        start = last_at if last_at is not None else a.preempt_at
        if end is not None and start is not None:
            teardown = max(0.0, end - start)
    elif not progressed:
        if end is not None and a.started_at is not None:
            detect = max(0.0, end - a.started_at)
    elif kind == "hang" and a.hang_at is not None and last_at is not None:
        detect = max(0.0, a.hang_at - last_at)
        if end is not None:
            teardown = max(0.0, end - a.hang_at)
    elif end is not None and last_at is not None:
        detect = max(0.0, end - last_at)

    restart: float | None = None
    startup: float | None = None
    downtime: float | None = None
    resume: int | None = None
    replayed: int | None = None
    recovered = False
    if nxt is not None and nxt.started_at is not None and end is not None:
        if nxt.launch == a.launch:
            restart = max(0.0, nxt.started_at - end)
        else:
            nxt_launch = spans[nxt.launch] if nxt.launch < len(spans) else None
            ending = launch.ended_at if launch is not None else end
            if nxt_launch is not None:
                downtime = max(0.0, nxt_launch.started_at - ending)
                restart = max(0.0, ending - end) + max(0.0, nxt.started_at - nxt_launch.started_at)
        resume = nxt.resume_step or 0
        if step is not None:
            replayed = max(0, step - resume)
        recovered = nxt.first_step is not None
        if nxt.loaded_at is not None and nxt.loaded_at >= nxt.started_at:
            startup = nxt.loaded_at - nxt.started_at
        elif nxt.first_step_at is not None:
            ahead = (nxt.first_step or resume) - resume
            startup = max(0.0, nxt.first_step_at - nxt.started_at - ahead * (interval or 0.0))
        elif now is not None:
            startup = max(0.0, now - nxt.started_at)  # still starting
    elif nxt is None and now is not None and end is not None and launch is not None \
            and launch.index == len(spans) - 1 and not launch.closed:
        restart = max(0.0, now - end)  # recovering now (backoff, relaunch)
    replay = None if replayed is None or interval is None else replayed * interval
    lost = sum(x or 0.0 for x in (detect, teardown, restart, startup, replay))
    return Incident(
        kind=kind, attempt=a.attempt, next_attempt=None if nxt is None else nxt.attempt,
        at=end, step=step, resume_step=resume, exit_code=a.exit_code, cause=a.cause,
        detect_s=detect, teardown_s=teardown, restart_s=restart, startup_load_s=startup,
        steps_replayed=replayed, replay_s=replay, lost_s=lost,
        downtime_between_launches_s=downtime, recovered=recovered,
    )


def summarize(
    events: Sequence[Mapping[str, Any]],
    *,
    now: float | None = None,
    journal: Mapping[int, JournalSession] | None = None,
    snapshots: Sequence[SnapshotPoint] = (),
) -> Summary:
    """Goodput, its parts and the incidents of a run (``now``: its supervisor is alive)."""
    found, runs, spans, interval = _account(events, now=now, journal=journal, snapshots=snapshots)
    wall = sum(max(0.0, s.ended_at - s.started_at) for s in spans)
    between = sum(max(0.0, b.started_at - a.ended_at) for a, b in itertools.pairwise(spans))
    startup = 0.0
    first = next((a for a in runs if a.launch == 0), None)
    if spans and first is not None:
        done_at = first.loaded_at
        if done_at is None and first.first_step_at is not None:
            ahead = (first.first_step or 0) - (first.resume_step or 0)
            done_at = first.first_step_at - ahead * (interval or 0.0)
        if done_at is None and now is not None and first.ended_at is None:
            done_at = now  # still starting
        if done_at is not None:
            startup = max(0.0, done_at - spans[0].started_at)
    shutdown = 0.0
    last = runs[-1] if runs else None
    if last is not None and last.finished_at is not None and last.last_heartbeat_at is not None:
        shutdown = max(0.0, last.finished_at - last.last_heartbeat_at)
    lost = sum(i.lost_s for i in found)
    productive = max(0.0, wall - lost - startup - shutdown)
    ratio = None if not spans or wall <= 0 else min(1.0, productive / wall)
    return Summary(
        goodput=ratio, wall_s=wall, productive_s=productive, lost_s=lost, startup_s=startup,
        shutdown_s=shutdown, downtime_between_launches_s=between, step_interval_s=interval,
        launches=len(spans), incidents=found,
    )


def goodput(
    events: Sequence[Mapping[str, Any]],
    now: float | None = None,
    *,
    journal: Mapping[int, JournalSession] | None = None,
    snapshots: Sequence[SnapshotPoint] = (),
) -> float | None:
    """The fraction of wall time spent on steps that count (module docstring); None when no
    supervisor ever started."""
    return summarize(events, now=now, journal=journal, snapshots=snapshots).goodput


def to_json(summary: Summary) -> dict[str, Any]:
    """The ``status --json`` fields: ``goodput``, ``incidents`` and ``goodput_detail``."""
    return {
        "goodput": None if summary.goodput is None else round(summary.goodput, 4),
        "incidents": [i.to_json() for i in summary.incidents],
        "goodput_detail": summary.detail(),
    }


def status_fields(checkpoint_dir: str, *, now: float | None) -> dict[str, Any]:
    """:func:`to_json` of a checkpoint dir (``now``: its supervisor is alive)."""
    evidence = load_evidence(checkpoint_dir)
    return to_json(summarize(evidence.events, now=now, journal=evidence.journal,
                             snapshots=evidence.snapshots))


def render_line(doc: Mapping[str, Any]) -> str:
    """The ``goodput`` line of the ``status`` table, from a status document."""
    value = _num(doc.get("goodput"))
    if value is None:
        return "- (no supervisor events here: unknown, or read from a mirror)"
    found = doc.get("incidents")
    count = len(found) if isinstance(found, list) else 0
    detail = doc.get("goodput_detail")
    lost = _num(detail.get("lost_s")) if isinstance(detail, dict) else None
    wall = _num(detail.get("wall_s")) if isinstance(detail, dict) else None
    text = f"{value:.1%} ({count} incident{'' if count == 1 else 's'}"
    if lost is not None and wall is not None:
        text += f", {lost:.1f} s lost of {wall:.1f} s"
    return text + ")"
