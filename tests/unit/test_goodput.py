"""Goodput accounting (orchestrator.goodput) over synthetic event lists."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from contract.documents import JournalEntry, JournalStart
from orchestrator import goodput as g
from orchestrator.clock import Clock
from orchestrator.status import render_status, status_document

pytestmark = pytest.mark.timeout(60)

RUN = "run-000000000001"


def ev(t: float, name: str, **fields: Any) -> dict[str, Any]:
    return {"time": t, "event": name, "run_id": RUN, **fields}


def started(t: float, first: int = 0) -> dict[str, Any]:
    return ev(t, "supervisor.started", first_attempt=first)


def attempt(n: int, t: float, resume: int | None) -> dict[str, Any]:
    return ev(t, "supervisor.attempt_started", attempt=n, resume_step=resume)


def first_step(n: int, t: float, step: int, resume: int | None, step_time: float) -> dict[str, Any]:
    return ev(t, "supervisor.progress_resumed", attempt=n, step=step, resume_step=resume,
              step_time=step_time)


def ended(n: int, t: float, code: int, step: int | None, resume: int | None,
          beat: float | None) -> dict[str, Any]:
    return ev(t, "supervisor.attempt_ended", attempt=n, exit_code=code, step=step,
              resume_step=resume, last_heartbeat_at=beat)


#: Step interval of every synthetic run: 0.1 s per step.
DT = 0.1


def clean_run() -> list[dict[str, Any]]:
    """One launch, no incident: start at 0, step 1 at 3.0, step 100 at 12.9, finished at 13.5."""
    return [
        started(0.0),
        attempt(0, 0.5, None),
        first_step(0, 3.2, 1, None, 3.0),
        ended(0, 13.5, 0, 100, None, 12.9),
        ev(13.5, "supervisor.finished", attempt=0, step=100),
    ]


def crash_run() -> list[dict[str, Any]]:
    """Attempt 0 crashes after its heartbeat at step 50 (t=7.9); attempt 1 resumes from 40."""
    return [
        started(0.0),
        attempt(0, 0.5, None),
        first_step(0, 3.2, 1, None, 3.0),
        ended(0, 9.0, 1, 50, None, 7.9),
        ev(9.0, "supervisor.attempt_failed", attempt=0, exit_code=1, root_cause="rank 1 SIGKILL"),
        ev(9.0, "supervisor.backoff", attempt=0, delay_s=0.5),
        attempt(1, 9.6, 40),
        first_step(1, 13.1, 41, 40, 13.0),
        ended(1, 19.5, 0, 100, 40, 18.9),
        ev(19.5, "supervisor.finished", attempt=1, step=100),
    ]


def test_no_events_no_goodput() -> None:
    assert g.goodput([]) is None
    assert g.incidents([]) == []
    assert g.to_json(g.summarize([]))["goodput"] is None


def test_step_interval_is_measured_within_attempts() -> None:
    interval = g.step_interval(crash_run())
    assert interval == pytest.approx(DT)


def test_no_incident_goodput_is_steps_over_wall_time() -> None:
    s = g.summarize(clean_run())
    assert s.incidents == []
    assert s.wall_s == pytest.approx(13.5)
    # Start-up to the first step, less that step's own interval; shutdown after the last beat.
    assert s.startup_s == pytest.approx(3.0 - DT)
    assert s.shutdown_s == pytest.approx(0.6)
    assert s.goodput == pytest.approx((13.5 - 2.9 - 0.6) / 13.5)
    assert s.goodput is not None and 0 < s.goodput <= 1


def test_crash_parts() -> None:
    (inc,) = g.incidents(crash_run())
    assert inc.kind == "crash" and inc.attempt == 0 and inc.next_attempt == 1
    assert inc.cause == "rank 1 SIGKILL" and inc.exit_code == 1 and inc.recovered
    assert inc.detect_s == pytest.approx(9.0 - 7.9)
    assert inc.teardown_s is None  # a crash's teardown is inside detect
    assert inc.restart_s == pytest.approx(0.6)
    # No journal: first step time less the one step it took.
    assert inc.startup_load_s == pytest.approx(13.0 - 9.6 - DT)
    assert inc.step == 50 and inc.resume_step == 40 and inc.steps_replayed == 10
    assert inc.replay_s == pytest.approx(10 * DT)
    assert inc.lost_s == pytest.approx(1.1 + 0.6 + 3.3 + 1.0)
    s = g.summarize(crash_run())
    assert s.goodput == pytest.approx((19.5 - inc.lost_s - s.startup_s - s.shutdown_s) / 19.5)


def test_journal_sharpens_last_step_and_load_time() -> None:
    journal = g.journal_sessions([
        JournalStart(run_id=RUN, attempt=0, rank=0, resumed_from=0, time=2.9),
        *(JournalEntry(step=s, attempt=0, fp={}) for s in range(1, 56)),
        JournalStart(run_id=RUN, attempt=1, rank=0, resumed_from=40, time=12.5),
        *(JournalEntry(step=s, attempt=1, fp={}) for s in range(41, 101)),
    ])
    assert journal[0].last_step == 55 and journal[1].started_at == 12.5
    (inc,) = g.incidents(crash_run(), journal=journal)
    # Steps 51..55 ran after the last heartbeat: the failure was seen 0.5 s after step 55.
    assert inc.step == 55 and inc.steps_replayed == 15
    assert inc.detect_s == pytest.approx(9.0 - (7.9 + 5 * DT))
    assert inc.startup_load_s == pytest.approx(12.5 - 9.6)
    assert inc.replay_s == pytest.approx(15 * DT)


def test_hang_separates_teardown() -> None:
    events = crash_run()
    events.insert(3, ev(8.5, "supervisor.hang_detected", attempt=0, silent_s=0.6))
    (inc,) = g.incidents(events)
    assert inc.kind == "hang"
    assert inc.detect_s == pytest.approx(8.5 - 7.9)
    assert inc.teardown_s == pytest.approx(9.0 - 8.5)


def preempted_between_launches() -> list[dict[str, Any]]:
    """Launch 1 is preempted at step 60 (emergency snapshot), exits 75 at 8.0; 100 s later a
    second launch resumes from 60."""
    return [
        started(0.0),
        attempt(0, 0.5, None),
        first_step(0, 3.2, 1, None, 3.0),
        ev(8.0, "supervisor.preempt_requested", attempt=0, step=50, signal="SIGTERM"),
        ev(9.5, "supervisor.preempted", attempt=0, snapshot_step=60, exit_code=1,
           signal="SIGTERM"),
        ev(10.0, "mirror.flushed", newest_remote_step=60),
        started(110.0, first=1),
        attempt(1, 110.4, 60),
        first_step(1, 113.1, 61, 60, 113.0),
        ended(1, 117.5, 0, 100, 60, 116.9),
        ev(117.5, "supervisor.finished", attempt=1, step=100),
    ]


def test_preemption_between_launches_is_not_counted() -> None:
    s = g.summarize(preempted_between_launches())
    (inc,) = s.incidents
    assert inc.kind == "preemption" and inc.step == 60 and inc.resume_step == 60
    assert inc.steps_replayed == 0 and inc.replay_s == 0
    assert inc.detect_s == 0
    # From the last step (50 complete at the request, + 10 steps) to the preempted event.
    assert inc.teardown_s == pytest.approx(9.5 - (8.0 + 10 * DT))
    # Rest of launch 1 (flush) + launch 2's time to its first attempt.
    assert inc.restart_s == pytest.approx(0.5 + 0.4)
    assert inc.downtime_between_launches_s == pytest.approx(100.0)
    assert s.downtime_between_launches_s == pytest.approx(100.0)
    assert s.launches == 2
    assert s.wall_s == pytest.approx(10.0 + 7.5)
    assert s.goodput is not None and 0.3 < s.goodput < 1


def test_running_run_counts_up_to_now() -> None:
    events = clean_run()[:3]  # attempt 0 running, no end yet
    s = g.summarize(events, now=20.0)
    assert s.incidents == [] and s.wall_s == pytest.approx(20.0)
    assert g.summarize(events).wall_s == pytest.approx(3.2)  # not alive: to the last event


def test_recovery_in_progress_is_costed_to_now() -> None:
    events = crash_run()[:6]  # attempt 0 failed, backoff under way
    (inc,) = g.incidents(events, now=10.0)
    assert inc.next_attempt is None and not inc.recovered
    assert inc.restart_s == pytest.approx(1.0)
    (dead,) = g.incidents(events)  # the supervisor is gone: nothing after its last event
    assert dead.restart_s is None


def test_attempt_without_progress_loses_all_of_it() -> None:
    events = [
        started(0.0),
        attempt(0, 0.5, 40),
        ended(0, 4.5, 1, None, 40, None),
        ev(4.5, "supervisor.attempt_failed", attempt=0, root_cause="ImportError"),
        attempt(1, 5.0, 40),
        first_step(1, 8.1, 41, 40, 8.0),
        ended(1, 14.5, 0, 100, 40, 13.9),
        ev(14.5, "supervisor.finished", attempt=1, step=100),
    ]
    (inc,) = g.incidents(events)
    assert inc.detect_s == pytest.approx(4.0) and inc.steps_replayed == 0


def test_lost_supervisor_then_relaunch() -> None:
    events = [
        *clean_run()[:3],
        ev(6.0, "retention.deleted", steps=[10], tier="local"),  # then SIGKILL, no end event
        started(50.0, first=1),
        attempt(1, 50.5, 20),
        first_step(1, 53.1, 21, 20, 53.0),
        ended(1, 61.5, 0, 100, 20, 60.9),
        ev(61.5, "supervisor.finished", attempt=1, step=100),
    ]
    (inc,) = g.incidents(events)
    assert inc.kind == "lost" and inc.downtime_between_launches_s == pytest.approx(44.0)


def test_several_incidents_and_json_form() -> None:
    events = [
        *crash_run()[:-2],
        ended(1, 16.0, 1, 70, 40, 15.9),
        ev(16.0, "supervisor.attempt_failed", attempt=1, root_cause="again"),
        attempt(2, 16.5, 60),
        first_step(2, 20.1, 61, 60, 20.0),
        ended(2, 24.5, 0, 100, 60, 23.9),
        ev(24.5, "supervisor.finished", attempt=2, step=100),
    ]
    doc = g.to_json(g.summarize(events))
    assert [i["attempt"] for i in doc["incidents"]] == [0, 1]
    assert doc["incidents"][1]["steps_replayed"] == 10
    for inc in doc["incidents"]:
        for key in ("detect_s", "restart_s", "startup_load_s", "steps_replayed", "replay_s",
                    "lost_s"):
            assert isinstance(inc[key], (int, float)) and inc[key] >= 0, (key, inc)
    assert 0 < doc["goodput"] <= 1
    json.dumps(doc)  # plain JSON
    assert set(doc["goodput_detail"]) >= {"wall_s", "productive_s", "lost_s", "launches"}


def test_junk_events_are_ignored() -> None:
    events: list[dict[str, Any]] = [
        ev(-5.0, "supervisor.attempt_started", attempt=9),  # before any launch
        {"event": "supervisor.started"},  # no time
        *crash_run(),
        ev(30.0, "supervisor.attempt_ended", attempt="x", exit_code=1),
        {"time": "soon", "event": "noise"},
    ]
    assert len(g.incidents(events)) == 1


def test_already_done_relaunch_does_not_stretch_wall_time() -> None:
    events = [*clean_run(), ev(1000.0, "supervisor.already_done", step=100)]
    assert g.summarize(events).wall_s == pytest.approx(13.5)


def test_render_line() -> None:
    doc = g.to_json(g.summarize(crash_run()))
    line = g.render_line(doc)
    assert line.endswith("s)") and "1 incident," in line and "%" in line
    assert g.render_line({"goodput": None}).startswith("-")


class _FixedClock(Clock):
    def time(self) -> float:
        return 100.0

    def monotonic(self) -> float:
        return 100.0

    def sleep(self, seconds: float) -> None:
        pass


def test_status_document_has_goodput_and_incidents(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text(json.dumps({
        "run_id": RUN, "phase": "done", "attempt": 1, "restarts": 1, "preemptions": 0,
        "nodes": [{"node_rank": 0, "heartbeat_age_s": 1.0, "phase": "done"}],
    }))
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in crash_run()))
    doc = status_document(str(tmp_path), clock=_FixedClock())
    assert 0 < doc["goodput"] <= 1
    assert len(doc["incidents"]) == 1 and doc["incidents"][0]["kind"] == "crash"
    assert "goodput" in render_status(doc)
