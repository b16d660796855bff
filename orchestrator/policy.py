"""The restart policy as a pure function: what to do after an attempt ended.

:func:`decide` takes what the supervisor learned about the attempt (exit status, whether it made
progress, the diagnosed failure, an emergency-snapshot acknowledgement, a damaged resume point),
the run's counters and the policy's limits, and returns a :class:`Decision`: finish, relaunch at
once, recover (relaunch after a backoff, spending a restart or not) or give up. It reads no
clock, file or process and emits no event, so every rule is a row in a table-driven test; the
supervisor carries the decision out (events, phases, and the jittered delay of
:class:`Backoff`, the one part with randomness).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from tenacity import RetryCallState, Retrying, wait_exponential_jitter

from orchestrator.failures import Failure


class Action(str, Enum):
    """What the supervisor does next."""

    #: The workers finished (exit 0): phase ``done``.
    FINISH = "finish"
    #: The ranks stopped for a preemption signalled to them directly, after a committed
    #: emergency snapshot: the next attempt starts now, spending no restart.
    RELAUNCH_NOW = "relaunch_now"
    #: Phase ``recovering``: back off, then start the next attempt.
    RECOVER = "recover"
    #: Phase ``failed``.
    GIVE_UP = "give_up"


@dataclass(frozen=True, kw_only=True)
class Limits:
    """The policy's bounds (``--max-restarts`` and two tunables)."""

    max_restarts: int
    crash_loop_attempts: int
    rdzv_closed_retries: int

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.crash_loop_attempts < 1:
            raise ValueError(f"crash_loop_attempts must be >= 1, got {self.crash_loop_attempts}")
        if self.rdzv_closed_retries < 0:
            raise ValueError(f"rdzv_closed_retries must be >= 0, got {self.rdzv_closed_retries}")


@dataclass(frozen=True, kw_only=True)
class Counters:
    """What the policy remembers across attempts."""

    #: Relaunches that spent a restart (``status``'s ``restarts``).
    restarts: int = 0
    #: Consecutive failed attempts that made no progress (crash-loop detection).
    no_progress_streak: int = 0
    #: Consecutive failures, for the backoff's exponent (1 after an attempt that progressed).
    failure_streak: int = 0
    #: Consecutive relaunches after a closed rendezvous (multi-node).
    rdzv_closed_streak: int = 0


@dataclass(frozen=True, kw_only=True)
class AttemptResult:
    """What the supervisor learned about an attempt that ended."""

    exit_code: int
    #: A step past the resume point completed (heartbeat or snapshot).
    progressed: bool
    #: The step of a committed emergency snapshot acknowledged for this attempt (never set for
    #: an attempt the watchdog killed: that is a hang, whatever the ranks did on the way out).
    acked_step: int | None = None
    #: The diagnosed root cause; None only with exit code 0 or an acknowledgement.
    failure: Failure | None = None
    #: The ranks reported the snapshot they were loading as damaged (``CorruptSnapshot``).
    reported_corrupt: bool = False
    #: The attempt's resume point was checksum-verified by the supervisor before launch.
    resume_verified: bool = False


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What to do, with the counters as they are after this attempt."""

    action: Action
    counters: Counters
    #: Why (events name it): ``finished``, ``workers_preempted``, ``rendezvous_closed``,
    #: ``resume_corrupt``, ``failure``; for GIVE_UP ``fatal``, ``restart_budget_spent`` or
    #: ``crash_loop``.
    reason: str
    #: RECOVER: the backoff's exponent (``Backoff.delay(n)``); 0 relaunches without delay.
    backoff_failures: int = 0
    #: RECOVER: whether the relaunch after the backoff spends a restart.
    counts_restart: bool = False
    #: The next selection must checksum every candidate (the ranks found damage).
    verify_next: bool = False
    #: The ranks found the resume point damaged (``supervisor.resume_corrupt``).
    resume_corrupt: bool = False

    @property
    def is_failure(self) -> bool:
        """The attempt failed in a way that becomes the run's ``last_failure``."""
        return self.action is Action.GIVE_UP or self.reason == "failure"


class Backoff:
    """Restart delays: exponential from ``initial_s`` to ``max_s`` plus uniform jitter (tenacity)."""

    def __init__(self, *, initial_s: float, max_s: float, jitter_s: float) -> None:
        self._wait = wait_exponential_jitter(multiplier=initial_s, max=max_s, jitter=jitter_s)
        self._retrying = Retrying()

    def delay(self, failures: int) -> float:
        """Delay before the relaunch following the ``failures``-th consecutive failure (>= 1)."""
        state = RetryCallState(retry_object=self._retrying, fn=None, args=(), kwargs={})
        state.attempt_number = max(1, failures)
        return float(self._wait(state))


def decide(result: AttemptResult, counters: Counters, limits: Limits) -> Decision:
    """The restart policy; see the module docstring. Rules, in order:

    1. Exit 0 finishes the run.
    2. An acknowledged emergency snapshot relaunches at once: a preemption is never a restart.
    3. Multi-node, no worker ran because another node is still tearing the previous rendezvous
       down: rejoin after a short backoff, spending neither a restart nor crash-loop credit, at
       most ``rdzv_closed_retries`` times in a row (then it counts as a failure).
    4. The ranks found the resume point damaged while loading, before any progress: the next
       selection checksums everything (removing it). If the supervisor had not verified that
       point itself, that is the selection's cost, not the job's: relaunch at once, no restart.
       If it had, the damage is an ordinary failure (no endless loop).
    5. A failure: give up if fatal (an import or syntax error in an attempt that made no
       progress counts as fatal: the script cannot start, see :func:`is_fatal`), if the restart
       budget is spent, or after
       ``crash_loop_attempts`` failed attempts in a row without progress; otherwise relaunch,
       at once after an attempt that made progress, else after an exponential backoff.
    """
    if result.exit_code == 0:
        return Decision(action=Action.FINISH, counters=counters, reason="finished")
    if result.acked_step is not None:
        return Decision(action=Action.RELAUNCH_NOW, counters=counters, reason="workers_preempted")
    failure = result.failure
    if failure is None:
        raise ValueError("a failed attempt without an acknowledgement needs its failure")
    if failure.source == "rendezvous_closed":
        if counters.rdzv_closed_streak < limits.rdzv_closed_retries:
            after = replace(counters, rdzv_closed_streak=counters.rdzv_closed_streak + 1)
            return Decision(
                action=Action.RECOVER,
                counters=after,
                reason="rendezvous_closed",
                backoff_failures=after.rdzv_closed_streak,
            )
    else:
        counters = replace(counters, rdzv_closed_streak=0)
    corrupt = not result.progressed and result.reported_corrupt
    if corrupt and not result.resume_verified:
        return Decision(
            action=Action.RECOVER,
            counters=counters,
            reason="resume_corrupt",
            verify_next=True,
            resume_corrupt=True,
        )
    progressed = result.progressed
    counters = replace(
        counters,
        no_progress_streak=0 if progressed else counters.no_progress_streak + 1,
        failure_streak=1 if progressed else counters.failure_streak + 1,
    )

    def failed(action: Action, reason: str, backoff_failures: int = 0) -> Decision:
        return Decision(
            action=action,
            counters=counters,
            reason=reason,
            backoff_failures=backoff_failures,
            counts_restart=action is Action.RECOVER,
            verify_next=corrupt,
            resume_corrupt=corrupt,
        )

    if is_fatal(result):
        return failed(Action.GIVE_UP, "fatal")
    if counters.restarts >= limits.max_restarts:
        return failed(Action.GIVE_UP, "restart_budget_spent")
    if counters.no_progress_streak >= limits.crash_loop_attempts:
        return failed(Action.GIVE_UP, "crash_loop")
    # An attempt that made progress is no crash loop: relaunch at once (a second on the clock
    # of every preempted or crashed run otherwise). Repeated failures back off exponentially.
    return failed(Action.RECOVER, "failure", 0 if progressed else counters.failure_streak)


def is_fatal(result: AttemptResult) -> bool:
    """Whether relaunching cannot help: the failure says so, or the script failed to start
    (``ImportError``/``ModuleNotFoundError``/``SyntaxError`` before any progress). A start-up
    error after progress (a lazy import deep in training) is an ordinary failure."""
    failure = result.failure
    if failure is None:
        return False
    return failure.fatal or (failure.startup_error and not result.progressed)


def announce(
    decision: Decision,
    result: AttemptResult,
    *,
    attempt: int,
    step: int | None,
    resume_step: int | None,
    delay_s: float,
    max_restarts: int,
) -> list[tuple[str, dict[str, Any]]]:
    """The events (names are API) a decision implies, in order; ``supervisor.gave_up`` aside
    (giving up has other causes too). ``delay_s``: the backoff the supervisor drew."""
    if decision.action is Action.FINISH:
        return [("supervisor.finished", {"attempt": attempt, "step": step})]
    if decision.action is Action.RELAUNCH_NOW:
        return [(
            "supervisor.workers_preempted",
            {"attempt": attempt, "step": result.acked_step, "exit_code": result.exit_code},
        )]
    failure = result.failure
    if failure is None:
        raise ValueError("a failure decision needs its failure")
    if decision.reason == "rendezvous_closed":
        fields = {"retry": decision.counters.rdzv_closed_streak, "delay_s": round(delay_s, 3)}
        return [("supervisor.rendezvous_closed", {"attempt": attempt, **fields})]
    out: list[tuple[str, dict[str, Any]]] = []
    if decision.resume_corrupt:
        out.append((
            "supervisor.resume_corrupt",
            {"attempt": attempt, "step": resume_step, "root_cause": failure.summary},
        ))
    if decision.reason == "resume_corrupt":
        return out
    out.append((
        "supervisor.attempt_failed",
        {
            "attempt": attempt,
            "exit_code": result.exit_code,
            "root_cause": failure.summary,
            "source": failure.source,
            "failed_rank": failure.rank,
            "fatal": is_fatal(result),
            "progressed": result.progressed,
        },
    ))
    if decision.action is Action.RECOVER:
        out.append((
            "supervisor.backoff",
            {
                "attempt": attempt,
                "delay_s": round(delay_s, 3),
                "restarts": decision.counters.restarts + 1,
                "max_restarts": max_restarts,
            },
        ))
    return out
