"""The restart policy, table-driven: one row per rule of orchestrator.policy.decide."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from orchestrator.failures import Failure
from orchestrator.policy import (
    Action,
    AttemptResult,
    Counters,
    Decision,
    Limits,
    announce,
    decide,
)

pytestmark = pytest.mark.timeout(30)

LIMITS = Limits(max_restarts=3, crash_loop_attempts=3, rdzv_closed_retries=2)
CRASH = Failure(summary="rank 1: RuntimeError: boom", fatal=False, source="error_file", rank=1)
FATAL = Failure(summary="rank 0: ConfigMismatch: lr", fatal=True, source="error_file", rank=0)
CLOSED = Failure(summary="RendezvousClosedError", fatal=False, source="rendezvous_closed")
HANG = Failure(summary="no heartbeat progress for 9s", fatal=False, source="hang")
NO_MODULE = Failure(summary="rank 0: ModuleNotFoundError: No module named 'sklearn'",
                    fatal=False, source="error_file", rank=0, error_type="ModuleNotFoundError")
SYNTAX = Failure(summary="rank 0 exited with code 1: SyntaxError: invalid syntax", fatal=False,
                 source="torchrun", rank=0, exit_code=1, error_type="SyntaxError")
IMPORT = Failure(summary="rank 1: ImportError: cannot import name 'x'", fatal=False,
                 source="error_file", rank=1, error_type="ImportError")
INDENT = Failure(summary="rank 0: IndentationError: unexpected indent", fatal=False,
                 source="error_file", rank=0, error_type="IndentationError")


def failed(failure: Failure = CRASH, *, progressed: bool = False, **kw: bool) -> AttemptResult:
    return AttemptResult(exit_code=1, failure=failure, progressed=progressed, **kw)


@dataclass(frozen=True)
class Row:
    name: str
    result: AttemptResult
    action: Action
    reason: str
    counters: Counters = field(default_factory=Counters)
    after: Counters | None = None
    backoff_failures: int = 0
    counts_restart: bool = False
    verify_next: bool = False


ROWS = [
    Row("exit 0 finishes", AttemptResult(exit_code=0, progressed=True), Action.FINISH, "finished"),
    Row("exit 0 finishes even in a streak", AttemptResult(exit_code=0, progressed=False),
        Action.FINISH, "finished", Counters(restarts=3, no_progress_streak=2),
        Counters(restarts=3, no_progress_streak=2)),
    Row("an acked emergency snapshot relaunches at once, no restart",
        AttemptResult(exit_code=75, progressed=True, acked_step=40), Action.RELAUNCH_NOW,
        "workers_preempted", Counters(restarts=3), Counters(restarts=3)),
    Row("a failure after progress relaunches at once and spends a restart",
        failed(progressed=True), Action.RECOVER, "failure", Counters(failure_streak=4),
        Counters(failure_streak=1), backoff_failures=0, counts_restart=True),
    Row("failures without progress back off exponentially",
        failed(progressed=False), Action.RECOVER, "failure", Counters(failure_streak=1),
        Counters(no_progress_streak=1, failure_streak=2), backoff_failures=2,
        counts_restart=True),
    Row("a hang is a failure like any other", failed(HANG, progressed=True), Action.RECOVER,
        "failure", after=Counters(failure_streak=1), counts_restart=True),
    Row("fatal gives up at once", failed(FATAL, progressed=True), Action.GIVE_UP, "fatal",
        after=Counters(failure_streak=1)),
    Row("the restart budget", failed(progressed=True), Action.GIVE_UP, "restart_budget_spent",
        Counters(restarts=3), Counters(restarts=3, failure_streak=1)),
    Row("a crash loop gives up early", failed(progressed=False), Action.GIVE_UP, "crash_loop",
        Counters(no_progress_streak=2, failure_streak=2),
        Counters(no_progress_streak=3, failure_streak=3)),
    Row("progress breaks a crash loop", failed(progressed=True), Action.RECOVER, "failure",
        Counters(no_progress_streak=2, failure_streak=2), Counters(failure_streak=1),
        counts_restart=True),
    Row("a closed rendezvous rejoins without spending anything", failed(CLOSED), Action.RECOVER,
        "rendezvous_closed", Counters(rdzv_closed_streak=1, no_progress_streak=2),
        Counters(rdzv_closed_streak=2, no_progress_streak=2), backoff_failures=2),
    Row("closed rendezvous retries run out: an ordinary failure", failed(CLOSED), Action.RECOVER,
        "failure", Counters(rdzv_closed_streak=2),
        Counters(rdzv_closed_streak=2, no_progress_streak=1, failure_streak=1),
        backoff_failures=1, counts_restart=True),
    Row("another failure resets the closed-rendezvous streak", failed(progressed=True),
        Action.RECOVER, "failure", Counters(rdzv_closed_streak=2), Counters(failure_streak=1),
        counts_restart=True),
    Row("damage in an unverified resume point: relaunch at once, verify, no restart",
        failed(reported_corrupt=True, resume_verified=False), Action.RECOVER, "resume_corrupt",
        Counters(restarts=3, no_progress_streak=2, rdzv_closed_streak=1),
        Counters(restarts=3, no_progress_streak=2), verify_next=True),
    Row("damage in a verified resume point is an ordinary failure (no endless loop)",
        failed(reported_corrupt=True, resume_verified=True), Action.RECOVER, "failure",
        after=Counters(no_progress_streak=1, failure_streak=1), backoff_failures=1,
        counts_restart=True, verify_next=True),
    Row("a corrupt report after progress is not about the resume point",
        failed(progressed=True, reported_corrupt=True), Action.RECOVER, "failure",
        after=Counters(failure_streak=1), counts_restart=True),
    Row("damage with the budget spent still gets its free relaunch when unverified",
        failed(reported_corrupt=True), Action.RECOVER, "resume_corrupt", Counters(restarts=3),
        Counters(restarts=3), verify_next=True),
    Row("a missing module at start-up gives up at once, budget left",
        failed(NO_MODULE), Action.GIVE_UP, "fatal",
        after=Counters(no_progress_streak=1, failure_streak=1)),
    Row("a syntax error at start-up (no error file: torchrun's log) gives up at once",
        failed(SYNTAX), Action.GIVE_UP, "fatal",
        after=Counters(no_progress_streak=1, failure_streak=1)),
    Row("an ImportError at start-up of a relaunch gives up too",
        failed(IMPORT), Action.GIVE_UP, "fatal", Counters(restarts=1, failure_streak=1),
        Counters(restarts=1, no_progress_streak=1, failure_streak=2)),
    Row("SyntaxError's subclasses count (IndentationError)", failed(INDENT), Action.GIVE_UP,
        "fatal", after=Counters(no_progress_streak=1, failure_streak=1)),
    Row("an ImportError after progress (a lazy import) is an ordinary failure",
        failed(IMPORT, progressed=True), Action.RECOVER, "failure",
        after=Counters(failure_streak=1), counts_restart=True),
    Row("a ModuleNotFoundError after progress spends restarts like any failure",
        failed(NO_MODULE, progressed=True), Action.GIVE_UP, "restart_budget_spent",
        Counters(restarts=3), Counters(restarts=3, failure_streak=1)),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_decide(row: Row) -> None:
    d = decide(row.result, row.counters, LIMITS)
    assert (d.action, d.reason) == (row.action, row.reason)
    assert d.counters == (row.after if row.after is not None else row.counters)
    assert d.backoff_failures == row.backoff_failures
    assert d.counts_restart is row.counts_restart
    assert d.verify_next is row.verify_next


def test_a_failure_needs_its_cause() -> None:
    with pytest.raises(ValueError, match="needs its failure"):
        decide(AttemptResult(exit_code=1, progressed=False), Counters(), LIMITS)


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"max_restarts": -1}, "max_restarts"), ({"crash_loop_attempts": 0}, "crash_loop"),
     ({"rdzv_closed_retries": -1}, "rdzv_closed_retries")],
)
def test_limits_are_validated(kw: dict[str, int], message: str) -> None:
    args = {"max_restarts": 1, "crash_loop_attempts": 1, "rdzv_closed_retries": 0, **kw}
    with pytest.raises(ValueError, match=message):
        Limits(**args)


def _names(decision: Decision, result: AttemptResult) -> list[str]:
    events = announce(decision, result, attempt=2, step=30, resume_step=20, delay_s=1.23456,
                      max_restarts=3)
    return [name for name, _ in events]


@pytest.mark.parametrize(
    ("row", "names"),
    [
        (ROWS[0], ["supervisor.finished"]),
        (ROWS[2], ["supervisor.workers_preempted"]),
        (ROWS[3], ["supervisor.attempt_failed", "supervisor.backoff"]),
        (ROWS[6], ["supervisor.attempt_failed"]),
        (ROWS[10], ["supervisor.rendezvous_closed"]),
        (ROWS[13], ["supervisor.resume_corrupt"]),
        (ROWS[14], ["supervisor.resume_corrupt", "supervisor.attempt_failed",
                    "supervisor.backoff"]),
    ],
    ids=lambda x: x.name if isinstance(x, Row) else "",
)
def test_announced_events(row: Row, names: list[str]) -> None:
    decision = decide(row.result, row.counters, LIMITS)
    assert _names(decision, row.result) == names


def test_backoff_event_counts_the_restart_it_will_spend() -> None:
    result = failed(progressed=False)
    decision = decide(result, Counters(restarts=1), LIMITS)
    events = dict(announce(decision, result, attempt=2, step=None, resume_step=None,
                           delay_s=1.23456, max_restarts=3))
    assert events["supervisor.backoff"] == {
        "attempt": 2, "delay_s": 1.235, "restarts": 2, "max_restarts": 3,
    }
    assert events["supervisor.attempt_failed"]["root_cause"] == CRASH.summary
    assert decision.is_failure


@pytest.mark.parametrize(("progressed", "fatal"), [(False, True), (True, False)])
def test_a_start_up_error_is_announced_fatal_only_without_progress(
    progressed: bool, fatal: bool
) -> None:
    result = failed(NO_MODULE, progressed=progressed)
    decision = decide(result, Counters(), LIMITS)
    events = dict(announce(decision, result, attempt=0, step=None, resume_step=None,
                           delay_s=0.0, max_restarts=3))
    assert events["supervisor.attempt_failed"]["fatal"] is fatal
    assert events["supervisor.attempt_failed"]["root_cause"] == NO_MODULE.summary
