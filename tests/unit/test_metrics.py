"""Metrics (``orchestrator.metrics``): what the supervisor's events and states become as
Prometheus text, parsed back with prometheus_client's own parser.

A fake clock drives the step rate and snapshot ages; manifests come from a fake reader or a
real ``LocalSnapshotStore``. The relaunch tests drive the real ``Supervisor`` with a scripted
worker group twice on one checkpoint dir, the way ``launch`` attaches the metrics.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contract.paths import RunPaths
from orchestrator import goodput, metrics
from orchestrator.config import LaunchConfig
from orchestrator.metrics import RunMetrics
from orchestrator.runstate import EventLog, NodeState, RunState, next_attempt, read_events
from orchestrator.settings import Settings
from orchestrator.supervisor import StopRequest, Supervisor
from storage import LocalSnapshotStore
from tests.support.clock import EPOCH, FakeClock

pytestmark = pytest.mark.timeout(30)

DIGEST = "sha256:" + "0" * 64
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition text: (name, sorted labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    """The sample ``name`` of run ``r``, node 0 (plus ``labels``); None when absent."""
    key = tuple(sorted({"run_id": "r", "node_rank": "0", **labels}.items()))
    return samples(text).get((name, key))


def state(**fields: Any) -> RunState:
    base: dict[str, Any] = {
        "run_id": "r", "phase": "running", "attempt": 0, "started_at": EPOCH, "updated_at": EPOCH,
        "pid": 1, "nodes": [NodeState(node_rank=0, heartbeat_age_s=0.5, phase="running")],
    }
    return RunState(**{**base, **fields})


def event(name: str, **fields: Any) -> dict[str, Any]:
    return {"time": EPOCH, "event": name, "run_id": "r", **fields}


def make(clock: FakeClock | None = None, **kw: Any) -> tuple[RunMetrics, FakeClock]:
    clock = clock or FakeClock()
    return RunMetrics(run_id="r", node_rank=0, clock=clock, **kw), clock


# -- values --------------------------------------------------------------------------------


def test_counters_start_at_zero_and_gauges_wait_for_the_first_state() -> None:
    m, _ = make()
    text = m.text()
    assert value(text, "orchestrator_restarts_total") == 0
    assert value(text, "orchestrator_steps_completed_total") == 0
    assert value(text, "orchestrator_attempts_total") == 0
    # No state yet: no phase, no step (absent, never a made-up 0).
    assert value(text, "orchestrator_phase", phase="running") is None
    assert value(text, "orchestrator_step") is None


def test_events_and_states_become_metrics() -> None:
    reads: list[int] = []

    def manifest(step: int) -> tuple[float, int]:
        reads.append(step)
        return EPOCH + step, 1000 + step

    m, clock = make(manifest_reader=manifest)
    m.on_event(event("supervisor.attempt_started", attempt=0, restarts=0))
    m.on_event(event("mirror.uploaded", step=20, bytes=4_000_000, seconds=2.0, mb_per_s=2.0))
    m.on_event(event("mirror.uploaded", step=40, bytes=1_000_000, seconds=0.25, mb_per_s=4.0))
    m.on_state(state(step=0))
    clock.advance(10)
    m.on_state(state(step=50, newest_local_step=40, newest_remote_step=20, mirror_lag_steps=20,
                     mirror_pending_steps=[30, 40], restarts=2, preemptions=1,
                     resumed_from_step=None))
    clock.advance(10)
    m.on_state(state(step=100, newest_local_step=40, newest_remote_step=20, mirror_lag_steps=20,
                     mirror_pending_steps=[30, 40], restarts=2, preemptions=1))
    text = m.text()
    assert value(text, "orchestrator_attempts_total") == 1
    assert value(text, "orchestrator_restarts_total") == 2
    assert value(text, "orchestrator_preemptions_total") == 1
    assert value(text, "orchestrator_steps_completed_total") == 100
    assert value(text, "orchestrator_step") == 100
    assert value(text, "orchestrator_steps_per_second") == pytest.approx(5.0)
    assert value(text, "orchestrator_phase", phase="running") == 1
    assert value(text, "orchestrator_phase", phase="recovering") == 0
    assert value(text, "orchestrator_heartbeat_age_seconds") == 0.5
    assert value(text, "orchestrator_events_total", event="mirror.uploaded") == 2
    assert value(text, "orchestrator_mirror_uploads_total") == 2
    assert value(text, "orchestrator_mirror_uploaded_bytes_total") == 5_000_000
    assert value(text, "orchestrator_mirror_upload_seconds_total") == 2.25
    assert value(text, "orchestrator_mirror_last_upload_bytes_per_second") == 4_000_000
    assert value(text, "orchestrator_mirror_lag_steps") == 20
    assert value(text, "orchestrator_mirror_remote_step") == 20
    assert value(text, "orchestrator_mirror_pending_snapshots") == 2
    assert value(text, "orchestrator_mirror_lag_bytes") == 1030 + 1040
    assert value(text, "orchestrator_mirror_error") == 0
    assert value(text, "orchestrator_last_snapshot_step") == 40
    assert value(text, "orchestrator_last_snapshot_bytes") == 1040
    assert value(text, "orchestrator_last_snapshot_timestamp_seconds") == EPOCH + 40
    # A commit time ahead of the supervisor's clock (another node's) is an age of 0, not < 0.
    assert value(text, "orchestrator_last_snapshot_age_seconds") == 0
    assert value(text, "orchestrator_determinism", state="unchecked") == 1
    # Each manifest is read once, however many states name it.
    assert sorted(reads) == [30, 40]


def test_snapshot_age_grows_until_the_next_snapshot() -> None:
    m, clock = make(manifest_reader=lambda step: (EPOCH + 5.0, 10))
    clock.advance(5)
    m.on_state(state(step=5, newest_local_step=5))  # committed at clock 5
    clock.advance(12)
    assert value(m.text(), "orchestrator_last_snapshot_age_seconds") == pytest.approx(12)
    clock.advance(3)
    assert value(m.text(), "orchestrator_last_snapshot_age_seconds") == pytest.approx(15)


def test_an_unreadable_manifest_dates_the_snapshot_when_first_seen() -> None:
    m, clock = make(manifest_reader=lambda step: None)
    clock.advance(100)
    m.on_state(state(step=5, newest_local_step=5))
    clock.advance(4)
    text = m.text()
    assert value(text, "orchestrator_last_snapshot_age_seconds") == pytest.approx(4)
    assert value(text, "orchestrator_last_snapshot_bytes") is None


def test_mirror_gauges_only_with_a_mirror() -> None:
    m, _ = make()
    m.on_state(state(step=1))
    assert value(m.text(), "orchestrator_mirror_lag_steps") is None
    m.on_state(state(step=1, mirror_pending_steps=[], mirror_lag_steps=0, mirror_error="403"))
    assert value(m.text(), "orchestrator_mirror_lag_steps") == 0
    assert value(m.text(), "orchestrator_mirror_error") == 1


def test_step_rate_decays_when_steps_stop_and_restarts_after_a_resume() -> None:
    m, clock = make(rate_window_s=30)
    for step in range(0, 101, 10):  # 10 steps per second for 10 s
        if step:
            clock.advance(1)
        m.on_state(state(step=step))
    assert value(m.text(), "orchestrator_steps_per_second") == pytest.approx(10)
    clock.advance(10)  # stalled: the rate is measured up to now
    assert value(m.text(), "orchestrator_steps_per_second") == pytest.approx(5)
    clock.advance(60)
    m.on_state(state(step=100))
    assert value(m.text(), "orchestrator_steps_per_second") == 0
    # A resume from step 60: the step goes back, the series restarts, the counter does not.
    m.on_state(state(step=60, attempt=1, resumed_from_step=60))
    clock.advance(2)
    m.on_state(state(step=70, attempt=1, resumed_from_step=60))
    text = m.text()
    assert value(text, "orchestrator_steps_per_second") == pytest.approx(5)
    assert value(text, "orchestrator_step") == 70
    assert value(text, "orchestrator_steps_completed_total") == 100
    assert value(text, "orchestrator_resumed_from_step") == 60


def test_restarts_count_across_supervisor_launches_from_events() -> None:
    m, _ = make()
    # Launch 1: two restarts, then gave up; launch 2 counts from 0 again in its own events.
    m.replay([
        event("supervisor.started"),
        event("supervisor.attempt_started", restarts=0),
        event("supervisor.attempt_started", restarts=1),
        event("supervisor.attempt_started", restarts=2),
        event("supervisor.gave_up", restarts=2),
        event("supervisor.started"),
        event("supervisor.attempt_started", restarts=0),
        event("supervisor.attempt_started", restarts=1, run_id="another-run"),
    ], {"run_id": "r", "step": 33, "preemptions": 2})
    text = m.text()
    assert value(text, "orchestrator_restarts_total") == 2
    assert value(text, "orchestrator_attempts_total") == 4
    assert value(text, "orchestrator_steps_completed_total") == 33
    assert value(text, "orchestrator_preemptions_total") == 2
    m.on_state(state(step=3, restarts=1, preemptions=2))
    text = m.text()
    assert value(text, "orchestrator_restarts_total") == 3
    assert value(text, "orchestrator_steps_completed_total") == 33


def test_another_runs_state_is_not_history() -> None:
    m, _ = make()
    m.replay([], {"run_id": "other", "step": 500, "preemptions": 9})
    assert value(m.text(), "orchestrator_steps_completed_total") == 0
    assert value(m.text(), "orchestrator_preemptions_total") == 0


def test_goodput_gauge_only_with_a_source() -> None:
    m, _ = make()
    m.on_state(state(step=1))
    assert value(m.text(), "orchestrator_goodput_ratio") is None
    g, _ = make(goodput=lambda now: 0.75)
    g.on_state(state(step=1))
    assert value(g.text(), "orchestrator_goodput_ratio") == 0.75


def test_goodput_is_recomputed_every_few_seconds_and_once_the_run_ends() -> None:
    calls: list[float | None] = []

    def source(now: float | None) -> float:
        calls.append(now)
        return 0.5 + len(calls) / 100

    m, clock = make(goodput=source)
    m.on_state(state(step=1))
    for _ in range(9):  # within GOODPUT_INTERVAL_S: the cached value stands
        clock.advance(1)
        m.on_state(state(step=2))
    assert calls == [EPOCH] and value(m.text(), "orchestrator_goodput_ratio") == 0.51
    clock.advance(1)
    m.on_state(state(step=3))
    assert calls == [EPOCH, EPOCH + 10]
    m.on_state(state(step=3, phase="done"))  # a phase change: at once, to the run's last event
    assert calls[-1] is None and value(m.text(), "orchestrator_goodput_ratio") == 0.53


def test_failures_never_reach_the_supervisor(caplog: pytest.LogCaptureFixture) -> None:
    def broken_manifest(step: int) -> tuple[float, int]:
        raise OSError("disk gone")

    def broken_goodput(now: float | None) -> float:
        raise RuntimeError("no goodput")

    m, _ = make(manifest_reader=broken_manifest, goodput=broken_goodput)
    m.on_state(state(step=1, newest_local_step=1))
    m.on_state(state(step=2, newest_local_step=2))
    text = m.text()
    assert value(text, "orchestrator_step") == 2
    assert value(text, "orchestrator_goodput_ratio") is None


def test_on_event_is_thread_safe_beside_scrapes() -> None:
    m, _ = make()
    m.on_state(state(step=1))
    stop = threading.Event()
    errors: list[BaseException] = []

    def scrape() -> None:
        while not stop.is_set():
            try:
                samples(m.text())
            except BaseException as exc:  # a torn read would fail to parse
                errors.append(exc)
                return

    def emit() -> None:
        for _ in range(2000):
            m.on_event(event("mirror.uploaded", bytes=1, seconds=0.001))

    scraper = threading.Thread(target=scrape)
    scraper.start()
    emitters = [threading.Thread(target=emit) for _ in range(4)]
    for t in emitters:
        t.start()
    for t in emitters:
        t.join()
    stop.set()
    scraper.join()
    assert errors == []
    assert value(m.text(), "orchestrator_mirror_uploads_total") == 8000
    assert value(m.text(), "orchestrator_mirror_uploaded_bytes_total") == 8000


def test_the_default_registry_is_left_alone() -> None:
    m, _ = make()
    m.on_state(state(step=1))
    default = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "orchestrator_" not in default


# -- textfile ------------------------------------------------------------------------------


def test_textfile_is_rewritten_atomically_on_every_state(tmp_path: Path) -> None:
    path = tmp_path / "orch.prom"
    m, _ = make(metrics_file=str(path))
    inodes = set()
    for step in range(5):
        m.on_state(state(step=step))
        inodes.add(path.stat().st_ino)
        assert value(path.read_text(), "orchestrator_step") == step
    # A new file renamed over the old one each time (never written in place), no temp left.
    assert len(inodes) >= 2
    assert os.listdir(tmp_path) == ["orch.prom"]


def test_a_reader_never_sees_a_partial_textfile(tmp_path: Path) -> None:
    path = tmp_path / "orch.prom"
    m, _ = make(metrics_file=str(path))
    m.on_state(state(step=0))
    stop = threading.Event()
    seen: list[float] = []
    errors: list[str] = []

    def read() -> None:
        while not stop.is_set():
            text = path.read_text()
            got = value(text, "orchestrator_step")
            if got is None or "orchestrator_phase" not in text:
                errors.append(text[-200:])
                return
            seen.append(got)

    reader = threading.Thread(target=read)
    reader.start()
    for step in range(1, 300):
        m.on_state(state(step=step))
    stop.set()
    reader.join()
    assert errors == []
    assert seen == sorted(seen)


def test_a_failing_textfile_is_logged_and_recovers(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    path = directory / "orch.prom"
    m, _ = make(metrics_file=str(path))
    m.on_state(state(step=1))
    os.remove(path)
    directory.rmdir()
    m.on_state(state(step=2))  # no exception into the supervisor
    directory.mkdir()
    m.on_state(state(step=3))
    assert value(path.read_text(), "orchestrator_step") == 3


# -- attach: files, port, relaunch ---------------------------------------------------------


def config(tmp_path: Path, **kw: Any) -> LaunchConfig:
    return LaunchConfig(checkpoint_dir=str(tmp_path / "ckpt"), script="train.py", **kw)


def events_log(cfg: LaunchConfig, clock: FakeClock | None = None) -> EventLog:
    paths = RunPaths.of(cfg.checkpoint_dir)
    return EventLog(paths.events, clock=clock or FakeClock(), run_id="r")


def test_attach_without_port_or_file_is_off(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert metrics.attach(cfg, events_log(cfg), run_id="r", settings=Settings()) is None


def test_port_zero_serves_on_a_free_port_and_records_it(tmp_path: Path) -> None:
    cfg = config(tmp_path, metrics_port=0)
    events = events_log(cfg)
    m = metrics.attach(cfg, events, run_id="r", settings=Settings())
    assert m is not None
    try:
        served = [e for e in read_events(RunPaths.of(cfg.checkpoint_dir))
                  if e["event"] == "metrics.serving"]
        assert len(served) == 1
        port = served[0]["port"]
        assert served[0]["host"] == "127.0.0.1" and port == m.port and port > 0
        m.on_state(state(step=7))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert value(text, "orchestrator_step") == 7
        # The serving event itself is counted (subscribed before it was emitted).
        assert value(text, "orchestrator_events_total", event="metrics.serving") == 1
    finally:
        m.close()
        events.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    m.close()  # idempotent


def test_a_port_in_use_is_a_configuration_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = config(tmp_path, metrics_port=port)
        with pytest.raises(ValueError, match=f"127.0.0.1:{port}"):
            metrics.attach(cfg, events_log(cfg), run_id="r", settings=Settings())


def test_an_unwritable_metrics_file_is_a_configuration_error(tmp_path: Path) -> None:
    cfg = config(tmp_path, metrics_file=str(tmp_path / "missing" / "orch.prom"))
    with pytest.raises(ValueError, match="--metrics-file"):
        metrics.attach(cfg, events_log(cfg), run_id="r", settings=Settings())


def test_attach_reads_committed_manifests(tmp_path: Path) -> None:
    cfg = config(tmp_path, metrics_file=str(tmp_path / "orch.prom"))
    store = LocalSnapshotStore(cfg.checkpoint_dir)
    w = store.begin(10)
    w.write_bytes("tensors.bin", bytes(300))
    manifest = w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)
    m = metrics.attach(cfg, events_log(cfg), run_id="r", settings=Settings())
    assert m is not None
    m.on_state(state(step=10, newest_local_step=10, mirror_pending_steps=[10],
                     mirror_lag_steps=10))
    m.close()
    text = (tmp_path / "orch.prom").read_text()
    assert value(text, "orchestrator_last_snapshot_bytes") == manifest.total_bytes
    assert value(text, "orchestrator_mirror_lag_bytes") == manifest.total_bytes
    assert value(text, "orchestrator_last_snapshot_timestamp_seconds") == manifest.created_at


# -- the real supervisor, relaunched -------------------------------------------------------


@dataclass
class Scripted:
    """A worker group whose attempts run ``work`` and exit with the next code."""

    codes: list[int]
    work: Callable[[int, int | None], None]
    started: list[int] = field(default_factory=list)
    _polls: int = 0
    _resume: int | None = None

    def start(self, attempt: int, resume_step: int | None, *, spare_gate: str | None = None) -> None:
        self.started.append(attempt)
        self._resume = resume_step
        self._polls = 3

    def poll(self) -> int | None:
        self._polls -= 1
        if self._polls > 0:
            return None
        self.work(self.started[-1], self._resume)
        return self.codes[len(self.started) - 1]

    def terminate(self, grace_s: float) -> int:
        return -signal.SIGTERM

    def kill(self) -> None:
        pass

    def output_tail(self) -> str:
        return ""


def test_counters_continue_across_worker_and_supervisor_relaunches(tmp_path: Path) -> None:
    clock = FakeClock()
    cfg = config(tmp_path, metrics_file=str(tmp_path / "orch.prom"), max_restarts=1,
                 nproc_per_node=1)
    paths = RunPaths.of(cfg.checkpoint_dir)
    store = LocalSnapshotStore(cfg.checkpoint_dir)
    settings = replace(Settings(), poll_interval_s=0.5, scan_interval_s=1.0,
                       backoff_initial_s=1.0, backoff_max_s=2.0, backoff_jitter_s=0.0)
    os.makedirs(paths.progress_dir, exist_ok=True)

    def work(attempt: int, resume: int | None) -> None:
        step = (resume or 0) + 5
        with open(os.path.join(paths.progress_dir, "rank-0.json"), "w") as f:
            json.dump({"pid": 1, "rank": 0, "step": step, "epoch": 0, "time": clock.time(),
                       "attempt": attempt}, f)
        w = store.begin(step)
        w.write_bytes("tensors.bin", bytes(64))
        w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)

    def launch(codes: list[int]) -> tuple[RunMetrics, list[float]]:
        events = EventLog(paths.events, clock=clock, run_id="r")
        events.emit("supervisor.started")  # as cli does, before attaching the metrics
        m = metrics.attach(cfg, events, run_id="r", settings=settings, clock=clock)
        assert m is not None
        restarts_seen: list[float] = []

        def observe(s: RunState) -> None:
            m.on_state(s)
            got = value(m.text(), "orchestrator_restarts_total")
            assert got is not None
            restarts_seen.append(got)

        sup = Supervisor(
            config=cfg, settings=settings, run_id="r", paths=paths, clock=clock,
            group=Scripted(codes, work), store=store, events=events, stop=StopRequest(),
            first_attempt=next_attempt(paths), pid=1, observer=observe,
        )
        sup.run()
        m.close()
        events.close()
        return m, restarts_seen

    # Launch 1: attempt 0 trains to 5 and crashes, the relaunch trains to 10 and crashes:
    # the restart budget (1) is spent.
    first, seen = launch([1, 1])
    text = first.text()
    assert value(text, "orchestrator_restarts_total") == 1
    assert value(text, "orchestrator_attempts_total") == 2
    assert value(text, "orchestrator_steps_completed_total") == 10
    assert value(text, "orchestrator_phase", phase="failed") == 1
    assert seen == sorted(seen)
    # Launch 2 on the same dir: state.json's restarts starts from 0 again, the counter does not.
    _, seen = launch([0])
    text = (tmp_path / "orch.prom").read_text()
    assert value(text, "orchestrator_restarts_total") == 1
    assert value(text, "orchestrator_attempts_total") == 3
    assert value(text, "orchestrator_steps_completed_total") == 15
    assert value(text, "orchestrator_events_total", event="supervisor.started") == 2
    assert value(text, "orchestrator_phase", phase="done") == 1
    assert seen and min(seen) == 1
    # Goodput as `status --json` computes it once the run has ended.
    expected = goodput.status_fields(cfg.checkpoint_dir, now=None)["goodput"]
    assert expected is not None
    assert value(text, "orchestrator_goodput_ratio") == pytest.approx(expected, abs=1e-4)
