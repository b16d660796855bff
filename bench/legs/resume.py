"""Leg "resume": time from a worker's SIGKILL to the first training step completed after the resume.

Three 2-rank DDP runs on CPU (gloo) of the same model, data and state size, side by side but
measured in turns (the others frozen with SIGSTOP meanwhile, the order reversed every round; in
pairs or one at a time when their memory would not fit): ``ours_spare`` is ``orchestrator launch
--warm-spare`` and ``ours`` plain ``orchestrator launch``, both running ``bench/workloads/ours.py``
(``trainer.Checkpointer``, a snapshot every 4 steps, default supervisor settings except a 900 s
collective timeout, so that a frozen run cannot time out: a SIGKILL is detected by the survivors'
reads failing at once, never by that timeout); the baseline is the loop a user writes around plain
``torchrun`` (``until torchrun ... plain.py; do :; done``: ``torch.save`` + fsync every 4 steps,
``torch.load`` on start). In each run rank 1 is SIGKILLed ``repeats`` times (quick: once) with a
warm and as many times with a cold page cache (the snapshot files evicted with
``bench.core.drop_page_cache`` right after the kill), alternating, every kill 2 steps after a
committed snapshot; with ``--warm-spare``, training is first paused until the spare is waiting
(failures minutes apart would find it so). The time is read from the workloads' progress files
(wall-clock time of each completed step) and split into detection, restart, imports, process-group
set-up, model build, load and the first step with the supervisor's events, the workloads' start-up
timestamps and the exit times of the old processes. The targets are on ``--warm-spare``; the
default flags' ratios are reported beside them. Every run must end bit-identical to an
uninterrupted run (the final model + optimizer digest; ours also checks its final manifest digest
against the live state). Once per bench run, plain ``torchrun --max-restarts 3`` (in-place
restart) is tried and what happens is recorded.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench import core
from bench.workloads import harness as h

_PHASES = ("t_start", "t_imported", "t_dist", "t_model", "t_loaded")
_PROBE_S = 30.0  # how long the in-place restart probe waits for a step after the kill
_PROBED: set[str] = set()  # bench runs (work dirs) whose in-place torchrun probe ran


#: The systems measured: name -> (ours' launch flags, or None for the baseline loop).
_SYSTEMS: dict[str, tuple[str, ...] | None] = {
    "ours_spare": ("--warm-spare",),
    "ours": (),
    "baseline": None,
}
#: Resident memory of one run, (fixed bytes, bytes per byte of training state), measured at 100M
#: and 1G on CPU: two ranks and torchrun, ours with its staging arena and load buffer.
_FOOTPRINT = {"ours_spare": (1.2e9, 7.7), "ours": (0.5e9, 5.5), "baseline": (0.6e9, 3.1)}


def run(config: core.BenchConfig, size_bytes: int) -> core.LegResult:
    n, workload, result, base, timeout = h.leg_start(config, size_bytes, "resume")
    cases = ["warm", "cold"] * n

    series: dict[str, list[h.Interruption]] = {}
    files: dict[str, h.RunFiles] = {}
    codes: dict[str, int] = {}
    rotations = _rotations(size_bytes)
    for i, names in enumerate(rotations):
        # With two rotations each ours variant has its own baseline run ("baseline", "baseline_2").
        keys = {name: name if name != "baseline" or i == 0 else f"baseline_{i + 1}" for name in names}
        jobs: dict[str, tuple[h.Job, Callable[[int], int | None], str, bool]] = {}
        try:
            with contextlib.ExitStack() as stack:
                for name in names:
                    key = keys[name]
                    f = files[key] = h.RunFiles.fresh(os.path.join(base, key))
                    flags = _SYSTEMS[name]
                    if flags is None:
                        job = stack.enter_context(h.plain_loop_job(f, workload))
                        jobs[key] = (job, h.plain_saved(workload), f.plain_dir, False)
                    else:
                        # A frozen job's collectives must not time out while another is measured.
                        job = stack.enter_context(h.ours_job(f, workload, max_restarts=len(cases) + 2,
                                                             flags=flags, ORCH_PG_TIMEOUT_S="900"))
                        jobs[key] = (job, h.ours_saved(f), os.path.join(f.ckpt_dir, "snapshots"), bool(flags))
                series.update(_rotation(jobs, cases, timeout=timeout))
                for key, (job, *_rest) in jobs.items():
                    codes[key] = job.wait(timeout)
        finally:
            for key in keys.values():
                if key in files:
                    files[key].discard_bulk()

    # The in-place probe (once per bench run) runs beside the golden run: only its outcome counts.
    probe = config.workdir not in _PROBED
    _PROBED.add(config.workdir)
    golden = h.golden_digest(
        config, workload, beside=(lambda: _in_place(config, result, workload, timeout)) if probe else None)
    for key, f in files.items():
        h.gate_final(result, key, codes[key], f, golden, manifest=not key.startswith("baseline"))

    for key, got in series.items():
        events = files[key].read_events()
        for case in ("warm", "cold"):
            mine = [s for c, s in zip(cases, got, strict=True) if c == case]
            result.values[f"{key}_{case}_s"] = core.Stat(unit="s", samples=tuple(s.seconds for s in mine))
            parts = [_plain_parts(s, files[key]) if key.startswith("baseline") else _ours_parts(s, events, files[key])
                     for s in mine]
            result.scalars[f"{key}_{case}_breakdown_s"] = _median_parts(parts)
    ours_baseline = "baseline" if len(rotations) == 1 else "baseline_2"
    for case in ("warm", "cold"):
        base_s = result.values[f"baseline_{case}_s"].median
        ratio = core.ratio(result.values[f"ours_spare_{case}_s"].median, base_s)
        result.targets.append(core.Target(
            name=f"resume_{case}", value=ratio, bound=0.5, op="<=",
            meaning=f"SIGKILL of rank 1 to first step after resume, {case} page cache"
                    f"{' (snapshot files evicted after the kill)' if case == 'cold' else ''}: "
                    "ours (--warm-spare) / until-torchrun loop",
        ))
        result.scalars[f"ours_default_ratio_{case}"] = round(core.ratio(
            result.values[f"ours_{case}_s"].median, result.values[f"{ours_baseline}_{case}_s"].median), 3)
    result.scalars["rotations"] = [list(r) for r in rotations]
    result.scalars["steps_total"] = workload.steps
    result.scalars["snapshot_every"] = workload.every
    result.scalars["resumed_from"] = {key: [s.resumed_from for s in got] for key, got in series.items()}
    result.notes.append(
        "ours_spare = orchestrator launch --warm-spare (its training is paused before each kill until "
        "the spare is waiting, as in a run whose failures are minutes apart); ours = default flags "
        "(cold relaunch; its ratio to the baseline is ours_default_ratio_*)")
    result.notes.append(
        "breakdown (medians, s): rank0_exit/torchrun_exit = kill until the old attempt's rank 0 / "
        "torchrun process is gone; notice = torchrun gone until the supervisor's "
        "attempt_failed event; backoff = the supervisor's restart delay; verify = its snapshot "
        "selection (full checksum pass); launch = new torchrun started (ours: attempt_started; "
        "baseline: the old one gone) until the script's first line; imports, dist_init, build "
        "(model, optimizer, DDP, Checkpointer), load (resume incl. verification), first_step: "
        "rank 0 of the resumed attempt; promoted_load = a warm spare's wait for the gate file to "
        "its restored state; other = total minus the parts")
    return result


def _rotations(size_bytes: int) -> list[tuple[str, ...]]:
    """The jobs measured side by side: all three if their memory fits, else in pairs, else alone."""
    budget = 0.75 * core.mem_available()

    def need(names: tuple[str, ...]) -> float:
        return sum(_FOOTPRINT[n][0] + _FOOTPRINT[n][1] * size_bytes for n in names)

    if need(tuple(_SYSTEMS)) <= budget:
        return [tuple(_SYSTEMS)]
    pairs: list[tuple[str, ...]] = [("ours_spare", "baseline"), ("ours", "baseline")]
    if all(need(p) <= budget for p in pairs):
        return pairs
    return [(name,) for name in _SYSTEMS]


def _rotation(jobs: dict[str, tuple[h.Job, Callable[[int], int | None], str, bool]], cases: list[str], *,
              timeout: float) -> dict[str, list[h.Interruption]]:
    """One SIGKILL of rank 1 per case and job, 2 steps after a snapshot newer than its last resume.

    The jobs take turns (order reversed every case): the one measured runs alone, the others are
    frozen (SIGSTOP), so a neighbour's load drifting over time cannot favour any of them.
    """
    out: dict[str, list[h.Interruption]] = {name: [] for name in jobs}
    names = list(jobs)
    try:
        for i, case in enumerate(cases):
            for name in names if i % 2 == 0 else names[::-1]:
                job, saved, cold_dir, spare = jobs[name]
                for other in names:
                    if other != name:
                        jobs[other][0].freeze()
                job.thaw()
                resumed = out[name][-1].resumed_from if out[name] else 0
                if spare:
                    job.wait_spare_ready(2, timeout=timeout)
                # The pids first: the kill must follow the kill point as closely as possible.
                send = h.kill_rank(job, 1, timeout=timeout)
                watch = h.attempt_pids(job, timeout=timeout)
                h.wait_after_save(job, saved, h.next_save(resumed), h.KILL_AFTER, timeout=timeout)
                out[name].append(h.interrupt(
                    job, send, saved_step=saved, watch=watch,
                    drop_cache=cold_dir if case == "cold" else None, timeout=timeout))
    finally:
        for job, *_rest in jobs.values():
            job.thaw()
    return out


def _after(items: list[dict[str, Any]], key: str, t: float, event: str | None = None) -> dict[str, Any] | None:
    for doc in items:
        if (event is None or doc.get("event") == event) and float(doc.get(key, 0)) > t:
            return doc
    return None


def _phases_after(sample: h.Interruption, files: h.RunFiles) -> dict[str, Any] | None:
    """Start-up record of the attempt that resumed after ``sample`` (loaded after the signal)."""
    return _after(files.read_phases(), "t_loaded", sample.t_signal)


def _worker_parts(sample: h.Interruption, files: h.RunFiles) -> tuple[float, dict[str, float]] | None:
    """(script start time, imports..first_step) of the cold-started attempt after ``sample``."""
    ph = _phases_after(sample, files)
    if ph is None:
        return None
    t = [float(ph[k]) for k in _PHASES]
    return t[0], {
        "imports": t[1] - t[0],
        "dist_init": t[2] - t[1],
        "build": t[3] - t[2],
        "load": t[4] - t[3],
        "first_step": sample.t_first - t[4],
    }


def _exit_parts(sample: h.Interruption) -> dict[str, float]:
    return {f"{name}_exit": t - sample.t_signal for name, t in sorted(sample.exits.items(), key=lambda kv: kv[1])}


def _ours_parts(sample: h.Interruption, events: list[dict[str, Any]], files: h.RunFiles) -> dict[str, float]:
    failed = _after(events, "time", sample.t_signal, "supervisor.attempt_failed")
    backoff = _after(events, "time", sample.t_signal, "supervisor.backoff")
    selected = _after(events, "time", sample.t_signal, "supervisor.resume_selected")
    started = _after(events, "time", sample.t_signal, "supervisor.attempt_started")
    promoted = _after(events, "time", sample.t_signal, "supervisor.spare_promoted")
    ph = _phases_after(sample, files)
    gone = sample.exits.get("torchrun")
    if None in (failed, backoff, selected, started, ph, gone):
        return {}
    assert failed and backoff and selected and started and ph and gone
    delay = float(backoff["delay_s"])
    out = _exit_parts(sample)
    out.update(
        notice=float(failed["time"]) - gone,
        backoff=delay,
        verify=float(selected["time"]) - float(failed["time"]) - delay,
    )
    if promoted is not None and float(ph["t_start"]) < sample.t_signal:
        # A warm spare: started up before the kill, it loads once the gate file appears.
        out["promoted_load"] = float(ph["t_loaded"]) - float(promoted["time"])
        out["first_step"] = sample.t_first - float(ph["t_loaded"])
        return _with_other(out, sample, exclude=("rank0_exit",))
    worker = _worker_parts(sample, files)
    if worker is None:
        return {}
    out["launch"] = worker[0] - float(started["time"])
    out.update(worker[1])
    return _with_other(out, sample, exclude=("rank0_exit",))


def _plain_parts(sample: h.Interruption, files: h.RunFiles) -> dict[str, float]:
    worker = _worker_parts(sample, files)
    gone = sample.exits.get("torchrun")
    if worker is None or gone is None:
        return {}
    out = _exit_parts(sample)
    out["launch"] = worker[0] - gone
    out.update(worker[1])
    return _with_other(out, sample, exclude=("rank0_exit",))


def _with_other(parts: dict[str, float], sample: h.Interruption, *, exclude: tuple[str, ...]) -> dict[str, float]:
    """Add ``other``: the total not covered by the (sequential) parts; ``total`` too."""
    covered = sum(v for k, v in parts.items() if k not in exclude)
    return {**parts, "other": sample.seconds - covered, "total": sample.seconds}


def _median_parts(rows: list[dict[str, float]]) -> dict[str, float]:
    rows = [r for r in rows if r]
    if not rows:
        return {}
    keys = [k for k in rows[0] if all(k in r for r in rows)]
    return {k: round(statistics.median(r[k] for r in rows), 3) for k in keys}


def _in_place(config: core.BenchConfig, result: core.LegResult, workload: h.Workload, timeout: float) -> None:
    """Plain ``torchrun --max-restarts 3``: does its in-place restart after a SIGKILL resume?

    Watched until a step completes after the kill, torchrun gives up, or ``_PROBE_S`` pass; the log's
    ``connectFullMesh`` failures (restarted ranks that could not connect) are counted.
    """
    name = f"inplace-{result.size}-{time.time_ns()}"
    files = h.RunFiles.fresh(os.path.join(config.workdir, name))
    with contextlib.ExitStack() as cleanup, h.plain_job(files, workload, max_restarts=3) as job:
        cleanup.callback(files.discard_bulk)
        h.wait_until(lambda: h.max_step(files.read_progress()) >= workload.every + h.KILL_AFTER,
                     timeout=timeout, what="the first save", job=job)
        send = h.kill_rank(job, 1, timeout=timeout)
        log_offset = os.path.getsize(files.log)
        t_kill = time.time()
        send()

        def settled() -> str | None:
            if h.first_step_after(files, t_kill) is not None:
                return "resumed"
            return "torchrun exited" if job.poll() is not None else None

        try:
            how = h.wait_until(settled, timeout=min(timeout, _PROBE_S), what="in-place restart")
        except h.BenchRunError:
            how = f"hung: no step within {_PROBE_S:.0f} s"
        first = h.first_step_after(files, t_kill)
        code = job.poll()
    with open(files.log, "rb") as f:
        f.seek(log_offset)
        log = f.read().decode(errors="replace")
    lines = log.splitlines()
    mesh = [line for line in lines if line.startswith("[E") and "connectFullMesh failed" in line]
    # torchrun logs "failed (exitcode: ...)" once per failed worker group; the first is ours.
    failed_groups = max(0, sum(1 for line in lines if "failed (exitcode" in line) - 1)
    outcome: dict[str, Any] = {
        "works": first is not None,
        "how": how,
        "restarted_groups_failed": failed_groups,
        "connectFullMesh_errors": len(mesh),
        "torchrun_exit_code": code,
    }
    if first is not None:
        outcome["resume_s"] = round(first[1] - t_kill, 3)
    if mesh:
        outcome["error"] = re.sub(r"\s+", " ", mesh[0]).strip()[:300]
    result.scalars["torchrun_in_place_restart"] = outcome
    verdict = (f"resumed after {outcome['resume_s']} s (run beside the reference run: not comparable)"
               if first is not None else f"did NOT resume ({how})")
    result.notes.append(
        f"plain torchrun --max-restarts 3 (in-place restart) after SIGKILL of rank 1, gloo, torch "
        f"{core.machine()['torch']}: {verdict}; {failed_groups} restarted worker group(s) failed before that"
        + (f"; {len(mesh)} connectFullMesh error(s): {outcome['error']}" if mesh else ""))
