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
        with h.ours_job(ours_files, workload, max_restarts=len(cases) + 2) as job:
            samples = _series(job, cases, saved=h.ours_saved(ours_files), timeout=timeout,
                              term=lambda: _term_supervisor(job), relaunch_on_term=True)
            outcome["ours"] = (job.wait(timeout), samples)

    try:
        # Nothing here is timed: the golden run (if not known yet) runs beside ours.
        golden = h.golden_digest(config, workload, beside=ours)
        with h.plain_loop_job(plain_files, workload) as job:
            samples = _series(job, cases, saved=h.plain_saved(workload), timeout=timeout,
                              term=lambda: h.signal_torchrun(job, signal.SIGTERM, timeout=timeout),
                              relaunch_on_term=False)
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


def _series(job: h.Job, cases: list[str], *, saved: Callable[[int], int | None], timeout: float,
            term: Callable[[], Callable[[], None]], relaunch_on_term: bool) -> list[h.Interruption]:
    """One SIGTERM or SIGKILL per case, each a fixed number of steps after a durable save."""
    out: list[h.Interruption] = []
    resumed = 0
    for case in cases:
        after = _TERM_AFTER if case == "term" else _KILL_AFTER
        send = term() if case == "term" else h.kill_rank(job, 1, timeout=timeout)
        h.wait_after_save(job, saved, h.next_save(resumed), after, timeout=timeout)
        sample = h.interrupt(job, send, saved_step=saved, relaunch=relaunch_on_term and case == "term",
                             timeout=timeout)
        out.append(sample)
        resumed = sample.resumed_from
    return out


def _term_supervisor(job: h.Job) -> Callable[[], None]:
    proc = job.proc
    if proc is None:
        raise h.BenchRunError("no supervisor to signal")
    return lambda: proc.send_signal(signal.SIGTERM)


def _describe(s: h.Interruption) -> dict[str, int | None]:
    return {"last_step": s.last_step, "saved_step": s.saved_step, "resumed_from": s.resumed_from,
            "lost": s.lost, "exit_code": s.exit_code}


def _listed(samples: list[h.Interruption]) -> str:
    return "/".join(str(s.lost) for s in samples) + " steps"


def _since(samples: list[h.Interruption]) -> str:
    return "/".join(str(s.since_save) for s in samples) + " since the last save"
