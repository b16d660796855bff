"""The supervisor's ``checkpointing`` phase with a fake clock and a scripted worker group."""

from __future__ import annotations

import json
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from contract.codes import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, Phase
from orchestrator.notices import NoticePoller
from orchestrator.settings import load_settings, preempt_signal_numbers
from orchestrator.supervisor import StopRequest
from tests.unit.test_orchestrator_mirror import FakeRemote, supervised
from tests.unit.test_orchestrator_supervisor import Attempt, Env, make

pytestmark = pytest.mark.timeout(30)


@dataclass
class Preemptible:
    """Plays the ranks: once the request file appears they commit a snapshot, ack and exit 1."""

    env: Env
    step: int = 47
    ack: bool = True
    exit_code: int = 1
    react_after_polls: int = 1
    seen_requests: list[dict[str, object]] = field(default_factory=list)
    _polls: int = 0

    def __call__(self) -> int | None:
        path = self.env.paths.preempt_request
        if not os.path.exists(path):
            return None
        self._polls += 1
        if self._polls < self.react_after_polls:
            return None
        with open(path) as f:
            self.seen_requests.append(json.load(f))
        self.env.snapshot(self.step)
        if self.ack:
            with open(self.env.paths.preempt_ack, "w") as f:
                json.dump({"step": self.step, "attempt": self.seen_requests[-1]["attempt"]}, f)
        return self.exit_code


def _run(tmp_path: Path, *, grace: float = 30.0, signum: int = signal.SIGTERM,
         ack: bool = True, exit_code: int = 1, react_after_polls: int = 1,
         signals_at: tuple[float, ...] = (2.0,), max_restarts: int = 3,
         notices: NoticePoller | None = None):
    stop = StopRequest()
    sup, group, env, clock = make(
        tmp_path, [Attempt(0, hang=True)], stop=stop, grace=grace, max_restarts=max_restarts,
        notices=notices,
    )
    workers = Preemptible(env, ack=ack, exit_code=exit_code, react_after_polls=react_after_polls)
    poll = group.poll

    def scripted_poll() -> int | None:
        code = workers()
        return code if code is not None else poll()

    group.poll = scripted_poll  # type: ignore[method-assign]
    pending = list(signals_at)

    def on_sleep() -> None:
        env.heartbeat(0, 47)
        while pending and clock.now >= pending[0]:
            pending.pop(0)
            stop.request(signum)

    clock.on_sleep = on_sleep
    out = sup.run()
    return out, group, env, clock, workers


def test_sigterm_takes_emergency_snapshot_and_exits_75(tmp_path: Path) -> None:
    out, group, env, _clock, workers = _run(tmp_path)
    assert (out.exit_code, out.phase, out.failure) == (EXIT_PREEMPTED, Phase.PREEMPTED, None)
    req = workers.seen_requests[0]
    assert req["attempt"] == 0 and req["signal"] == "SIGTERM"
    assert req["deadline"] == pytest.approx(float(req["requested_at"]) + 30.0)  # type: ignore[arg-type]
    assert group.terminations == [] and group.kills == 0  # torchrun is never signalled
    assert len(group.starts) == 1  # no relaunch: the node is going away
    st = env.state()
    assert st["phase"] == "preempted" and st["preemptions"] == 1 and st["restarts"] == 0
    assert st["step"] == 47 and st["newest_local_step"] == 47
    assert not os.path.exists(env.paths.preempt_request)  # consumed
    names = env.names()
    assert names.index("supervisor.preempt_requested") < names.index("supervisor.preempted")
    assert "supervisor.attempt_failed" not in names


def test_sigusr1_is_a_preemption_too(tmp_path: Path) -> None:
    out, *_ = _run(tmp_path, signum=signal.SIGUSR1)
    assert out.exit_code == EXIT_PREEMPTED


@dataclass
class ScriptedNotice:
    """A cloud notice source that reports a reclaim once its clock passes ``at``."""

    clock_now: list[float]
    at: float
    checks: int = 0
    name: str = "fake"

    def check(self) -> str | None:
        self.checks += 1
        return "spot instance-action: terminate" if self.clock_now[0] >= self.at else None


def test_cloud_notice_takes_the_sigterm_path(tmp_path: Path) -> None:
    now = [0.0]
    notice = ScriptedNotice(now, at=3.0)
    poller = NoticePoller([notice], interval_s=1.0)
    real_poll = poller.poll

    def poll(t: float) -> str | None:
        now[0] = t
        return real_poll(t)

    poller.poll = poll  # type: ignore[method-assign]
    out, group, env, _clock, workers = _run(tmp_path, signals_at=(), notices=poller)
    assert out.exit_code == EXIT_PREEMPTED and out.phase is Phase.PREEMPTED
    req = workers.seen_requests[0]
    assert req["signal"] is None and "spot instance-action" in str(req["source"])
    assert len(group.starts) == 1 and group.terminations == []
    # Rate-limited: about one check per interval of fake time, none after the notice.
    checks = notice.checks
    assert 3 <= checks <= 6, checks
    events = [json.loads(line) for line in Path(env.paths.events).read_text().splitlines()]
    requested = [e for e in events if e["event"] == "supervisor.preempt_requested"]
    assert len(requested) == 1 and "notice" in requested[0]["source"]
    assert env.state()["preemptions"] == 1


def test_checkpointing_phase_is_published_while_saving(tmp_path: Path) -> None:
    seen: list[str] = []
    stop = StopRequest()
    sup, group, env, clock = make(tmp_path, [Attempt(0, hang=True)], stop=stop)
    workers = Preemptible(env, react_after_polls=3)
    poll = group.poll

    def scripted_poll() -> int | None:
        if os.path.exists(env.paths.preempt_request):
            seen.append(env.state()["phase"])
        code = workers()
        return code if code is not None else poll()

    group.poll = scripted_poll  # type: ignore[method-assign]
    clock.on_sleep = lambda: stop.request(signal.SIGTERM) if clock.now >= 1.0 else None
    assert sup.run().exit_code == EXIT_PREEMPTED
    assert seen and set(seen) == {"checkpointing"}


def test_deadline_passed_terminates_and_fails_with_cause(tmp_path: Path) -> None:
    out, group, env, clock, _ = _run(tmp_path, grace=5.0, react_after_polls=10**6)
    assert out.exit_code == EXIT_FAILED and out.phase is Phase.FAILED
    assert group.terminations == [0.0]
    assert clock.now == pytest.approx(2.0 + 5.0, abs=0.6)
    assert "within --grace 5s" in (out.failure or "")
    st = env.state()
    assert st["preemptions"] == 0 and st["restarts"] == 0
    assert "supervisor.preempt_deadline_passed" in env.names()


def test_workers_exiting_without_ack_is_a_failure(tmp_path: Path) -> None:
    out, _group, _env, *_ = _run(tmp_path, ack=False)
    assert out.exit_code == EXIT_FAILED
    assert "without committing an emergency snapshot" in (out.failure or "")


def test_a_second_signal_while_checkpointing_is_only_logged(tmp_path: Path) -> None:
    out, group, env, *_ = _run(tmp_path, signals_at=(2.0, 2.5, 3.0), react_after_polls=8)
    assert out.exit_code == EXIT_PREEMPTED
    assert group.terminations == []
    assert "supervisor.preempt_signal_repeated" in env.names()


def test_run_finishing_during_the_request_is_done(tmp_path: Path) -> None:
    out, *_ = _run(tmp_path, exit_code=0, ack=False)
    assert out.exit_code == EXIT_OK and out.phase is Phase.DONE


def test_signal_during_backoff_exits_75_without_workers(tmp_path: Path) -> None:
    stop = StopRequest()

    def script(env: Env) -> list[Attempt]:
        def crash(attempt: int, _resume: int | None) -> None:
            # No progress (no snapshot, no step): only then is there a backoff to wait out.
            env.error_file(attempt, 0, when=1.0)

        return [Attempt(1, on_exit=crash)]

    sup, group, env, clock = make(tmp_path, script, stop=stop)
    clock.on_sleep = lambda: stop.request(signal.SIGTERM) if env.state()["phase"] == "recovering" else None
    out = sup.run()
    assert out.exit_code == EXIT_PREEMPTED
    assert len(group.starts) == 1
    assert env.state()["preemptions"] == 1


def test_workers_preempted_directly_relaunch_without_spending_restarts(tmp_path: Path) -> None:
    """Ranks signalled directly (not the supervisor) ack and exit: relaunch, no restart counted."""

    def script(env: Env) -> list[Attempt]:
        def preempted(attempt: int, _resume: int | None) -> None:
            env.snapshot(10 + attempt)
            os.makedirs(env.paths.control_dir, exist_ok=True)
            with open(env.paths.preempt_ack, "w") as f:
                json.dump({"step": 10 + attempt, "attempt": attempt}, f)

        return [Attempt(1, on_exit=preempted) for _ in range(3)] + [Attempt(0)]

    sup, group, env, clock = make(tmp_path, script, max_restarts=0)
    out = sup.run()
    assert out.exit_code == EXIT_OK
    assert group.starts == [(0, None), (1, 10), (2, 11), (3, 12)]
    st = env.state()
    assert st["restarts"] == 0 and st["preemptions"] == 3
    assert clock.sleeps == [] or max(clock.sleeps) <= 0.5  # no backoff


def test_stale_ack_of_an_earlier_attempt_is_ignored(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        def crash(attempt: int, _resume: int | None) -> None:
            env.error_file(attempt, 0, when=1.0)
            os.makedirs(env.paths.control_dir, exist_ok=True)
            with open(env.paths.preempt_ack, "w") as f:
                json.dump({"step": 5, "attempt": attempt + 7}, f)

        return [Attempt(1, on_exit=crash)]

    sup, _group, env, _clock = make(tmp_path, script, max_restarts=0)
    out = sup.run()
    assert out.exit_code == EXIT_FAILED and env.state()["preemptions"] == 0


def test_preempt_signal_setting() -> None:
    assert load_settings({}).preempt_signals == "TERM,USR1"
    assert preempt_signal_numbers("TERM, sigusr1,USR2") == (
        signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
    )
    assert preempt_signal_numbers("") == ()
    for bad in ("INT", "KILL", "NOPE"):
        with pytest.raises(ValueError, match="ORCH_PREEMPT_SIGNALS"):
            load_settings({"ORCH_PREEMPT_SIGNALS": bad})


def test_mirror_flush_gets_only_what_is_left_of_grace(tmp_path: Path) -> None:
    """The object store hangs: exit 75 anyway, the local snapshot stands, status shows the lag."""
    remote = FakeRemote()
    remote.gate = threading.Event()  # nothing ever reaches the object store
    sup, group, env, _ = supervised(tmp_path, lambda env: [Attempt(0, hang=True)],
                                    remote=remote, grace=1.0)
    workers = Preemptible(env)
    poll = group.poll

    def scripted_poll() -> int | None:
        code = workers()
        return code if code is not None else poll()

    group.poll = scripted_poll  # type: ignore[method-assign]
    stop = sup._stop
    clock = env.clock
    clock.on_sleep = lambda: stop.request(signal.SIGTERM) if clock.now >= 1.0 else None
    try:
        out = sup.run()
    finally:
        remote.gate.set()
    assert out.exit_code == EXIT_PREEMPTED
    assert [i.step for i in env.store.list()] == [47]
    st = env.state()
    assert st["phase"] == "preempted" and st["mirror_pending_steps"] == [47]
    assert st["mirror_lag_steps"] == 47
    behind = [e for e in env.events() if e["event"] == "mirror.behind"]
    assert behind and behind[0]["timeout_s"] <= 1.0
