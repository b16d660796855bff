"""The mirror's interference budget: token bucket, automatic cap, thread priority (no sleeping).

Every clock here is fake: the bucket's waits advance it, the controller is fed scripted
heartbeats. The priority tests record the calls instead of changing the test process.
"""

from __future__ import annotations

import errno
import threading
from typing import Any

import pytest

from orchestrator.mirror import Mirror, MirrorPacing
from orchestrator.settings import load_settings
from orchestrator.throttle import (
    MB,
    AutoCap,
    Interrupted,
    PrioritySetter,
    TokenBucket,
    lower_thread_priority,
)
from storage import LocalSnapshotStore

pytestmark = pytest.mark.timeout(30)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.t

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.t += seconds
        return False


# -- token bucket ---------------------------------------------------------------------------


def test_unlimited_bucket_never_waits() -> None:
    clock = FakeClock()
    bucket = TokenBucket(None, clock=clock, wait=clock.wait)
    for _ in range(100):
        bucket.take(1 << 20)
    assert clock.waits == []
    assert bucket.granted == 100 << 20


@pytest.mark.parametrize("chunk", [4096, 64 * 1024, 1 << 20])
def test_bucket_grants_no_more_than_the_cap(chunk: int) -> None:
    clock = FakeClock()
    rate = 10 * MB
    burst_s = 0.05
    bucket = TokenBucket(rate, burst_s=burst_s, clock=clock, wait=clock.wait)
    start = clock.t
    sent = 0
    while sent < 30 * MB:
        bucket.take(chunk)
        sent += chunk
        # At every grant: bytes so far <= rate * elapsed + burst (+ the chunk just granted).
        assert sent <= rate * (clock.t - start) + rate * burst_s + chunk + 1  # +1: float rounding
    elapsed = clock.t - start
    assert elapsed >= sent / rate - burst_s - 1e-9
    assert elapsed <= sent / rate + 1e-6  # and it does not hold back more than the cap asks


def test_bucket_rate_change_rescales_the_backlog() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1 * MB, burst_s=0.0, clock=clock, wait=clock.wait)
    bucket.take(1 * MB)  # 1 s at 1 MB/s
    assert clock.t == pytest.approx(1001.0)
    bucket.set_rate(4 * MB)
    t0 = clock.t
    bucket.take(2 * MB)
    assert clock.t - t0 == pytest.approx(0.5)
    bucket.set_rate(None)
    t1 = clock.t
    bucket.take(100 * MB)
    assert clock.t == t1


def test_bucket_idle_time_is_not_saved_up_beyond_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1 * MB, burst_s=0.1, clock=clock, wait=clock.wait)
    clock.t += 3600.0  # an hour idle
    t0 = clock.t
    bucket.take(2 * MB)
    assert clock.t - t0 == pytest.approx(1.9)


def test_bucket_wait_is_interrupted() -> None:
    clock = FakeClock()
    closing = threading.Event()
    closing.set()
    bucket = TokenBucket(1.0, clock=clock, wait=closing.wait)
    with pytest.raises(Interrupted):
        bucket.take(10 * MB)  # would wait months at 1 B/s


def test_bucket_shared_by_threads_holds_the_cap() -> None:
    lock = threading.Lock()
    clock = FakeClock()

    def wait(seconds: float) -> bool:
        with lock:  # threads' waits are sequential on the fake timeline: the worst case
            clock.t = max(clock.t, clock.t + seconds)
        return False

    bucket = TokenBucket(5 * MB, burst_s=0.0, clock=clock, wait=wait)
    start = clock.t

    def worker() -> None:
        for _ in range(50):
            bucket.take(64 * 1024)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    total = 8 * 50 * 64 * 1024
    assert bucket.granted == total
    # Every byte was paid for at the rate: the fake timeline moved at least total / rate.
    assert clock.t - start >= total / (5 * MB) - 64 * 1024 / (5 * MB)


def test_bucket_rejects_a_zero_rate() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0.0)


# -- the automatic cap ------------------------------------------------------------------------


class Script:
    """Feeds an AutoCap heartbeats every 0.2 s of fake time at a given step rate."""

    def __init__(self, auto: AutoCap) -> None:
        self.auto = auto
        self.now = 0.0
        self.step = 0
        self._steps = 0.0
        self.step_time = 50_000.0
        self.sent = 0
        self.decisions: list[Any] = []
        auto.observe(0.0, 0, self.step_time, uploading=False, sent_bytes=0)  # windows at 0, 5, ...

    def run(self, seconds: float, *, steps_per_s: float, uploading: bool, send_bps: float) -> None:
        ticks = round(seconds / 0.2)
        for _ in range(ticks):
            self.now += 0.2
            self.step_time += 0.2
            self._steps += steps_per_s * 0.2
            self.step = round(self._steps)
            self.sent += int(send_bps * 0.2) if uploading else 0
            d = self.auto.observe(self.now, self.step, self.step_time, uploading=uploading,
                                  sent_bytes=self.sent)
            if d is not None:
                self.decisions.append(d)


def _actions(script: Script) -> list[str]:
    return [d.action for d in script.decisions if d.action != "baseline"]


def test_auto_cap_backs_off_while_training_slows_and_recovers() -> None:
    auto = AutoCap(min_bps=4 * MB, window_s=5.0)
    s = Script(auto)
    s.run(20.0, steps_per_s=10.0, uploading=False, send_bps=0)
    assert auto.baseline == pytest.approx(10.0, rel=0.05)
    assert auto.cap_bps is None
    s.run(5.0, steps_per_s=10.0, uploading=True, send_bps=0)  # the boundary window mixes states
    s.decisions.clear()
    # Uploading at 80 MB/s slows training by 20 %: the cap halves from what was sent.
    s.run(5.0, steps_per_s=8.0, uploading=True, send_bps=80 * MB)
    assert _actions(s) == ["backoff"]
    assert auto.cap_bps == pytest.approx(40 * MB, rel=0.02)
    s.run(5.0, steps_per_s=8.0, uploading=True, send_bps=40 * MB)
    assert auto.cap_bps == pytest.approx(20 * MB, rel=0.02)
    # Training back within 5 %: +25 % per window.
    s.decisions.clear()
    s.run(10.0, steps_per_s=9.8, uploading=True, send_bps=20 * MB)
    assert _actions(s) == ["raise", "raise"]
    assert auto.cap_bps == pytest.approx(20 * MB * 1.25 * 1.25, rel=0.05)


def test_auto_cap_never_below_the_floor() -> None:
    auto = AutoCap(min_bps=4 * MB, window_s=5.0)
    s = Script(auto)
    s.run(10.0, steps_per_s=10.0, uploading=False, send_bps=0)
    s.run(5.0, steps_per_s=5.0, uploading=True, send_bps=0)
    for _ in range(12):  # slow whatever the cap: it halves down to the floor and stays there
        s.run(5.0, steps_per_s=5.0, uploading=True, send_bps=max(auto.cap_bps or 50 * MB, 1))
    assert auto.cap_bps == pytest.approx(4 * MB)


def test_auto_cap_holds_without_a_baseline_or_heartbeats() -> None:
    auto = AutoCap(min_bps=4 * MB, window_s=5.0)
    s = Script(auto)
    # Uploading from the start: no idle rate to compare with, no decision.
    s.run(30.0, steps_per_s=2.0, uploading=True, send_bps=50 * MB)
    assert auto.cap_bps is None and _actions(s) == []
    # Heartbeats that do not advance (a stall, a checkpoint): no decision either.
    s.run(10.0, steps_per_s=10.0, uploading=False, send_bps=0)
    frozen = s.step
    for _ in range(50):
        s.now += 0.2
        auto.observe(s.now, frozen, s.step_time, uploading=True, sent_bytes=s.sent)
    assert auto.cap_bps is None


def test_auto_cap_lifts_a_cap_that_does_not_bind() -> None:
    auto = AutoCap(min_bps=4 * MB, window_s=5.0)
    s = Script(auto)
    s.run(10.0, steps_per_s=10.0, uploading=False, send_bps=0)
    s.run(5.0, steps_per_s=8.0, uploading=True, send_bps=60 * MB)
    s.run(5.0, steps_per_s=8.0, uploading=True, send_bps=60 * MB)
    assert auto.cap_bps is not None
    s.decisions.clear()
    s.run(5.0, steps_per_s=10.0, uploading=True, send_bps=1 * MB)  # link slower than the cap
    assert _actions(s) == ["lift"]
    assert auto.cap_bps is None


def test_auto_cap_restart_resets_the_window() -> None:
    auto = AutoCap(min_bps=4 * MB, window_s=5.0)
    assert auto.observe(0.0, 100, 10.0, uploading=False, sent_bytes=0) is None
    assert auto.observe(6.0, 160, 16.0, uploading=False, sent_bytes=0) is not None
    # The step went back (a restart resumed an older snapshot): nothing is decided from it.
    assert auto.observe(12.0, 50, 22.0, uploading=True, sent_bytes=10) is None
    assert auto.cap_bps is None


# -- thread priority ------------------------------------------------------------------------


class Recorder:
    def __init__(self, fail: int | None = None) -> None:
        self.calls: list[tuple[str, int, tuple[int, ...]]] = []
        self.fail = fail
        self.lock = threading.Lock()

    def setter(self) -> PrioritySetter:
        def nice(tid: int, value: int) -> None:
            with self.lock:
                self.calls.append(("nice", tid, (value,)))
            if self.fail is not None:
                raise OSError(self.fail, "refused")

        def ionice(tid: int, klass: int, level: int) -> None:
            with self.lock:
                self.calls.append(("ionice", tid, (klass, level)))
            if self.fail is not None:
                raise OSError(self.fail, "refused")

        return PrioritySetter(setpriority=nice, ioprio_set=ionice)


def test_lower_priority_sets_nice_and_ionice_of_the_calling_thread() -> None:
    rec = Recorder()
    lower_thread_priority(rec.setter())
    tid = threading.get_native_id()
    assert rec.calls == [("nice", tid, (19,)), ("ionice", tid, (2, 7))]


def test_lower_priority_tolerates_eperm() -> None:
    rec = Recorder(fail=errno.EPERM)
    lower_thread_priority(rec.setter())  # no exception: logged once, ignored
    lower_thread_priority(rec.setter())
    assert [c[0] for c in rec.calls] == ["nice", "ionice", "nice", "ionice"]


def test_real_priority_call_does_not_raise() -> None:
    """On the test machine itself (a throwaway thread): nice 19, ioprio best-effort 7."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            lower_thread_priority()
        except BaseException as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    assert errors == []


class _Events:
    def emit(self, event: str, **fields: Any) -> None:
        pass


def test_mirror_pacing_lowers_every_upload_thread(tmp_path: Any) -> None:
    """The pacing the mirror hands to uploads runs the priority setter in each thread that calls
    thread_started (the worker thread, and the object store's part threads via initializer)."""
    seen: list[str] = []
    lock = threading.Lock()

    def lower() -> None:
        with lock:
            seen.append(threading.current_thread().name)

    from concurrent.futures import ThreadPoolExecutor

    from storage.remote import RemoteSnapshotStore

    remote = RemoteSnapshotStore(f"file://{tmp_path}/remote")
    mirror = Mirror(remote=remote, local=LocalSnapshotStore(str(tmp_path / "local")),
                    events=_Events(), settings=load_settings({}), lower_priority=lower)
    assert isinstance(mirror.pacing, MirrorPacing)
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="s3-upload-part",
                            initializer=mirror.pacing.thread_started) as pool:
        list(pool.map(lambda _: threading.Event().wait(0.01), range(6)))
    assert seen and all(n.startswith("s3-upload-part") for n in seen)

    off = Mirror(remote=remote, local=LocalSnapshotStore(str(tmp_path / "local")),
                 events=_Events(), settings=load_settings({"ORCH_MIRROR_NICE": "0"}),
                 lower_priority=lower)
    seen.clear()
    off.pacing.thread_started()
    assert seen == []


def test_mirror_cap_settings() -> None:
    assert load_settings({}).mirror_cap() is None
    assert load_settings({"ORCH_MIRROR_MAX_MBPS": "25"}).mirror_cap() == 25.0
    assert load_settings({"ORCH_MIRROR_MAX_MBPS": "AUTO"}).mirror_cap() == "auto"
    for bad in ("0", "-3", "fast", "inf", "nan"):
        with pytest.raises(ValueError, match="ORCH_MIRROR_MAX_MBPS"):
            load_settings({"ORCH_MIRROR_MAX_MBPS": bad})
    with pytest.raises(ValueError, match="ORCH_MIRROR_AUTO_MIN_MBPS"):
        load_settings({"ORCH_MIRROR_AUTO_MIN_MBPS": "0"})


def test_mirror_builds_its_bucket_from_the_settings(tmp_path: Any) -> None:
    from storage.remote import RemoteSnapshotStore

    remote = RemoteSnapshotStore(f"file://{tmp_path}/remote")
    local = LocalSnapshotStore(str(tmp_path / "local"))
    capped = Mirror(remote=remote, local=local, events=_Events(),
                    settings=load_settings({"ORCH_MIRROR_MAX_MBPS": "12.5"}))
    assert capped.bucket.rate_bps == 12.5 * MB and capped.auto is None
    auto = Mirror(remote=remote, local=local, events=_Events(),
                  settings=load_settings({"ORCH_MIRROR_MAX_MBPS": "auto"}))
    assert auto.bucket.rate_bps is None and auto.auto is not None
    auto.note_progress(10, 100.0)  # the supervisor's feed: harmless before the thread runs


def test_lift_cap_for_the_final_flush(tmp_path: Any) -> None:
    from storage.remote import RemoteSnapshotStore

    events: list[tuple[str, dict[str, Any]]] = []

    class Recording:
        def emit(self, event: str, **fields: Any) -> None:
            events.append((event, fields))

    remote = RemoteSnapshotStore(f"file://{tmp_path}/remote")
    mirror = Mirror(remote=remote, local=LocalSnapshotStore(str(tmp_path / "local")),
                    events=Recording(), settings=load_settings({"ORCH_MIRROR_MAX_MBPS": "3"}))
    mirror.lift_cap()
    assert mirror.bucket.rate_bps is None and mirror.auto is None
    assert events == [("mirror.throttled", {"action": "lift_final", "cap_mb_per_s": None})]
    mirror.lift_cap()  # nothing more to lift: no second event
    assert len(events) == 1


def test_note_progress_drives_the_bucket(tmp_path: Any) -> None:
    """The supervisor's heartbeat feed reaches the bucket: a slowed window while uploading
    halves what was sent; the change is a mirror.throttled event."""
    from storage.remote import RemoteSnapshotStore

    events: list[tuple[str, dict[str, Any]]] = []

    class Recording:
        def emit(self, event: str, **fields: Any) -> None:
            events.append((event, fields))

    now = [0.0]
    mirror = Mirror(remote=RemoteSnapshotStore(f"file://{tmp_path}/remote"),
                    local=LocalSnapshotStore(str(tmp_path / "local")), events=Recording(),
                    settings=load_settings({"ORCH_MIRROR_MAX_MBPS": "auto"}),
                    monotonic=lambda: now[0])
    step, t = 0, 100.0

    def feed(seconds: float, steps_per_s: float, send_bps: float = 0.0) -> None:
        nonlocal step, t
        for _ in range(round(seconds / 0.5)):
            now[0] += 0.5
            t += 0.5
            step += round(steps_per_s * 0.5)
            if send_bps:
                mirror.bucket.take(int(send_bps * 0.5))  # unlimited yet: counts, never waits
            mirror.note_progress(step, t)

    mirror.note_progress(step, t)
    feed(10.0, 10.0)  # idle: the reference rate
    with mirror._cond:
        mirror._busy = 1  # an upload is in progress (what _next_job sets)
    feed(5.0, 10.0, 50 * MB)  # the window that mixes idle and busy decides nothing
    assert events == []
    feed(5.0, 6.0, 50 * MB)
    assert [e for e, _ in events] == ["mirror.throttled"]
    assert events[0][1]["action"] == "backoff"
    assert events[0][1]["cap_mb_per_s"] == pytest.approx(25.0, rel=0.02)
    assert mirror.bucket.rate_bps == pytest.approx(25 * MB, rel=0.02)
