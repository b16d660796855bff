"""Leg "lost": completed training steps lost to a preemption (SIGTERM) and to a crash (SIGKILL).

The same two 2-rank DDP runs as leg "resume" (ours: ``orchestrator launch`` with
``trainer.Checkpointer``, a snapshot every 4 steps; baseline: ``until torchrun ... plain.py``,
``torch.save`` every 4 steps). In each run, alternately: a SIGTERM 2 steps after a snapshot
(between snapshots), to our supervisor, which has the ranks take an emergency snapshot at the next
step boundary and exits 75, after which the same command is launched again; to the baseline's
torchrun, which stops its ranks and exits, and the loop relaunches it. Then a SIGKILL of rank 1
3 steps after a snapshot; both launchers relaunch by themselves. Steps lost = the newest step
completed before the signal minus the step the next attempt resumed from (read from the progress
files). Targets, ours: nothing lost to SIGTERM; at most the steps since the last committed
snapshot lost to SIGKILL. The baseline's losses are reported beside them. Both runs must end
bit-identical to an uninterrupted run (final model + optimizer digest; ours also its manifest).

Both runs are paced (``--pace``, :func:`bench.workloads.harness.set_pace`): before each
interruption the harness lets the run go exactly to the step it signals after and holds it there
until that snapshot is durable, so the signal lands after that step whatever the step time. A
SIGTERM to our supervisor takes effect on its next poll (``ORCH_POLL_INTERVAL_S``, 0.2 s) plus a
step boundary: unheld, a run whose steps take 30-70 ms (100M and less on 2 cores) went on 2-8
steps, its emergency snapshot fell on or past the next interval step, each later interruption
moved a whole interval further, and the run (``steps_for``: two intervals per pair of failures
plus three) ended before the last one ("launcher exited 0 while waiting for save 52").
Held, ours gets its next step only once the supervisor's request is on disk, so it stops exactly
one step after the signal; the schedule is fixed (8 steps per SIGTERM + SIGKILL pair) and is
checked against the run's length before each interruption.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from bench import core
from bench.workloads import harness as h

_TERM_AFTER = 2  # SIGTERM this many steps after a snapshot (mid-interval)
_KILL_AFTER = h.EVERY - 1  # SIGKILL as late as possible in the interval


def run(config: core.BenchConfig, size_bytes: int) -> core.LegResult:
    n, workload, result, base, timeout = h.leg_start(config, size_bytes, "lost")
    cases = ["term", "kill"] * n
    outcome: dict[str, tuple[int, list[h.Interruption]]] = {}

    ours_files = h.RunFiles.fresh(os.path.join(base, "ours"))
    plain_files = h.RunFiles.fresh(os.path.join(base, "plain"))

    def ours() -> None:
        with h.ours_job(ours_files, workload, max_restarts=len(cases) + 2, paced=True) as job:
            samples = _series(job, cases, saved=h.ours_saved(ours_files), steps=workload.steps,
                              timeout=timeout, relaunch_on_term=True,
                              term=lambda held_at: _term_supervisor(job, held_at, timeout=timeout))
            h.set_pace(ours_files, workload.steps)
            outcome["ours"] = (job.wait(timeout), samples)

    try:
        # Nothing here is timed: the golden run (if not known yet) runs beside ours.
        golden = h.golden_digest(config, workload, beside=ours)
        with h.plain_loop_job(plain_files, workload, paced=True) as job:
            samples = _series(job, cases, saved=h.plain_saved(workload), steps=workload.steps,
                              timeout=timeout, relaunch_on_term=False,
                              term=lambda _held_at: h.signal_torchrun(job, signal.SIGTERM, timeout=timeout))
            h.set_pace(plain_files, workload.steps)
            outcome["baseline"] = (job.wait(timeout), samples)
    finally:
        ours_files.discard_bulk()
        plain_files.discard_bulk()
    h.gate_final(result, "ours", outcome["ours"][0], ours_files, golden, manifest=True)
    h.gate_final(result, "baseline", outcome["baseline"][0], plain_files, golden, manifest=False)

    for who, (_rc, got) in outcome.items():
        terms = [s for c, s in zip(cases, got, strict=True) if c == "term"]
        kills = [s for c, s in zip(cases, got, strict=True) if c == "kill"]
        result.values[f"{who}_sigterm_lost"] = core.Stat(unit="steps", samples=tuple(float(s.lost) for s in terms))
        result.values[f"{who}_sigkill_lost"] = core.Stat(unit="steps", samples=tuple(float(s.lost) for s in kills))
        result.scalars[f"{who}_sigterm"] = [_describe(s) for s in terms]
        result.scalars[f"{who}_sigkill"] = [_describe(s) for s in kills]
    ours_terms = [s for c, s in zip(cases, outcome["ours"][1], strict=True) if c == "term"]
    ours_kills = [s for c, s in zip(cases, outcome["ours"][1], strict=True) if c == "kill"]
    base_terms = [s for c, s in zip(cases, outcome["baseline"][1], strict=True) if c == "term"]
    base_kills = [s for c, s in zip(cases, outcome["baseline"][1], strict=True) if c == "kill"]
    codes = [s.exit_code for s in ours_terms]
    if any(code != 75 for code in codes):
        result.notes.append(f"ours: the supervisor exited {codes} after SIGTERM, expected 75 (preempted)")
    result.targets.append(core.Target(
        name="sigterm_lost", value=max(float(s.lost) for s in ours_terms) if all(c == 75 for c in codes) else float("inf"),
        bound=0, op="<=",
        meaning="steps lost to SIGTERM of the supervisor mid-interval (emergency snapshot, exit 75, "
                f"relaunch), ours (baseline torchrun + loop lost {_listed(base_terms)})",
    ))
    result.targets.append(core.Target(
        name="sigkill_lost_beyond_snapshot", value=max(float(s.lost - s.since_save) for s in ours_kills),
        bound=0, op="<=",
        meaning=f"steps lost to SIGKILL of rank 1 minus steps since the last committed snapshot, ours "
                f"(lost {_listed(ours_kills)} of {_since(ours_kills)}; baseline lost {_listed(base_kills)} "
                f"of {_since(base_kills)})",
    ))
    result.scalars["steps_total"] = workload.steps
    result.scalars["snapshot_every"] = workload.every
    return result


def _series(job: h.Job, cases: list[str], *, saved: Callable[[int], int | None], steps: int, timeout: float,
            term: Callable[[int], Callable[[], None]], relaunch_on_term: bool) -> list[h.Interruption]:
    """One SIGTERM or SIGKILL per case, each a fixed number of steps after a durable save.

    The (paced) job is let run to exactly that step and held there; ``term(step)`` makes the
    SIGTERM's ``send`` for a job held after ``step``. A kill needs no release: the held ranks die
    (the killed one) or are torn down by torchrun, and the next attempt resumes from the save,
    below the hold. Each interruption needs its signal step and one more (ours stops there), plus
    the resumed attempt's first step, to lie inside the run's ``steps``.
    """
    out: list[h.Interruption] = []
    resumed = 0
    for case in cases:
        after = _TERM_AFTER if case == "term" else _KILL_AFTER
        snapshot = h.next_save(resumed)
        held_at = snapshot + after
        if held_at + 2 > steps:
            raise h.BenchRunError(
                f"the run has {steps} steps, too few for a {case} {after} steps after save {snapshot} "
                f"(interruption {len(out) + 1} of {len(cases)}; resumed from {resumed})")
        h.set_pace(job.files, held_at)
        send = term(held_at) if case == "term" else h.kill_rank(job, 1, timeout=timeout)
        h.wait_after_save(job, saved, snapshot, after, timeout=timeout)
        sample = h.interrupt(job, send, saved_step=saved, relaunch=relaunch_on_term and case == "term",
                             timeout=timeout)
        if sample.last_step != held_at:
            raise h.BenchRunError(f"held at step {held_at}, but step {sample.last_step} was the last "
                                  f"before the {case}")
        out.append(sample)
        resumed = sample.resumed_from
    return out


def _term_supervisor(job: h.Job, held_at: int, *, timeout: float) -> Callable[[], None]:
    """SIGTERM our supervisor; release the ranks held after ``held_at`` once it asked them to stop.

    The ranks look for the supervisor's request at every step boundary, so they take one more
    step (``held_at + 1``) and stop there with the emergency snapshot; the hold then moves one
    further for the relaunched attempt's first step.
    """
    proc = job.proc
    if proc is None:
        raise h.BenchRunError("no supervisor to signal")

    def send() -> None:
        proc.send_signal(signal.SIGTERM)
        h.wait_until(lambda: h.preempt_requested(job.files), timeout=timeout,
                     what="the supervisor's preemption request", job=job)
        h.set_pace(job.files, held_at + 2)

    return send


def _describe(s: h.Interruption) -> dict[str, int | None]:
    return {"last_step": s.last_step, "saved_step": s.saved_step, "resumed_from": s.resumed_from,
            "lost": s.lost, "exit_code": s.exit_code}


def _listed(samples: list[h.Interruption]) -> str:
    return "/".join(str(s.lost) for s in samples) + " steps"


def _since(samples: list[h.Interruption]) -> str:
    return "/".join(str(s.since_save) for s in samples) + " since the last save"
