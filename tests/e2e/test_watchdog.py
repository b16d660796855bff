"""End-to-end watchdog, crash loop and status views: a hung rank, a run that cannot start, `status`.

Every run is the real CLI under real torchrun (gloo, 2 ranks on CPU); every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from contract.polling import wait_until
from orchestrator.launcher import find_processes, kill_and_wait
from tests.e2e import harness
from tests.e2e.harness import EVERY, ORCH, REPO, STEPS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

#: Longer than an attempt's start-up (torchrun, imports, rendezvous, data): the watchdog counts
#: silence from the start of an attempt, and start-up alone took ~7 s on a loaded 2-core box.
HANG_TIMEOUT = 20
#: The supervisor's default ORCH_CRASH_LOOP_ATTEMPTS (README, orchestrator/settings.py); the
#: harness environment drops every inherited ORCH_* variable, so the default applies.
CRASH_LOOP_ATTEMPTS = 3
#: A network interface that does not exist: gloo cannot create its device, so every rank fails
#: in init_process_group, before Checkpointer.resume() writes any heartbeat.
NO_SUCH_IFACE = "orchnoif0"


# -- helpers -------------------------------------------------------------------------------


def run_processes(ckpt: Path) -> list[int]:
    """Pids of live processes whose environment has ``ORCH_CHECKPOINT_DIR=<ckpt>``."""
    return find_processes({"ORCH_CHECKPOINT_DIR": os.path.abspath(ckpt)})


def kill_run_processes(ckpt: Path) -> None:
    """Cleanup after a failed test: SIGKILL (works on stopped processes too) what the run left."""
    kill_and_wait(run_processes(ckpt), 10)


def reap(proc: subprocess.Popen[str], ckpt: Path) -> list[int]:
    """Kill what is left of a launch; the run's processes that were still alive before that."""
    harness.kill_group(proc)
    survivors = run_processes(ckpt)
    kill_run_processes(ckpt)
    return survivors


def events(ckpt: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    path = ckpt / "run" / "events.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def named(evs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in evs if e.get("event") == name]


def status_text(ckpt: Path, *extra: str) -> str:
    """``orchestrator status --checkpoint-dir DIR`` (human-readable) output; must exit 0."""
    p = subprocess.run(
        [*ORCH, "status", "--checkpoint-dir", str(ckpt), *extra],
        env=harness.base_env(), cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert p.returncode == 0, f"status failed rc={p.returncode}: {p.stderr}"
    return p.stdout


def parse_table(frame: str) -> dict[str, Any]:
    """One rendered status table -> {key: text value, ..., "nodes": [[rank, phase, age], ...]}."""
    lines = [line for line in frame.splitlines() if line.strip()]
    assert "nodes:" in lines, f"no nodes section in:\n{frame}"
    split = lines.index("nodes:")
    doc: dict[str, Any] = {}
    for line in lines[:split]:
        key, _, value = line.partition(" ")
        doc[key] = value.strip()
    header = lines[split + 1].split()
    assert header == ["node_rank", "phase", "heartbeat_age_s"], lines[split + 1]
    doc["nodes"] = [line.split() for line in lines[split + 2 :]]
    return doc


def frames_of(output: str) -> list[dict[str, Any]]:
    """The frames ``status --watch`` printed (separated by an empty line)."""
    return [parse_table(chunk) for chunk in re.split(r"\n\s*\n", output) if chunk.strip()]


def as_int(text: str) -> int | None:
    return None if text == "-" else int(text)


# -- 1. a rank stopped with SIGSTOP: the watchdog restarts the group -------------------------


def _stop_rank1(ckpt: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Start a paced run under the watchdog; SIGSTOP rank 1 once it passed step 30."""
    proc = harness.start(
        ckpt,
        script_args=("--step-delay", "0.05"),
        extra_launch=("--hang-timeout", str(HANG_TIMEOUT)),
        # The watchdog, not gloo's collective timeout in rank 0, must be what notices the hang.
        env={"ORCH_PG_TIMEOUT_S": "300"},
    )
    try:
        beat: dict[str, Any] = wait_until(
            lambda: (p := harness.progress(ckpt, 1)) and p["step"] >= 30 and p,
            timeout=180,
            what="rank 1 to pass step 30",
        )
        pid = int(beat["pid"])
        assert pid in run_processes(ckpt), f"heartbeat pid {pid} is not a process of this run"
        os.kill(pid, signal.SIGSTOP)
    except BaseException:
        harness.kill_group(proc)
        kill_run_processes(ckpt)
        raise
    return proc, beat


def test_sigstop_rank1_is_detected_by_the_watchdog_and_recovered(
    golden: dict[int, str], ckpt: Path
) -> None:
    proc, beat = _stop_rank1(ckpt)
    first_attempt = int(beat["attempt"])
    try:
        # While it is stopped: the run still says running (same attempt, no restart) and the
        # heartbeat age keeps growing; until the watchdog has killed and relaunched the group.
        hung: list[dict[str, Any]] = []

        def recovered() -> dict[str, Any] | None:
            st = harness.status(ckpt)
            if st["restarts"] >= 1:
                return st
            if st["attempt"] == first_attempt and st["phase"] == "running":
                hung.append(st)
            return None

        after = wait_until(
            recovered, timeout=180, what="the watchdog to restart the hung group", interval=0.2
        )
        assert len(hung) >= 2, f"too few status samples during the hang: {hung}"
        for st in hung:
            assert st["supervisor_alive"] is True and st["restarts"] == 0, st
            assert st["step"] is not None and st["step"] >= beat["step"], st
            assert st["last_failure"] is None, st
            assert st["nodes"][0]["phase"] == "running", st
        ages = [float(st["nodes"][0]["heartbeat_age_s"]) for st in hung]
        assert ages[-1] > ages[0], f"heartbeat age did not grow while rank 1 was stopped: {ages}"
        # The watchdog only fires after HANG_TIMEOUT s of silence; the newest beat never moves
        # after the last pre-hang step, so the age seen just before recovery is past it.
        assert max(ages) > HANG_TIMEOUT, ages

        assert after["attempt"] > first_attempt, after
        assert after["phase"] in ("recovering", "starting", "running", "done"), after
        assert "no heartbeat progress" in (after["last_failure"] or ""), after

        out, err = proc.communicate(timeout=240)
    finally:
        survivors = reap(proc, ckpt)
    # Nothing of the run survives, the stopped rank of the hung attempt included.
    assert survivors == [], f"processes of the run survived the launch: {survivors}"

    result = harness.Result(proc.returncode, out, err, ckpt)
    harness.assert_matches_golden(result, golden)

    st = result.status()
    assert st["phase"] == "done" and st["step"] == STEPS, st
    assert st["restarts"] == 1, st
    assert st["resumed_from_step"] is not None and st["resumed_from_step"] % EVERY == 0, st
    assert st["resumed_from_step"] <= beat["step"] + EVERY, st
    failure = st["last_failure"] or ""
    assert "no heartbeat progress" in failure and f"--hang-timeout {HANG_TIMEOUT}s" in failure, st

    evs = events(ckpt)
    hangs = named(evs, "supervisor.hang_detected")
    assert len(hangs) == 1, hangs
    assert hangs[0]["attempt"] == first_attempt and hangs[0]["silent_s"] > HANG_TIMEOUT, hangs
    # Forensics: every rank's stack was dumped (py-spy) before the kill, named in the event.
    stacks = Path(hangs[0]["stacks_dir"] or "")
    assert stacks == ckpt / "run" / "logs" / f"hang-attempt-{first_attempt}", hangs
    assert sorted(p.name for p in stacks.iterdir()) == ["rank-0.txt", "rank-1.txt"], hangs
    # rank 0 waits in a collective for the stopped rank 1: its stack says where
    assert "Thread" in (stacks / "rank-0.txt").read_text(), hangs[0]["stacks"]
    failed = named(evs, "supervisor.attempt_failed")
    assert [(e["attempt"], e["source"]) for e in failed] == [(first_attempt, "hang")], failed
    assert named(evs, "supervisor.finished"), "no supervisor.finished event"

    # The human-readable table of the finished run says the same.
    table = parse_table(status_text(ckpt))
    assert table["phase"] == "done" and as_int(table["step"]) == STEPS, table
    assert as_int(table["restarts"]) == 1, table
    assert "no heartbeat progress" in table["last_failure"], table


def test_watchdog_kill_of_a_resumed_rank_counts_as_a_hang_not_a_preemption(
    golden: dict[int, str], ckpt: Path
) -> None:
    """Rank 1 is stopped long enough for the watchdog, then continues (a long stall, not death).

    The watchdog's SIGTERM reaches the ranks through torchrun; they stop at the next step
    boundary with an emergency snapshot. That was still a hang detected by the supervisor
    itself: it must count as a failed attempt and a restart, never as a preemption.
    """
    proc, beat = _stop_rank1(ckpt)
    pid, first_attempt = int(beat["pid"]), int(beat["attempt"])
    try:
        wait_until(
            lambda: named(events(ckpt), "supervisor.hang_detected"),
            timeout=180,
            what="the watchdog to detect the hang",
            interval=0.2,
        )
        os.kill(pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=240)
    finally:
        survivors = reap(proc, ckpt)
    assert survivors == [], f"processes of the run survived the launch: {survivors}"
    result = harness.Result(proc.returncode, out, err, ckpt)
    emergency = tuple(s for s in harness.digests(result.snapshots()) if s % EVERY)
    harness.assert_matches_golden(result, golden, off_schedule=emergency)
    evs = events(ckpt)
    assert [e["attempt"] for e in named(evs, "supervisor.hang_detected")] == [first_attempt]

    st = result.status()
    if st["preemptions"] != 0 or named(evs, "supervisor.workers_preempted"):
        raise AssertionError(f"the watchdog's own kill was booked as a preemption: {st}")
    if st["restarts"] != 1 or "no heartbeat progress" not in (st["last_failure"] or ""):
        raise AssertionError(f"the hang is not reported as a failure with a restart: {st}")
    failed = named(evs, "supervisor.attempt_failed")
    assert [(e["attempt"], e["source"]) for e in failed] == [(first_attempt, "hang")], failed


# -- 2. a crash loop without progress gives up early ---------------------------------------


def test_crash_loop_without_progress_gives_up_before_the_budget(ckpt: Path) -> None:
    """Every attempt fails in init_process_group: no heartbeat, no snapshot, so no progress.

    (An ORCH_FAULTS rule cannot produce this: every worker fault point is reached after the
    heartbeat of a step past the resume point, which the supervisor counts as progress.)
    """
    result = harness.launch(
        ckpt, env={"GLOO_SOCKET_IFNAME": NO_SUCH_IFACE}, max_restarts=10, timeout=280
    )
    try:
        assert result.rc == 1, f"rc={result.rc}\n{result.stderr[-4000:]}"
        survivors = run_processes(ckpt)
        assert survivors == [], f"processes of the run survived the launch: {survivors}"
    finally:
        kill_run_processes(ckpt)

    # The root cause (failing rank, its error) is the last thing on stderr.
    cause = re.compile(rf"rank [01]: RuntimeError: .*{NO_SUCH_IFACE}")
    final = [line for line in result.stderr.splitlines() if "orchestrator: run failed:" in line]
    assert final and cause.search(final[-1]), result.stderr[-4000:]

    st = result.status()
    assert st["phase"] == "failed" and st["supervisor_alive"] is False, st
    assert st["last_failure"] is not None and cause.search(st["last_failure"]), st
    assert st["restarts"] == CRASH_LOOP_ATTEMPTS - 1 < 10, st
    assert st["step"] is None and st["newest_local_step"] is None, st
    assert st["nodes"][0]["phase"] == "failed", st

    evs = events(ckpt)
    failed = named(evs, "supervisor.attempt_failed")
    assert len(failed) == CRASH_LOOP_ATTEMPTS, failed
    for e in failed:
        assert e["progressed"] is False and e["fatal"] is False, e
        assert e["failed_rank"] in (0, 1) and NO_SUCH_IFACE in e["root_cause"], e
    gave_up = named(evs, "supervisor.gave_up")
    assert len(gave_up) == 1, gave_up
    assert gave_up[0]["reason"] == "crash_loop", gave_up
    assert gave_up[0]["no_progress_attempts"] == CRASH_LOOP_ATTEMPTS, gave_up
    assert gave_up[0]["root_cause"] == st["last_failure"], (gave_up, st)
    starts = named(evs, "supervisor.attempt_started")
    assert len(starts) == CRASH_LOOP_ATTEMPTS, starts
    assert not named(evs, "supervisor.finished")


# -- 3. status: the table of a live and a finished run, --watch follows a run ---------------


def test_status_table_and_watch_follow_a_run(golden: dict[int, str], ckpt: Path) -> None:
    proc = harness.start(ckpt, script_args=("--step-delay", "0.1"))
    watch: subprocess.Popen[str] | None = None
    try:
        wait_until(
            lambda: (p := harness.progress(ckpt, 0)) and p["step"] >= 5 and p,
            timeout=180,
            what="rank 0 to pass step 5",
        )
        live = parse_table(status_text(ckpt))
        assert live["phase"] == "running" and live["supervisor_alive"] == "True", live
        live_step = as_int(live["step"])
        assert live_step is not None and 5 <= live_step < STEPS, live
        assert live["nodes"] and live["nodes"][0][:2] == ["0", "running"], live

        watch = subprocess.Popen(
            [*ORCH, "status", "--checkpoint-dir", str(ckpt), "--watch"],
            env=harness.base_env(ORCH_WATCH_INTERVAL_S="0.5"), cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"rc={proc.returncode}\n{err[-4000:]}"
        try:
            watch_out, watch_err = watch.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("status --watch did not exit within 60 s after the run ended")
    finally:
        if watch is not None and watch.poll() is None:
            os.killpg(watch.pid, signal.SIGKILL)
            watch.wait(timeout=30)
        harness.kill_group(proc)
    assert watch is not None
    assert watch.returncode == 0, f"status --watch rc={watch.returncode}: {watch_err}"

    frames = frames_of(watch_out)
    assert len(frames) >= 2, f"status --watch printed {len(frames)} frame(s):\n{watch_out}"
    steps = [int(f["step"]) for f in frames]
    assert steps == sorted(steps) and len(set(steps)) >= 2, f"the step never changed: {steps}"
    assert frames[0]["phase"] == "running", frames[0]
    for f in frames[:-1]:
        assert f["phase"] == "running" and f["nodes"][0][:2] == ["0", "running"], f
    last = frames[-1]
    # status checks liveness before reading the state, so the watch's last frame is the final one.
    assert last["phase"] == "done" and as_int(last["step"]) == STEPS, last

    harness.assert_matches_golden(harness.Result(proc.returncode, out, err, ckpt), golden)

    done = parse_table(status_text(ckpt))
    assert done["phase"] == "done" and done["supervisor_alive"] == "False", done
    assert as_int(done["step"]) == STEPS and as_int(done["newest_local_step"]) == STEPS, done
    assert as_int(done["attempt"]) == 0 and as_int(done["restarts"]) == 0, done
    assert done["resumed_from_step"] == "-" and done["last_failure"] == "-", done
    assert len(done["nodes"]) == 1, done
    rank, phase, age = done["nodes"][0]
    assert (rank, phase) == ("0", "done") and float(age) >= 0, done
    # The JSON view agrees with the table.
    st = harness.status(ckpt)
    assert (st["phase"], st["step"], st["restarts"]) == ("done", STEPS, 0), st

    # On a finished run --watch prints one frame and exits at once.
    again = frames_of(status_text(ckpt, "--watch"))
    assert len(again) == 1 and again[0]["phase"] == "done", again
