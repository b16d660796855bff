"""The supervisor's state machine driven by a fake clock and a scripted worker group.

No process is started and nothing sleeps: the fake clock advances instantly, and each scripted
attempt writes the files real workers would (heartbeats, snapshots, error files) before it
"exits" with a chosen status. A real ``LocalSnapshotStore`` keeps snapshot handling honest.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from contract.codes import EXIT_FAILED, EXIT_OK, Phase
from contract.paths import RunPaths
from orchestrator.config import LaunchConfig
from orchestrator.notices import NoticePoller
from orchestrator.policy import Backoff
from orchestrator.runstate import EventLog, next_attempt, read_events, read_state
from orchestrator.settings import Settings
from orchestrator.supervisor import StopRequest, Supervisor
from storage import LocalSnapshotStore
from tests.support.clock import FakeClock

pytestmark = pytest.mark.timeout(30)

DIGEST = "sha256:" + "0" * 64


Hook = Callable[[int, "int | None"], None]


@dataclass
class Attempt:
    """One scripted attempt: runs ``polls`` polls, then ``on_exit`` and exits with ``code``."""

    code: int
    polls: int = 3
    on_start: Hook | None = None
    on_exit: Hook | None = None
    hang: bool = False


@dataclass
class FakeGroup:
    script: list[Attempt]
    starts: list[tuple[int, int | None]] = field(default_factory=list)
    terminations: list[float] = field(default_factory=list)
    kills: int = 0
    _left: int = 0
    _current: Attempt | None = None

    def start(self, attempt: int, resume_step: int | None) -> None:
        if len(self.starts) >= len(self.script):
            raise AssertionError("more attempts than scripted")
        self._current = self.script[len(self.starts)]
        self.starts.append((attempt, resume_step))
        self._left = self._current.polls
        if self._current.on_start is not None:
            self._current.on_start(attempt, resume_step)

    def poll(self) -> int | None:
        cur = self._current
        assert cur is not None
        if cur.hang:
            return None
        self._left -= 1
        if self._left > 0:
            return None
        if cur.on_exit is not None:
            cur.on_exit(*self.starts[-1])
        return cur.code

    def terminate(self, grace_s: float) -> int:
        self.terminations.append(grace_s)
        return -signal.SIGTERM

    def kill(self) -> None:
        self.kills += 1

    def output_tail(self) -> str:
        return ""


class Env:
    """A checkpoint dir plus helpers that play the workers' part."""

    def __init__(self, root: Path, clock: FakeClock) -> None:
        self.dir = str(root / "ckpt")
        self.paths = RunPaths.of(self.dir)
        self.store = LocalSnapshotStore(self.dir)
        self.clock = clock

    def snapshot(self, step: int, *, corrupt: bool = False, metrics: dict[str, float] | None = None,
                 best: dict[str, str] | None = None) -> None:
        w = self.store.begin(step)
        w.write_bytes("tensors.bin", bytes(range(64)))
        metadata: dict[str, Any] = {"metrics": metrics or {}}
        if best is not None:
            metadata["best"] = best
        w.commit(run_id="r", epoch=0, world_size=2, digest=DIGEST, metadata=metadata)
        if corrupt:
            path = os.path.join(self.store.path(step), "tensors.bin")
            with open(path, "r+b") as f:
                f.write(b"\xff")

    def heartbeat(self, attempt: int, step: int, rank: int = 0) -> None:
        os.makedirs(self.paths.progress_dir, exist_ok=True)
        doc = {"pid": 1, "rank": rank, "step": step, "epoch": 0, "time": self.clock.time(),
               "attempt": attempt}
        with open(os.path.join(self.paths.progress_dir, f"rank-{rank}.json"), "w") as f:
            json.dump(doc, f)

    def error_file(self, attempt: int, rank: int, *, when: float, fatal: bool = False,
                   message: str = "boom", kind: str = "RuntimeError") -> None:
        d = self.paths.errors_dir(attempt)
        os.makedirs(d, exist_ok=True)
        doc = {"rank": rank, "attempt": attempt, "time": when, "type": kind, "message": message,
               "traceback": "Traceback ...", "fatal": fatal}
        with open(os.path.join(d, f"rank-{rank}.json"), "w") as f:
            json.dump(doc, f)

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.paths)

    def names(self) -> list[str]:
        return [e["event"] for e in self.events()]

    def state(self) -> dict[str, Any]:
        doc = read_state(self.paths)
        assert doc is not None
        return doc


SETTINGS = Settings(
    backoff_initial_s=1.0, backoff_max_s=8.0, backoff_jitter_s=0.5, poll_interval_s=0.5,
    scan_interval_s=1.0, crash_loop_attempts=3,
)


def make(
    tmp_path: Path,
    script: list[Attempt] | Callable[[Env], list[Attempt]],
    *,
    settings: Settings = SETTINGS,
    stop: StopRequest | None = None,
    first_attempt: int = 0,
    notices: NoticePoller | None = None,
    **config: Any,
) -> tuple[Supervisor, FakeGroup, Env, FakeClock]:
    clock = FakeClock()
    env = Env(tmp_path, clock)
    os.makedirs(env.paths.run_dir, exist_ok=True)
    attempts = script(env) if callable(script) else script
    group = FakeGroup(attempts)
    cfg = LaunchConfig(checkpoint_dir=env.dir, script="train.py", nproc_per_node=2, **config)
    sup = Supervisor(
        config=cfg, settings=settings, run_id="r", paths=env.paths, clock=clock, group=group,
        store=env.store, events=EventLog(env.paths.events, clock=clock, run_id="r"),
        stop=stop or StopRequest(), first_attempt=first_attempt, pid=123, notices=notices,
    )
    return sup, group, env, clock


def test_fresh_start_runs_to_done(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        def work(attempt: int, _resume: int | None) -> None:
            env.heartbeat(attempt, 5)
            env.snapshot(5)
        return [Attempt(0, on_exit=work)]

    sup, group, env, _ = make(tmp_path, script)
    out = sup.run()
    assert (out.exit_code, out.phase, out.failure) == (EXIT_OK, Phase.DONE, None)
    assert group.starts == [(0, None)]
    state = env.state()
    assert state["phase"] == "done"
    assert state["step"] == 5
    assert state["newest_local_step"] == 5
    assert state["resumed_from_step"] is None
    assert state["restarts"] == 0
    assert state["pid"] == 123
    assert state["nodes"][0]["node_rank"] == 0
    assert env.names() == [
        "supervisor.resume_selected", "supervisor.attempt_started", "supervisor.progress_resumed",
        "supervisor.attempt_ended", "supervisor.finished",
    ]
    ended = next(e for e in env.events() if e["event"] == "supervisor.attempt_ended")
    assert (ended["exit_code"], ended["step"], ended["resume_step"]) == (0, 5, None)
    assert isinstance(ended["last_heartbeat_at"], float)


def test_crash_then_resume_from_newest_valid_snapshot(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        def crash(attempt: int, _resume: int | None) -> None:
            env.heartbeat(attempt, 25)
            env.snapshot(10)
            env.snapshot(20)
            os.truncate(os.path.join(env.store.path(20), "tensors.bin"), 10)
            env.error_file(attempt, 1, when=5.0, message="CUDA went away")
        return [Attempt(1, on_exit=crash), Attempt(0)]

    sup, group, env, _ = make(tmp_path, script)
    out = sup.run()
    assert out.exit_code == EXIT_OK
    assert group.starts == [(0, None), (1, 10)]
    assert not os.path.exists(env.store.path(20)), "the invalid snapshot is removed"
    invalid = [e for e in env.events() if e["event"] == "supervisor.snapshot_invalid"]
    assert [e["step"] for e in invalid] == [20]
    assert "size" in invalid[0]["reason"]
    failed = next(e for e in env.events() if e["event"] == "supervisor.attempt_failed")
    assert failed["root_cause"] == "rank 1: RuntimeError: CUDA went away"
    assert failed["progressed"] is True
    state = env.state()
    assert (state["restarts"], state["resumed_from_step"], state["attempt"]) == (1, 10, 1)
    assert state["last_failure"] == "rank 1: RuntimeError: CUDA went away"  # kept after recovery


def test_a_snapshot_of_a_newer_format_is_skipped_and_kept(tmp_path: Path) -> None:
    # Written by a newer release (then downgraded): unusable here, but never deleted.
    def script(env: Env) -> list[Attempt]:
        env.snapshot(10)
        env.snapshot(20)
        path = os.path.join(env.store.path(20), "manifest.json")
        with open(path) as f:
            doc = json.load(f)
        doc["format_version"] = 3
        with open(path, "w") as f:
            json.dump(doc, f)
        return [Attempt(0)]

    sup, group, env, _ = make(tmp_path, script)
    assert sup.run().exit_code == EXIT_OK
    assert group.starts == [(0, 10)]
    invalid = [e for e in env.events() if e["event"] == "supervisor.snapshot_invalid"]
    assert [(e["step"], "newer" in e["reason"]) for e in invalid] == [(20, True)]
    assert os.path.exists(env.store.path(20)), "a newer release's snapshot stays"
    assert env.store.newest_valid(cleanup=True).step == 10  # type: ignore[union-attr]
    assert os.path.exists(env.store.path(20))


def damaged_on_load(env: Env, step: int) -> Hook:
    """The ranks' verified load of ``step`` fails: rank 0 finds the damage, rank 1 hears of it."""
    def fail(attempt: int, resume: int | None) -> None:
        assert resume == step
        env.error_file(attempt, 0, when=1.0, kind="CorruptSnapshot",
                       message="tensors.bin: checksum mismatch")
        env.error_file(attempt, 1, when=1.1, kind="PeerFailure", message=(
            f"rank 0 failed loading snapshot step {step}: CorruptSnapshot: tensors.bin: "
            "checksum mismatch"))
    return fail


def test_the_first_attempt_checksums_every_candidate(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        env.snapshot(10)
        env.snapshot(20, corrupt=True)  # same size: only a checksum catches it
        return [Attempt(0)]

    sup, group, env, _ = make(tmp_path, script)
    assert sup.run().exit_code == EXIT_OK
    assert group.starts == [(0, 10)]
    invalid = [e for e in env.events() if e["event"] == "supervisor.snapshot_invalid"]
    assert [(e["step"], "checksum" in e["reason"]) for e in invalid] == [(20, True)]


@pytest.mark.parametrize("keep_local", [None, 3])
def test_a_relaunch_leaves_checksums_to_the_ranks_and_verifies_once_they_find_damage(
    tmp_path: Path, keep_local: int | None,
) -> None:
    def script(env: Env) -> list[Attempt]:
        def crash(attempt: int, _resume: int | None) -> None:
            env.heartbeat(attempt, 25)
            env.snapshot(10)
            env.snapshot(20, corrupt=True)  # same size: only a checksum catches it
            env.error_file(attempt, 1, when=5.0, message="CUDA went away")
        return [Attempt(1, on_exit=crash), Attempt(1, on_exit=damaged_on_load(env, 20)), Attempt(0)]

    # Retention (on by default) checksums nothing either.
    sup, group, env, _ = make(tmp_path, script, keep_local="all" if keep_local is None else keep_local)
    out = sup.run()
    assert out.exit_code == EXIT_OK
    # Attempt 1 gets 20 on its manifest and sizes; its ranks find the damage while loading.
    assert group.starts == [(0, None), (1, 20), (2, 10)]
    assert not os.path.exists(env.store.path(20))
    corrupt = [e for e in env.events() if e["event"] == "supervisor.resume_corrupt"]
    assert [(e["attempt"], e["step"]) for e in corrupt] == [(1, 20)]
    invalid = [e for e in env.events() if e["event"] == "supervisor.snapshot_invalid"]
    assert [(e["attempt"], e["step"], "checksum" in e["reason"]) for e in invalid] == [(2, 20, True)]
    state = env.state()
    # The damaged resume point cost a start-up, not a restart, and no backoff.
    assert (state["restarts"], state["resumed_from_step"], state["attempt"]) == (1, 10, 2)
    assert state["last_failure"] == "rank 1: RuntimeError: CUDA went away"


def test_damage_found_after_a_verified_selection_is_an_ordinary_failure(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        env.snapshot(10)
        return [Attempt(1, on_exit=damaged_on_load(env, 10)), Attempt(0)]

    sup, group, env, _ = make(tmp_path, script)
    assert sup.run().exit_code == EXIT_OK
    assert group.starts == [(0, 10), (1, 10)]  # still valid when checksummed again
    assert "supervisor.resume_corrupt" in env.names()
    state = env.state()
    assert state["restarts"] == 1
    assert state["last_failure"] == "rank 0: CorruptSnapshot: tensors.bin: checksum mismatch"


def test_budget_spent_fails_with_root_cause(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        def crash(attempt: int, _resume: int | None) -> None:
            env.heartbeat(attempt, 100 + attempt)  # progress every time: not a crash loop
            env.error_file(attempt, 0, when=9.0, message="late")
            env.error_file(attempt, 1, when=3.0, message=f"first failure {attempt}")
        return [Attempt(1, on_exit=crash) for _ in range(3)]

    sup, group, env, _ = make(tmp_path, script, max_restarts=2)
    out = sup.run()
    assert out.exit_code == EXIT_FAILED
    assert out.failure == "rank 1: RuntimeError: first failure 2"
    assert len(group.starts) == 3
    gave_up = next(e for e in env.events() if e["event"] == "supervisor.gave_up")
    assert gave_up["reason"] == "restart_budget_spent"
    state = env.state()
    assert (state["phase"], state["restarts"]) == ("failed", 2)
    assert state["last_failure"] == out.failure


def test_fatal_error_file_fails_at_once(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        def crash(attempt: int, _resume: int | None) -> None:
            env.error_file(attempt, 0, when=1.0, fatal=True, kind="ConfigMismatch",
                           message="lr differs")
            env.error_file(attempt, 1, when=2.0, message="peer died")
        return [Attempt(78, on_exit=crash), Attempt(0)]

    sup, group, env, _ = make(tmp_path, script, max_restarts=5)
    out = sup.run()
    assert out.exit_code == EXIT_FAILED
    assert group.starts == [(0, None)]
    assert out.failure == (
        "rank 0: ConfigMismatch [relaunch with --allow-config-change to resume anyway]: lr differs"
    )
    assert next(e for e in env.events() if e["event"] == "supervisor.gave_up")["reason"] == "fatal"


def test_fatal_flag_on_a_later_rank_still_stops(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        def crash(attempt: int, _resume: int | None) -> None:
            env.error_file(attempt, 0, when=1.0, message="peer died")
            env.error_file(attempt, 1, when=2.0, fatal=True, message="bad args")
        return [Attempt(1, on_exit=crash)]

    sup, group, _, _ = make(tmp_path, script, max_restarts=5)
    out = sup.run()
    assert out.exit_code == EXIT_FAILED and len(group.starts) == 1
    assert out.failure is not None and "rank 1 reported a fatal error" in out.failure


def test_crash_loop_without_progress_gives_up_early(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        env.snapshot(10)

        def crash(attempt: int, resume: int | None) -> None:
            assert resume == 10
            env.heartbeat(attempt, 10)  # back at the resume point: no progress
        return [Attempt(1, on_exit=crash) for _ in range(10)]

    sup, group, env, _ = make(tmp_path, script, max_restarts=9)
    out = sup.run()
    assert out.exit_code == EXIT_FAILED
    assert len(group.starts) == 3
    gave_up = next(e for e in env.events() if e["event"] == "supervisor.gave_up")
    assert gave_up["reason"] == "crash_loop"
    assert gave_up["no_progress_attempts"] == 3
    assert env.state()["restarts"] == 2


def test_progress_resets_the_crash_loop_counter(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        def stuck(attempt: int, _resume: int | None) -> None:
            pass

        def advance(attempt: int, _resume: int | None) -> None:
            env.heartbeat(attempt, 50 + attempt)
        hooks = [stuck, stuck, advance, stuck, stuck, advance]
        return [Attempt(1, on_exit=h) for h in hooks] + [Attempt(0)]

    sup, group, _, _ = make(tmp_path, script, max_restarts=10)
    assert sup.run().exit_code == EXIT_OK
    assert len(group.starts) == 7


def test_backoff_grows_and_is_bounded_between_attempts(tmp_path: Path) -> None:
    sup, group, env, clock = make(tmp_path, [Attempt(1, polls=1) for _ in range(4)] + [Attempt(0)],
                                  max_restarts=10,
                                  settings=Settings(backoff_initial_s=1.0, backoff_max_s=3.0,
                                                    backoff_jitter_s=0.5, poll_interval_s=0.25,
                                                    crash_loop_attempts=10))
    start_times: list[float] = []
    original = group.start

    def timed_start(attempt: int, resume_step: int | None) -> None:
        start_times.append(clock.now)
        original(attempt, resume_step)

    group.start = timed_start  # type: ignore[method-assign]
    assert sup.run().exit_code == EXIT_OK
    delays = [e["delay_s"] for e in env.events() if e["event"] == "supervisor.backoff"]
    assert len(delays) == 4
    assert 1.0 <= delays[0] <= 1.5
    assert 2.0 <= delays[1] <= 2.5
    assert delays[2] == delays[3] == 3.0
    gaps = [b - a for a, b in itertools.pairwise(start_times)]
    for gap, delay in zip(gaps, delays, strict=True):
        assert gap >= delay - 0.001  # waited out the backoff (delay_s is rounded to ms)


def test_backoff_has_jitter() -> None:
    b = Backoff(initial_s=1.0, max_s=60.0, jitter_s=1.0)
    samples = {round(b.delay(3), 6) for _ in range(50)}
    assert len(samples) > 10
    assert all(4.0 <= s <= 5.0 for s in samples)
    assert b.delay(50) == 60.0


def test_root_cause_from_torchrun_log_when_no_error_file(tmp_path: Path) -> None:
    fixture = Path(__file__).parent / "fixtures" / "orchestrator_torchrun_sigkill.txt"

    def script(env: Env) -> list[Attempt]:
        def killed(attempt: int, _resume: int | None) -> None:
            os.makedirs(env.paths.logs_dir, exist_ok=True)
            Path(env.paths.attempt_log(attempt)).write_text(fixture.read_text())
        return [Attempt(1, on_exit=killed)]

    sup, _, _, _ = make(tmp_path, script, max_restarts=0)
    out = sup.run()
    assert out.failure == "rank 1 killed by SIGKILL"


def test_hang_is_killed_and_relaunched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import supervisor as supervisor_module
    from orchestrator.forensics import Capture

    dumped: list[tuple[dict[int, int], str, int]] = []

    def capture(pids: dict[int, int], directory: str, *, timeout_s: float) -> Capture:
        dumped.append((dict(pids), directory, len(group.terminations)))
        return Capture(directory=directory, captured=tuple(pids))

    monkeypatch.setattr(supervisor_module, "capture_stacks", capture)

    def script(env: Env) -> list[Attempt]:
        def one_beat(attempt: int, _resume: int | None) -> None:
            env.heartbeat(attempt, 3)
            env.heartbeat(attempt, 3, rank=1)
        return [Attempt(0, hang=True, on_start=one_beat), Attempt(0)]

    sup, group, env, clock = make(tmp_path, script, hang_timeout=20.0, grace=7.0)
    out = sup.run()
    assert out.exit_code == EXIT_OK
    assert group.terminations == [7.0]
    # Every rank's stack, before the group was terminated, into run/logs/hang-attempt-0.
    assert dumped == [({0: 1, 1: 1}, env.paths.hang_dir(0), 0)]
    hang = next(e for e in env.events() if e["event"] == "supervisor.hang_detected")
    assert hang["stacks_dir"] == env.paths.hang_dir(0) and "ranks 0, 1" in hang["stacks"]
    failed = next(e for e in env.events() if e["event"] == "supervisor.attempt_failed")
    assert failed["source"] == "hang"
    assert "hang-timeout 20s" in failed["root_cause"]
    assert 20.0 <= clock.now < 40.0


def test_stop_signal_terminates_workers_and_exits_non_zero(tmp_path: Path) -> None:
    # SIGINT stays a plain interrupt (SIGTERM/SIGUSR1 are preemptions: test_orchestrator_preemption).
    stop = StopRequest()
    sup, group, env, clock = make(tmp_path, [Attempt(0, hang=True)], stop=stop, grace=5.0)

    def signal_later() -> None:
        if clock.now >= 2.0:
            stop.request(signal.SIGINT)

    clock.on_sleep = signal_later
    out = sup.run()
    assert out.exit_code == 128 + signal.SIGINT
    assert out.phase is Phase.FAILED
    assert group.terminations == [5.0]
    assert "SIGINT" in (out.failure or "")
    assert env.state()["phase"] == "failed"
    assert "supervisor.interrupted" in env.names()


def test_retention_keeps_last_k_and_the_resume_point_while_running(tmp_path: Path) -> None:
    seen: list[list[int]] = []

    def script(env: Env) -> list[Attempt]:
        env.snapshot(5)

        def work(attempt: int, _resume: int | None) -> None:
            for step in (10, 20, 30):
                env.snapshot(step)
        return [Attempt(0, polls=6, on_start=work)]

    sup, group, env, clock = make(tmp_path, script, keep_local=2)
    clock.on_sleep = lambda: seen.append([i.step for i in env.store.list()])
    assert sup.run().exit_code == EXIT_OK
    assert group.starts == [(0, 5)]
    # While the ranks run, the snapshot they resumed from is protected...
    assert [5, 20, 30] in seen
    # ...once they are gone, keep-last-2 alone decides: the finished run's newest snapshot is
    # checksummed once, so the older verified fallback (5) is no longer needed.
    assert [i.step for i in env.store.list()] == [20, 30]
    deleted = [e["steps"] for e in env.events() if e["event"] == "retention.deleted"]
    assert deleted == [[10], [5]]


def test_no_retention_without_rules(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        def work(attempt: int, _resume: int | None) -> None:
            for step in (10, 20, 30):
                env.snapshot(step)
        return [Attempt(0, on_exit=work)]

    sup, _, env, _ = make(tmp_path, script)
    assert sup.run().exit_code == EXIT_OK
    assert [i.step for i in env.store.list()] == [10, 20, 30]


@pytest.mark.parametrize("declared", [False, True])
def test_keep_best_without_a_declared_metric_is_reported_once(tmp_path: Path, declared: bool) -> None:
    """--keep-best ranks by the metric the script declares in its manifests; a script that
    declares none gets a warning event instead of a rule that silently keeps nothing."""

    def script(env: Env) -> list[Attempt]:
        def work(attempt: int, _resume: int | None) -> None:
            for step, acc in ((10, 0.9), (20, 0.5), (30, 0.7)):
                env.snapshot(step, metrics={"acc": acc}, best={"metric": "acc", "mode": "max"}
                             if declared else None)
        return [Attempt(1, on_exit=work), Attempt(0)]

    sup, _, env, _ = make(tmp_path, script, keep_local=1, keep_best=1)
    assert sup.run().exit_code == EXIT_OK
    undeclared = [e for e in env.events() if e["event"] == "retention.best_undeclared"]
    kept = [i.step for i in env.store.list()]
    if declared:
        assert undeclared == [] and kept == [10, 30]  # the best (0.9) and the newest
    else:
        assert [e["keep_best"] for e in undeclared] == [1]  # once, not at every scan
        assert kept == [30]


def test_abandoned_temp_dirs_are_cleaned_before_each_attempt(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        os.makedirs(os.path.join(env.store.root, ".tmp-step-000000000040-99-abcd"))
        return [Attempt(0)]

    sup, _, env, _ = make(tmp_path, script)
    assert sup.run().exit_code == EXIT_OK
    assert os.listdir(env.store.root) == []
    assert "supervisor.abandoned_removed" in env.names()


def test_state_is_written_while_running(tmp_path: Path) -> None:
    seen: list[str] = []

    def script(env: Env) -> list[Attempt]:
        def beat(attempt: int, _resume: int | None) -> None:
            env.heartbeat(attempt, 7)
        return [Attempt(0, polls=10, on_start=beat)]

    sup, _, env, clock = make(tmp_path, script)
    clock.on_sleep = lambda: seen.append(env.state()["phase"])
    sup.run()
    assert "running" in seen
    assert env.state()["step"] == 7


def test_start_failure_is_reported(tmp_path: Path) -> None:
    sup, group, _, _ = make(tmp_path, [Attempt(0)])

    def broken(attempt: int, resume_step: int | None) -> None:
        raise FileNotFoundError(2, "No such file", "python")

    group.start = broken  # type: ignore[method-assign]
    out = sup.run()
    assert out.exit_code == EXIT_FAILED
    assert out.failure is not None and "cannot start" in out.failure


def test_supervisor_bug_kills_the_group(tmp_path: Path) -> None:
    sup, group, env, _ = make(tmp_path, [Attempt(0, hang=True)])

    def explode() -> int | None:
        raise ZeroDivisionError("bug")

    group.poll = explode  # type: ignore[method-assign]
    with pytest.raises(ZeroDivisionError):
        sup.run()
    assert group.kills == 1
    assert env.state()["phase"] == "failed"


def test_an_error_while_recording_the_end_is_the_error_reported(tmp_path: Path) -> None:
    """A failure to write the terminal state is raised as itself (not as a phase-transition
    error from the handler), and the state still ends failed once writes work again."""
    sup, _, env, _ = make(tmp_path, [Attempt(0)])
    state_file = sup._state_file
    write = state_file.write
    failed_once: list[str] = []

    def flaky(doc: Any, **kw: Any) -> None:
        if doc["phase"] == "done" and not failed_once:
            failed_once.append("done")
            raise OSError(28, "No space left on device")
        write(doc, **kw)

    state_file.write = flaky  # type: ignore[method-assign]
    with pytest.raises(OSError, match="No space left"):
        sup.run()
    assert failed_once == ["done"]
    assert env.state()["phase"] == "failed"
    assert "No space left" in env.state()["last_failure"]


def test_attempt_numbers_continue_across_supervisor_launches(tmp_path: Path) -> None:
    sup, group, env, _ = make(tmp_path, [Attempt(1, polls=1), Attempt(0)], max_restarts=1)
    sup.run()
    assert [a for a, _ in group.starts] == [0, 1]
    assert next_attempt(env.paths) == 2


def test_retention_never_drops_the_verified_fallback_for_an_unverified_newer(
    tmp_path: Path,
) -> None:
    def script(env: Env) -> list[Attempt]:
        env.snapshot(10)

        def crash(attempt: int, _resume: int | None) -> None:
            env.heartbeat(attempt, 25)
            env.snapshot(20, corrupt=True)
        return [Attempt(1, on_exit=crash), Attempt(1, on_exit=damaged_on_load(env, 20)), Attempt(0)]

    sup, group, env, _ = make(tmp_path, script, keep_local=1)
    assert sup.run().exit_code == EXIT_OK
    # 10 was checksummed by the first selection: keep-last-1 keeps it beside the newer 20, the
    # relaunch tries 20 (manifest and sizes only), its ranks find the damage, 10 is used.
    assert group.starts == [(0, 10), (1, 20), (2, 10)]
    assert [i.step for i in env.store.list()] == [10]


def test_a_resume_point_the_ranks_trained_past_counts_as_verified(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        def crash(attempt: int, _resume: int | None) -> None:
            env.heartbeat(attempt, 25)
            env.snapshot(10)
            env.snapshot(20)
        def resumed_then_crash(attempt: int, resume: int | None) -> None:
            env.heartbeat(attempt, 27)  # trained past 20: the ranks' load verified it
            env.snapshot(30, corrupt=True)
        return [Attempt(1, on_exit=crash), Attempt(1, on_exit=resumed_then_crash),
                Attempt(1, on_exit=damaged_on_load(env, 30)), Attempt(0)]

    sup, group, env, _ = make(tmp_path, script, keep_local=1)
    assert sup.run().exit_code == EXIT_OK
    assert group.starts == [(0, None), (1, 20), (2, 30), (3, 20)]
    # keep-last-1 never left the run without 20, the snapshot known to load
    assert [i.step for i in env.store.list()] == [20]
    assert not [e for e in env.events() if e["event"] == "supervisor.gave_up"]


def test_closed_rendezvous_relaunches_without_spending_restarts(tmp_path: Path) -> None:
    """Multi-node: another node's dying torchrun closed the rendezvous; rejoin for free."""

    def closed(env: Env) -> Hook:
        def write(attempt: int, _resume: int | None) -> None:
            Path(env.paths.attempt_log(attempt)).write_text(
                "torch.distributed.elastic.rendezvous.api.RendezvousClosedError\n"
            )
        return write

    def script(env: Env) -> list[Attempt]:
        os.makedirs(env.paths.logs_dir, exist_ok=True)
        return [Attempt(1, on_exit=closed(env)), Attempt(1, on_exit=closed(env)),
                Attempt(0, on_exit=lambda a, r: env.heartbeat(a, 5))]

    sup, group, env, _ = make(tmp_path, script, max_restarts=0)
    out = sup.run()
    assert out.exit_code == EXIT_OK
    assert [a for a, _ in group.starts] == [0, 1, 2]
    st = env.state()
    assert st["restarts"] == 0 and st["phase"] == "done"
    assert env.names().count("supervisor.rendezvous_closed") == 2


def test_closed_rendezvous_retries_are_bounded(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        os.makedirs(env.paths.logs_dir, exist_ok=True)

        def write(attempt: int, _resume: int | None) -> None:
            Path(env.paths.attempt_log(attempt)).write_text(
                "torch.distributed.elastic.rendezvous.api.RendezvousClosedError\n"
            )
        return [Attempt(1, on_exit=write) for _ in range(4)]

    settings = replace(SETTINGS, rdzv_closed_retries=2)
    sup, group, _env, _ = make(tmp_path, script, settings=settings, max_restarts=1)
    out = sup.run()
    # Two free relaunches, then the third counts: one restart (the budget), then give up.
    assert out.exit_code == EXIT_FAILED and len(group.starts) == 4
    assert "closed by another node" in (out.failure or "")


def test_fresh_start_step0_heartbeat_is_not_progress(tmp_path: Path) -> None:
    """resume() heartbeats step 0 before training: a fresh run dying there is a crash loop."""
    def script(env: Env) -> list[Attempt]:
        def crash(attempt: int, resume: int | None) -> None:
            assert resume is None
            env.heartbeat(attempt, 0)
        return [Attempt(1, on_exit=crash) for _ in range(10)]

    sup, group, env, _ = make(tmp_path, script, max_restarts=9)
    out = sup.run()
    assert out.exit_code == EXIT_FAILED and len(group.starts) == 3
    gave_up = next(e for e in env.events() if e["event"] == "supervisor.gave_up")
    assert gave_up["reason"] == "crash_loop"


# -- warm spare -------------------------------------------------------------------------------


@dataclass
class FakeSpare:
    """A spare group: waits for its gate file, then plays ``then`` (or dies while waiting)."""

    then: Attempt | None
    starts: list[tuple[int, int | None, str | None]] = field(default_factory=list)
    kills: int = 0
    _left: int = 0

    def start(self, attempt: int, resume_step: int | None, *, spare_gate: str | None = None) -> None:
        self.starts.append((attempt, resume_step, spare_gate))
        self._left = self.then.polls if self.then is not None else 0

    @property
    def gate(self) -> str:
        gate = self.starts[-1][2]
        assert gate is not None
        return gate

    def poll(self) -> int | None:
        if self.then is None:
            return 1  # crashed while waiting
        if not os.path.exists(self.gate):
            return None
        if self._left == self.then.polls and self.then.on_start is not None:
            with open(self.gate) as f:  # promoted: the group starts its work now
                self.then.on_start(self.starts[-1][0], json.load(f)["resume_step"])
        self._left -= 1
        if self._left > 0:
            return None
        if self.then.on_exit is not None:
            with open(self.gate) as f:
                self.then.on_exit(self.starts[-1][0], json.load(f)["resume_step"])
        return self.then.code

    def terminate(self, grace_s: float) -> int:
        return -signal.SIGTERM

    def kill(self) -> None:
        self.kills += 1

    def output_tail(self) -> str:
        return ""


def with_spares(sup: Supervisor, spares: list[FakeSpare]) -> list[FakeSpare]:
    made: list[FakeSpare] = []

    def factory() -> FakeSpare:
        made.append(spares[len(made)])
        return made[-1]

    sup._spare.factory = factory
    return made


def progressed_then_crashed(env: Env) -> Attempt:
    """An attempt that completes step 12 and snapshot 10, then loses rank 1."""

    def progress(attempt: int, _resume: int | None) -> None:
        env.heartbeat(attempt, 12)
        env.snapshot(10)

    def crash(attempt: int, _resume: int | None) -> None:
        env.error_file(attempt, 1, when=5.0, message="boom")

    return Attempt(1, polls=4, on_start=progress, on_exit=crash)


def test_warm_spare_is_promoted_with_the_verified_resume_step(tmp_path: Path) -> None:
    sup, group, env, _ = make(tmp_path, lambda env: [progressed_then_crashed(env)], warm_spare=True)

    def finish(attempt: int, resume: int | None) -> None:
        assert (attempt, resume) == (1, 10)
        env.heartbeat(attempt, 20)
        env.snapshot(20)

    def resumed(attempt: int, _resume: int | None) -> None:
        env.heartbeat(attempt, 15)

    spares = with_spares(
        sup, [FakeSpare(Attempt(0, polls=4, on_start=resumed, on_exit=finish)), FakeSpare(None)]
    )
    out = sup.run()
    assert out.exit_code == EXIT_OK
    assert group.starts == [(0, None)]  # no cold relaunch
    first, second = spares
    assert first.starts[0][:2] == (1, None)
    with open(first.gate) as f:
        assert json.load(f) == {"attempt": 1, "resume_step": 10}
    assert first.kills == 0
    assert second.starts[0][:2] == (2, None) and second.kills == 1  # discarded at the end
    names = env.names()
    assert names.index("supervisor.spare_started") < names.index("supervisor.attempt_failed")
    assert names.index("supervisor.spare_promoted") < names.index("supervisor.finished")
    discarded = next(e for e in env.events() if e["event"] == "supervisor.spare_discarded")
    assert (discarded["attempt"], discarded["reason"]) == (2, "run_done")
    assert env.state()["resumed_from_step"] == 10


def test_a_spare_that_died_is_discarded_and_the_attempt_starts_cold(tmp_path: Path) -> None:
    sup, group, env, _ = make(
        tmp_path, lambda env: [progressed_then_crashed(env), Attempt(0)], warm_spare=True
    )
    spares = with_spares(sup, [FakeSpare(None), FakeSpare(None)])
    out = sup.run()
    assert out.exit_code == EXIT_OK
    assert group.starts == [(0, None), (1, 10)]
    assert spares[0].kills == 1
    reasons = [e["reason"] for e in env.events() if e["event"] == "supervisor.spare_discarded"]
    assert reasons[0] == "exited"


def test_no_spare_before_progress_and_none_without_the_flag(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        def crash(attempt: int, _resume: int | None) -> None:
            env.error_file(attempt, 1, when=5.0, message="boom")
        return [Attempt(1, polls=4, on_exit=crash) for _ in range(3)]

    sup, _group, env, _ = make(tmp_path, script, warm_spare=True)
    spares = with_spares(sup, [FakeSpare(None)])
    sup.run()  # a crash loop: never progressed, so no spare was ever started
    assert spares == []
    assert "supervisor.spare_started" not in env.names()


def test_warm_spare_is_single_node_only() -> None:
    with pytest.raises(ValueError, match="single-node"):
        LaunchConfig(checkpoint_dir="d", script="s.py", nodes=2, rdzv_endpoint="h:1", warm_spare=True)


def test_an_attempt_that_progressed_is_relaunched_without_backoff(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        def crash(attempt: int, _resume: int | None) -> None:
            env.heartbeat(attempt, 12)
            env.snapshot(10)
            env.error_file(attempt, 1, when=5.0, message="boom")
        return [Attempt(1, on_exit=crash), Attempt(1, polls=1), Attempt(0)]

    sup, _group, env, _ = make(tmp_path, script)
    assert sup.run().exit_code == EXIT_OK
    delays = [e["delay_s"] for e in env.events() if e["event"] == "supervisor.backoff"]
    assert delays[0] == 0.0  # progressed: at once
    assert delays[1] >= 1.0  # the resumed attempt made no progress: back off


def test_the_ranks_resume_audit_reaches_state_and_events(tmp_path: Path) -> None:
    # status --mirror reads only the mirrored state.json: the audit must be in it, and the run's
    # event history must say when a recovery did not reproduce the failed attempt.
    def report(env: Env, rank: int, **doc: Any) -> None:
        os.makedirs(env.paths.determinism_dir, exist_ok=True)
        with open(env.paths.determinism(rank), "w") as f:
            json.dump({"rank": rank, "run_id": "r", **doc}, f)

    def script(env: Env) -> list[Attempt]:
        def crash(attempt: int, _resume: int | None) -> None:
            env.heartbeat(attempt, 13)
            env.snapshot(10)
        def verified(attempt: int, _resume: int | None) -> None:
            env.heartbeat(attempt, 14)
            report(env, 0, state="verified", checked_through_step=13)
        def diverged(attempt: int, _resume: int | None) -> None:
            env.heartbeat(attempt, 20)
            report(env, 1, state="diverged", checked_through_step=10, first_divergence_step=11,
                   fingerprint="loss", expected="0x1.0p+0", got="0x1.8p+0")
        return [Attempt(1, on_exit=crash), Attempt(1, on_start=verified), Attempt(0, on_start=diverged)]

    sup, _, env, _ = make(tmp_path, script)
    assert sup.run().exit_code == EXIT_OK
    audit = [e for e in env.events() if e["event"].startswith("resume.")]
    assert [(e["event"], e["attempt"]) for e in audit] == [("resume.verified", 1), ("resume.diverged", 2)]
    assert audit[0]["checked_through_step"] == 13
    assert (audit[1]["first_divergence_step"], audit[1]["rank"], audit[1]["got"]) == (11, 1, "0x1.8p+0")
    determinism = env.state()["determinism"]
    assert determinism["state"] == "diverged" and determinism["first_divergence_step"] == 11


def test_a_run_without_recovery_is_unchecked_in_state(tmp_path: Path) -> None:
    sup, _, env, _ = make(tmp_path, [Attempt(0)])
    assert sup.run().exit_code == EXIT_OK
    assert env.state()["determinism"] == {
        "state": "unchecked", "checked_through_step": None, "first_divergence_step": None,
    }
    assert not [e for e in env.events() if e["event"].startswith("resume.")]


def test_a_removed_run_dir_is_recreated_and_the_run_goes_on(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        def remove(attempt: int, _resume: int | None) -> None:
            import shutil

            env.heartbeat(attempt, 3)
            shutil.rmtree(env.paths.run_dir)

        def finish(attempt: int, _resume: int | None) -> None:
            env.heartbeat(attempt, 5)  # a rank's heartbeat lands in the recreated progress dir
            env.snapshot(5)
        return [Attempt(0, polls=6, on_start=remove, on_exit=finish)]

    sup, _, env, _ = make(tmp_path, script)
    out = sup.run()
    assert (out.exit_code, out.state_error) == (EXIT_OK, None)
    assert "supervisor.run_dir_recreated" in env.names()  # in the new events file
    assert env.state()["phase"] == "done" and env.state()["step"] == 5
