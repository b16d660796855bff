"""Metrics (``launch --metrics-port P`` / ``--metrics-file PATH``): the run as Prometheus text.

The supervisor already knows everything an operator graphs or alerts on: the step its ranks
report, attempts, restarts and preemptions, the newest local and remote snapshots, the mirror's
uploads. This module turns that into Prometheus metrics on a private
:class:`~prometheus_client.CollectorRegistry` (never the process-wide default one, so nothing
else in the process leaks into a run's scrape), served over HTTP on
``--metrics-host:--metrics-port`` and/or written atomically to ``--metrics-file`` for
node_exporter's textfile collector. It is fed two ways: :meth:`RunMetrics.on_event` gets every
event of the run's :class:`~orchestrator.runstate.EventLog` (on the emitting thread: the
supervisor loop or the mirror's thread, so it only counts under a lock), and
:meth:`RunMetrics.on_state` gets every :class:`~orchestrator.runstate.RunState` the supervisor
publishes (every ``state.json`` write, and at most once a second while running). Values are
assembled at scrape time by one custom collector, so an age or a rate is as of the scrape.

Counters live in the supervisor, not in the workers, so relaunching the worker group never
resets them; a relaunched supervisor on the same checkpoint dir continues them from the run's
history (``run/events.jsonl`` replayed at attach, ``state.json``'s step and preemptions). The
snapshot stall and write time are measured by rank 0 alone (its ``snapshot.staged`` and
``snapshot.committed`` log lines) and reach the supervisor through no file, so they are not
exported here; the committed manifests give the snapshot's size and commit time.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import (
    CollectorRegistry,
    generate_latest,
    start_http_server,
    write_to_textfile,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from contract.codes import Phase
from contract.paths import RunPaths
from orchestrator import goodput as accounting
from orchestrator.clock import Clock, RealClock
from orchestrator.config import LaunchConfig
from orchestrator.runstate import EventLog, RunState, read_events, read_state
from orchestrator.settings import Settings
from storage.local import LocalSnapshotStore

log = structlog.get_logger("orchestrator.metrics")

#: The step rate is measured over this many seconds of the supervisor's own observations: long
#: enough to smooth the one-second observation cadence, short enough to show a stall quickly.
RATE_WINDOW_S = 30.0
#: Every label set carries these (one scrape target may serve several runs' textfiles).
LABELS = ("run_id", "node_rank")
_PHASES = tuple(p.value for p in Phase)
_DETERMINISM_STATES = ("unchecked", "verified", "diverged")

#: Goodput is recomputed at most this often while running (and on every phase change): it
#: reads the run's events, rank 0's journal and the manifests, like ``status`` does.
GOODPUT_INTERVAL_S = 10.0
#: Goodput of the run as of ``now`` (None: the run has ended), as :mod:`orchestrator.goodput`
#: computes it for ``status --json``; None when unknown.
GoodputSource = Callable[[float | None], float | None]
#: Reads the manifest of a local snapshot: ``(created_at, bytes)``, None when unreadable.
ManifestReader = Callable[[int], tuple[float, int] | None]


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class _Snapshot:
    """What the supervisor knows of one committed local snapshot (from its manifest)."""

    step: int
    created_at: float | None
    bytes: int | None


class RunMetrics:
    """The run's metrics: fed by events and run states, read by scrapes and the textfile.

    Thread-safe: :meth:`on_event` may run on the mirror's thread, :meth:`collect` on the HTTP
    server's, :meth:`on_state` on the supervisor loop. Nothing here ever raises into the
    supervisor: a failure is logged (``metrics.failed``, once per kind) and the run goes on.
    """

    def __init__(
        self,
        *,
        run_id: str,
        node_rank: int,
        clock: Clock | None = None,
        manifest_reader: ManifestReader | None = None,
        metrics_file: str | None = None,
        goodput: GoodputSource | None = None,
        rate_window_s: float = RATE_WINDOW_S,
    ) -> None:
        self._run_id = run_id
        self._labels = (run_id, str(node_rank))
        self._clock: Clock = clock or RealClock()
        self._read_manifest = manifest_reader
        self._metrics_file = metrics_file
        self._goodput = goodput
        self._goodput_value: float | None = None
        self._goodput_due = 0.0
        self._goodput_phase: str | None = None
        self._window = rate_window_s
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._failures: set[str] = set()
        self._file_error: str | None = None
        self._closed = False
        # -- counted from events (replayed history, then live) --
        self._events: dict[str, int] = {}
        self._attempts = 0
        #: Restarts of earlier supervisor launches of this run (each launch counts from 0).
        self._restarts_before = 0
        #: Restarts of the current launch (its events and states).
        self._restarts_launch = 0
        self._uploads = 0
        self._uploaded_bytes = 0
        self._upload_seconds = 0.0
        self._last_upload_rate: float | None = None
        # -- from run states --
        self._state: RunState | None = None
        self._frontier: int | None = None
        self._preemptions = 0
        self._samples: deque[tuple[float, int]] = deque()
        self._snapshot: _Snapshot | None = None
        #: Bytes of local snapshots by step (manifests are read once each).
        self._bytes_by_step: dict[int, int | None] = {}
        self._lag_bytes: int | None = None

    # -- inputs --------------------------------------------------------------------------

    def replay(self, history: Iterable[Mapping[str, Any]], previous_state: Mapping[str, Any] | None) -> None:
        """Continue the counters of earlier supervisor launches on this checkpoint dir: the
        events already in ``run/events.jsonl`` and the last ``state.json``, both of this run id
        only (a reused dir's other run is not this run's history)."""
        with self._lock:
            for doc in history:
                if doc.get("run_id") == self._run_id:
                    self._count(doc)
            if previous_state is not None and previous_state.get("run_id") == self._run_id:
                step = _int(previous_state.get("step"))
                if step is not None:
                    self._frontier = max(step, self._frontier or 0)
                self._preemptions = max(self._preemptions, _int(previous_state.get("preemptions")) or 0)

    def on_event(self, doc: Mapping[str, Any]) -> None:
        """One event of the run (``EventLog.subscribe``): counted, nothing else, under a lock."""
        with self._lock:
            self._count(doc)

    def _count(self, doc: Mapping[str, Any]) -> None:
        name = doc.get("event")
        if not isinstance(name, str):
            return
        self._events[name] = self._events.get(name, 0) + 1
        if name == "supervisor.started":
            # A new supervisor launch: its restarts count from 0 again (state.json's too).
            self._restarts_before += self._restarts_launch
            self._restarts_launch = 0
        elif name in ("supervisor.attempt_started", "supervisor.gave_up"):
            if name == "supervisor.attempt_started":
                self._attempts += 1
            self._restarts_launch = max(self._restarts_launch, _int(doc.get("restarts")) or 0)
        elif name == "mirror.uploaded":
            size, seconds = _int(doc.get("bytes")), _num(doc.get("seconds"))
            self._uploads += 1
            if size is not None:
                self._uploaded_bytes += size
            if seconds is not None:
                self._upload_seconds += seconds
            if size is not None and seconds is not None and seconds > 0:
                self._last_upload_rate = size / seconds

    def on_state(self, state: RunState) -> None:
        """The supervisor's state now: step rate, snapshot ages, mirror lag; then the textfile.

        Never raises (the supervisor calls it unguarded): errors are logged once per kind."""
        try:
            self._take_state(state)
        except Exception as exc:
            self._failed("state", exc)
        self._update_goodput(state)
        if self._metrics_file is not None:
            self._write_file()

    def _take_state(self, state: RunState) -> None:
        now = self._clock.monotonic()
        # Manifests are read outside the lock (a disk read must never hold up a scrape) and
        # only for steps not seen before: one small read per committed snapshot.
        snapshot = self._snapshot
        newest = state.newest_local_step
        if newest is None:
            snapshot = None
        elif snapshot is None or snapshot.step != newest:
            snapshot = self._snapshot_of(newest)
        pending = state.mirror_pending_steps
        lag_bytes: int | None = None
        if pending is not None:
            known = {s: self._bytes_by_step[s] if s in self._bytes_by_step else self._bytes_of(s)
                     for s in pending}
            # Only what is still pending (and the newest) stays cached: bounded by the local disk.
            if snapshot is not None:
                known.setdefault(snapshot.step, snapshot.bytes)
            self._bytes_by_step = known
            sizes = [b for s, b in known.items() if s in pending and b is not None]
            lag_bytes = sum(sizes) if len(sizes) == len(pending) else None
        with self._lock:
            self._state = state
            self._snapshot = snapshot
            self._lag_bytes = lag_bytes
            self._preemptions = max(self._preemptions, state.preemptions)
            self._restarts_launch = max(self._restarts_launch, state.restarts)
            step = state.step
            if step is not None:
                self._frontier = step if self._frontier is None else max(self._frontier, step)
                samples = self._samples
                if samples and step < samples[-1][1]:
                    samples.clear()  # resumed from an earlier snapshot: a new series
                if not samples or samples[-1][1] != step:
                    samples.append((now, step))
                # Keep one sample at or before the window's start as the rate's base.
                while len(samples) > 1 and samples[1][0] <= now - self._window:
                    samples.popleft()

    def _update_goodput(self, state: RunState) -> None:
        # Throttled: the accounting rereads the run's files (about 5 ms for a short run), which
        # is too much for every observation but cheap every few seconds.
        if self._goodput is None:
            return
        now = self._clock.monotonic()
        if state.phase == self._goodput_phase and now < self._goodput_due:
            return
        self._goodput_phase, self._goodput_due = state.phase, now + GOODPUT_INTERVAL_S
        ended = state.phase in (Phase.DONE.value, Phase.PREEMPTED.value, Phase.FAILED.value)
        try:
            # As `status` computes it: up to now while the run goes on, to its last event after.
            value = self._goodput(None if ended else self._clock.time())
        except Exception as exc:
            self._failed("goodput", exc)
            value = None
        with self._lock:
            self._goodput_value = value

    def _snapshot_of(self, step: int) -> _Snapshot:
        read = self._read_from_manifest(step)
        if read is None:
            # Unreadable (retention removed it meanwhile, damaged): first seen now is the best
            # estimate of its commit, never a stale manifest time.
            return _Snapshot(step, self._clock.time(), None)
        created_at, size = read
        self._bytes_by_step[step] = size
        return _Snapshot(step, created_at, size)

    def _bytes_of(self, step: int) -> int | None:
        read = self._read_from_manifest(step)
        return None if read is None else read[1]

    def _read_from_manifest(self, step: int) -> tuple[float, int] | None:
        if self._read_manifest is None:
            return None
        try:
            return self._read_manifest(step)
        except Exception as exc:
            self._failed("manifest", exc)
            return None

    # -- outputs -------------------------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        """Every metric as of now (the HTTP server's thread, or the textfile's writer)."""
        now_mono, now = self._clock.monotonic(), self._clock.time()
        with self._lock:
            state = self._state
            events = dict(self._events)
            attempts, restarts = self._attempts, self._restarts_before + self._restarts_launch
            preemptions, frontier = self._preemptions, self._frontier
            uploads, up_bytes, up_s = self._uploads, self._uploaded_bytes, self._upload_seconds
            up_rate, snapshot, lag_bytes = self._last_upload_rate, self._snapshot, self._lag_bytes
            samples = list(self._samples)
            goodput = self._goodput_value
        return list(self._families(
            state, events, attempts=attempts, restarts=restarts, preemptions=preemptions,
            frontier=frontier, uploads=uploads, up_bytes=up_bytes, up_s=up_s, up_rate=up_rate,
            snapshot=snapshot, lag_bytes=lag_bytes, rate=_rate(samples, now_mono, self._window),
            goodput=goodput, now=now,
        ))

    def _families(
        self,
        state: RunState | None,
        events: dict[str, int],
        *,
        attempts: int,
        restarts: int,
        preemptions: int,
        frontier: int | None,
        uploads: int,
        up_bytes: int,
        up_s: float,
        up_rate: float | None,
        snapshot: _Snapshot | None,
        lag_bytes: int | None,
        rate: float | None,
        goodput: float | None,
        now: float,
    ) -> Iterator[Metric]:
        labels = list(self._labels)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=LABELS)
            family.add_metric(labels, value)
            return family

        def gauge(name: str, doc: str, value: float | None) -> Iterator[GaugeMetricFamily]:
            # An unknown value is no sample at all (absent), never a made-up 0.
            if value is not None:
                family = GaugeMetricFamily(name, doc, labels=LABELS)
                family.add_metric(labels, value)
                yield family

        yield counter("orchestrator_steps_completed", "Highest training step completed in this "
                      "run (steps re-executed after a resume are not counted twice)", frontier or 0)
        yield counter("orchestrator_attempts", "Worker-group attempts launched in this run",
                      attempts)
        yield counter("orchestrator_restarts", "Relaunches after a failure (all supervisor "
                      "launches of this run; preemptions are not restarts)", restarts)
        yield counter("orchestrator_preemptions", "Preemptions of this run", preemptions)
        family = CounterMetricFamily("orchestrator_events", "Supervisor events of this run by "
                                     "name (run/events.jsonl)", labels=(*LABELS, "event"))
        for name in sorted(events):
            family.add_metric([*labels, name], events[name])
        yield family
        yield counter("orchestrator_mirror_uploads", "Snapshots uploaded to the mirror", uploads)
        yield counter("orchestrator_mirror_uploaded_bytes", "Bytes of snapshots uploaded to the "
                      "mirror", up_bytes)
        yield counter("orchestrator_mirror_upload_seconds", "Seconds spent uploading snapshots "
                      "(rate of uploaded_bytes over rate of this: upload throughput)", up_s)
        yield from gauge("orchestrator_mirror_last_upload_bytes_per_second", "Throughput of the "
                         "latest upload", up_rate)
        if state is None:
            return  # the first state has not arrived: only the counters are known
        yield from gauge("orchestrator_step", "Last step completed by the current attempt "
                         "(goes back when a resume re-executes steps)", state.step)
        yield from gauge("orchestrator_steps_per_second", f"Steps per second over the last "
                         f"{self._window:g} s of the supervisor's observations", rate)
        yield from gauge("orchestrator_attempt", "Number of the current attempt", state.attempt)
        yield from gauge("orchestrator_resumed_from_step", "Snapshot step the current attempt "
                         "resumed from", state.resumed_from_step)
        phase = GaugeMetricFamily("orchestrator_phase", "Supervisor phase (1 for the current one)",
                                  labels=(*LABELS, "phase"))
        for name in _PHASES:
            phase.add_metric([*labels, name], 1.0 if state.phase == name else 0.0)
        yield phase
        ages = [n.heartbeat_age_s for n in state.nodes if n.heartbeat_age_s is not None]
        yield from gauge("orchestrator_heartbeat_age_seconds", "Seconds since the ranks last "
                         "reported progress", max(ages) if ages else None)
        yield from gauge("orchestrator_supervisor_start_time_seconds", "Unix time this "
                         "supervisor started", state.started_at)
        audit = GaugeMetricFamily("orchestrator_determinism", "Resume audit state (1 for the "
                                  "current one)", labels=(*LABELS, "state"))
        current = state.determinism.get("state")
        for name in _DETERMINISM_STATES:
            audit.add_metric([*labels, name], 1.0 if current == name else 0.0)
        yield audit
        if snapshot is not None:
            yield from gauge("orchestrator_last_snapshot_step", "Step of the newest committed "
                             "local snapshot", snapshot.step)
            yield from gauge("orchestrator_last_snapshot_timestamp_seconds", "Unix time the "
                             "newest local snapshot was committed", snapshot.created_at)
            yield from gauge("orchestrator_last_snapshot_age_seconds", "Seconds since the "
                             "newest local snapshot was committed",
                             None if snapshot.created_at is None else max(0.0, now - snapshot.created_at))
            yield from gauge("orchestrator_last_snapshot_bytes", "Size of the newest local "
                             "snapshot", snapshot.bytes)
        yield from gauge("orchestrator_snapshot_stall_seconds", "Training stall of the last "
                         "snapshot (rank 0: the in-memory copy the step waited for)",
                         state.snapshot_stall_s)
        yield from gauge("orchestrator_snapshot_write_seconds", "Seconds the last snapshot took "
                         "to write and commit in the background (rank 0)", state.snapshot_write_s)
        if state.mirror_pending_steps is not None:  # a mirror is configured
            yield from gauge("orchestrator_mirror_remote_step", "Step of the newest snapshot in "
                             "the object store", state.newest_remote_step)
            yield from gauge("orchestrator_mirror_lag_steps", "Newest local step minus newest "
                             "remote step", state.mirror_lag_steps)
            yield from gauge("orchestrator_mirror_pending_snapshots", "Local snapshots not yet "
                             "in the object store", len(state.mirror_pending_steps))
            yield from gauge("orchestrator_mirror_lag_bytes", "Bytes of the local snapshots not "
                             "yet in the object store", lag_bytes)
            yield from gauge("orchestrator_mirror_error", "1 while the mirror has an unresolved "
                             "error", 0.0 if state.mirror_error is None else 1.0)
        yield from gauge("orchestrator_goodput_ratio", "Fraction of wall time spent on steps "
                         "that count (status --json goodput)", goodput)

    def text(self) -> str:
        """The exposition text a scrape gets."""
        return generate_latest(self.registry).decode()

    def _write_file(self) -> None:
        path = self._metrics_file
        assert path is not None
        try:
            # A temporary file beside it, renamed over it: node_exporter never reads half a file.
            write_to_textfile(path, self.registry)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if self._file_error is None:
                log.warning("metrics.file_write_failed", path=path, error=error)
            self._file_error = error
        else:
            if self._file_error is not None:
                log.info("metrics.file_write_recovered", path=path)
                self._file_error = None

    def _failed(self, kind: str, exc: Exception) -> None:
        # Once per kind: a metric is never worth a log line per second.
        if kind not in self._failures:
            self._failures.add(kind)
            log.error("metrics.failed", kind=kind, error=repr(exc))

    # -- serving -------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) from a daemon thread; the bound
        address. ValueError when the address cannot be bound (in use, unknown host)."""
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ValueError(f"--metrics-port: cannot serve metrics on {host}:{port}: "
                             f"{exc.strerror or exc}") from exc
        self._server, self._thread = server, thread
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    @property
    def port(self) -> int | None:
        """The port being served (None: not serving)."""
        return None if self._server is None else int(self._server.server_address[1])

    def close(self) -> None:
        """Write the textfile a last time and stop the HTTP server (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._metrics_file is not None:
            self._write_file()
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()  # returns once serve_forever has stopped
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)


def _rate(samples: list[tuple[float, int]], now: float, window: float) -> float | None:
    """Steps per second over the window ending ``now``: from the last sample at or before the
    window's start (else the first) to the last sample, divided by the time up to ``now``, so
    that a stalled run's rate decays to 0 rather than freezing at its last value."""
    if not samples:
        return None
    start = now - window
    base = samples[0]
    for sample in samples:
        if sample[0] > start:
            break
        base = sample
    (t0, s0), (_, s1) = base, samples[-1]
    if now <= t0:
        return 0.0
    return max(0, s1 - s0) / (now - t0)


def _local_manifest_reader(checkpoint_dir: str) -> ManifestReader:
    store = LocalSnapshotStore(checkpoint_dir)

    def read(step: int) -> tuple[float, int] | None:
        # A snapshot retention removed, or a damaged manifest, is simply not known (None).
        with contextlib.suppress(Exception):
            manifest = store.read_manifest(step)
            return manifest.created_at, manifest.total_bytes
        return None

    return read


def _goodput_of(checkpoint_dir: str, now: float | None) -> float | None:
    evidence = accounting.load_evidence(checkpoint_dir)
    return accounting.goodput(evidence.events, now, journal=evidence.journal,
                           snapshots=evidence.snapshots)


def attach(
    config: LaunchConfig,
    events: EventLog,
    *,
    run_id: str,
    settings: Settings,
    clock: Clock | None = None,
) -> RunMetrics | None:
    """Metrics subscribed to ``events`` when a port or file is configured, else None.

    The run's earlier history on this dir is replayed first, the textfile written once and the
    server bound, so that a bad ``--metrics-file`` directory or a port in use is a ValueError
    here, before anything is launched; ``metrics.serving`` (host, port) records the address.
    """
    del settings  # no tunables yet: the rate window is a constant
    if config.metrics_port is None and config.metrics_file is None:
        return None
    paths = RunPaths.of(config.checkpoint_dir)
    metrics = RunMetrics(
        run_id=run_id,
        node_rank=config.node_rank,
        clock=clock,
        manifest_reader=_local_manifest_reader(config.checkpoint_dir),
        metrics_file=config.metrics_file,
        goodput=lambda now: _goodput_of(config.checkpoint_dir, now),
    )
    metrics.replay(read_events(paths), read_state(paths))
    if config.metrics_file is not None:
        try:
            write_to_textfile(config.metrics_file, metrics.registry)
        except OSError as exc:
            raise ValueError(f"--metrics-file: cannot write {config.metrics_file}: "
                             f"{exc.strerror or exc}") from exc
    served = None
    if config.metrics_port is not None:
        served = metrics.serve(config.metrics_host, config.metrics_port)
    events.subscribe(metrics.on_event)
    if served is not None:
        # An event (not only a log line): tools find the port of a run with --metrics-port 0
        # in run/events.jsonl, and it is counted like every other event.
        events.emit("metrics.serving", host=served[0], port=served[1], path="/metrics")
    return metrics
