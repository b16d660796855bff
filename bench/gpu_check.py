"""``make gpu-check``: the CUDA paths, checked end to end on one GPU machine in under 8 minutes.

Three checks, each recorded pass/fail with its timings and details:

1. ``digits_resume``: ``examples/digits_cnn.py`` on CUDA (fp16 autocast + GradScaler) under
   ``orchestrator launch``, once uninterrupted (the golden run) and once with a rank SIGKILLed
   mid-run by fault injection (``ORCH_FAULTS=step_end@STEP:rank=R``) and resumed by the
   supervisor; the two runs' snapshot digests (``orchestrator snapshots --verify --json``) must be
   identical at every step, the final one included. Two ranks with NCCL when two GPUs are
   visible, one rank otherwise.
2. ``pinned_staging``: a snapshot of a CUDA model + AdamW by :class:`trainer.Checkpointer`
   stages into pinned host memory (the arena of ``trainer.codec.StagingArena(pin_memory=True)``),
   its stall is measured (finite, > 0) and compared with a device-to-pinned-host copy of the same
   bytes, and the committed snapshot restores onto the GPU with the live state's digest.
3. ``bench_cuda``: ``python -m bench --device cuda --legs stall`` (our stall against the D2H
   pinned copy and ``dcp.async_save``), its JSON and markdown kept.

Everything goes into one output directory: ``summary.json`` (pass/fail per check, versions,
GPU name, timings), ``summary.md``, each check's logs and the bench JSON.

Exit codes: 0 every check passed; 1 a check failed (see summary.json); 2 usage error;
**69** (``EX_UNAVAILABLE``) no usable CUDA device: printed as one line on stderr before anything
is launched or written. ``--dry-run`` prints the plan and exits 0 on any machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "examples" / "digits_cnn.py"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_CUDA = 69  # sysexits.h EX_UNAVAILABLE

CHECK_NAMES = ("digits_resume", "pinned_staging", "bench_cuda")


@dataclass(frozen=True, kw_only=True)
class Options:
    out: Path
    checks: tuple[str, ...]
    steps: int
    every: int
    kill_step: int
    staging_size: int
    bench_sizes: str
    bench_repeats: int
    timeout_s: float
    dry_run: bool


def parse_args(argv: Sequence[str] | None) -> Options:
    """Parse and check the arguments; ``SystemExit(2)`` (argparse) on a bad one."""
    from bench.core import parse_size

    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu-check"),
                   help="output directory (created; default bench/results/gpu-check)")
    p.add_argument("--checks", default=",".join(CHECK_NAMES),
                   help=f"comma-separated subset of: {', '.join(CHECK_NAMES)}")
    p.add_argument("--steps", type=int, default=120, help="digits steps per run (default 120)")
    p.add_argument("--every", type=int, default=20, help="snapshot every N steps (default 20)")
    p.add_argument("--kill-step", type=int, default=50,
                   help="the step at whose end the last rank is SIGKILLed (default 50)")
    p.add_argument("--staging-size", default="256M", help="state size of the pinned staging check")
    p.add_argument("--bench-sizes", default="1G", help="state sizes of the CUDA bench legs")
    p.add_argument("--bench-repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=420.0,
                   help="overall budget in seconds; each subprocess gets what is left (default 420)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit 0")
    a = p.parse_args(list(argv) if argv is not None else None)
    checks = tuple(c.strip() for c in a.checks.split(",") if c.strip())
    bad = [c for c in checks if c not in CHECK_NAMES]
    if bad or not checks:
        p.error(f"unknown or no checks {bad}; choose from {', '.join(CHECK_NAMES)}")
    if a.steps < 2 or a.every < 1 or not (a.every <= a.kill_step < a.steps):
        p.error("need steps >= 2, every >= 1 and every <= kill-step < steps (a snapshot before the kill)")
    if a.bench_repeats < 1 or a.timeout <= 0:
        p.error("bench-repeats and timeout must be positive")
    try:
        staging = parse_size(a.staging_size)
        for s in a.bench_sizes.split(","):
            parse_size(s)
    except ValueError as exc:
        p.error(str(exc))
    return Options(out=Path(a.out), checks=checks, steps=a.steps, every=a.every, kill_step=a.kill_step,
                   staging_size=staging, bench_sizes=a.bench_sizes, bench_repeats=a.bench_repeats,
                   timeout_s=a.timeout, dry_run=a.dry_run)


def ranks_for(gpus: int) -> int:
    """2 ranks (NCCL) where two GPUs exist, else 1."""
    return 2 if gpus >= 2 else 1


def work(opts: Options) -> Path:
    """Bulky scratch (the runs' checkpoint dirs, bench scratch): under the output dir, not results."""
    return opts.out / "work"


def launch_command(opts: Options, ckpt: Path, ranks: int) -> list[str]:
    return [
        sys.executable, "-m", "orchestrator.cli", "launch", "--nproc-per-node", str(ranks),
        "--checkpoint-dir", str(ckpt), "--checkpoint-every", str(opts.every), "--max-restarts", "3",
        str(DIGITS), "--steps", str(opts.steps), "--seed", "7",
    ]


def fault_spec(opts: Options, ranks: int) -> str:
    return f"step_end@{opts.kill_step}:rank={ranks - 1}"


def bench_command(opts: Options) -> list[str]:
    return [sys.executable, "-m", "bench", "--device", "cuda", "--legs", "stall", "--sizes", opts.bench_sizes,
            "--repeats", str(opts.bench_repeats), "--json", str(opts.out / "bench-cuda.json"),
            "--workdir", str(work(opts) / "bench")]


def plan(opts: Options, gpus: int) -> list[str]:
    """What a run would do, one line per step (``--dry-run`` prints it)."""
    ranks = ranks_for(gpus)
    lines = [f"output directory: {opts.out} (summary.json, summary.md, logs, bench-cuda.json; "
             f"checkpoint dirs and scratch under {work(opts)})",
             f"GPUs visible: {gpus} -> {ranks} rank(s){' with NCCL' if ranks > 1 else ''}",
             f"overall budget: {opts.timeout_s:g} s"]
    if "digits_resume" in opts.checks:
        lines += [
            "digits_resume: golden run: " + shlex.join(launch_command(opts, work(opts) / "digits-golden", ranks)),
            f"digits_resume: killed run: ORCH_FAULTS={fault_spec(opts, ranks)} "
            + shlex.join(launch_command(opts, work(opts) / "digits-killed", ranks)),
            "digits_resume: compare `orchestrator snapshots --verify --json` digests of both runs "
            f"(steps {opts.every}..{opts.steps}, final step {opts.steps} included); killed run restarted >= 1",
        ]
    if "pinned_staging" in opts.checks:
        lines.append(f"pinned_staging: {opts.staging_size / 1e6:g} MB CUDA model + AdamW, Checkpointer snapshot: "
                     "arena pinned, stall measured vs D2H pinned copy, restore digest == live digest")
    if "bench_cuda" in opts.checks:
        lines.append("bench_cuda: " + shlex.join(bench_command(opts)))
    return lines


# -- digests -------------------------------------------------------------------------------------


def compare_digests(golden: Sequence[Mapping[str, Any]], resumed: Sequence[Mapping[str, Any]],
                    *, final_step: int) -> tuple[bool, dict[str, Any]]:
    """Compare two runs' ``snapshots --json`` lists: every step valid in both has the same digest,
    and both have a valid snapshot of ``final_step``. Returns (ok, details)."""

    def valid(snaps: Sequence[Mapping[str, Any]]) -> dict[int, str]:
        return {int(s["step"]): str(s["digest"]) for s in snaps if s.get("valid") and s.get("digest")}

    g, r = valid(golden), valid(resumed)
    common = sorted(set(g) & set(r))
    mismatched = [s for s in common if g[s] != r[s]]
    detail: dict[str, Any] = {
        "golden_steps": sorted(g),
        "resumed_steps": sorted(r),
        "compared_steps": common,
        "mismatched_steps": mismatched,
        "final_step": final_step,
        "final_golden": g.get(final_step),
        "final_resumed": r.get(final_step),
    }
    problems = []
    if final_step not in g:
        problems.append(f"golden run has no valid snapshot of the final step {final_step}")
    if final_step not in r:
        problems.append(f"resumed run has no valid snapshot of the final step {final_step}")
    if mismatched:
        problems.append(f"digests differ at steps {mismatched}")
    if problems:
        detail["problems"] = problems
    return not problems, detail


# -- the summary -----------------------------------------------------------------------------------


@dataclass(kw_only=True)
class CheckResult:
    name: str
    ok: bool
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "seconds": round(self.seconds, 2), "detail": self.detail,
                "error": self.error}


def render_markdown(summary: Mapping[str, Any]) -> str:
    gpu = summary.get("gpu", {})
    v = summary.get("versions", {})
    lines = [
        f"# GPU check: {'PASS' if summary['ok'] else 'FAIL'}",
        "",
        f"Command: `{summary['command']}`  ",
        f"GPU: {gpu.get('name', '?')} x {gpu.get('count', '?')}; ranks: {summary.get('ranks', '?')}  ",
        f"torch {v.get('torch')}, CUDA {v.get('cuda')}, cuDNN {v.get('cudnn')}, NCCL {v.get('nccl')}, "
        f"python {v.get('python')}  ",
        f"Date: {summary['started']}; {summary['seconds']:.0f} s in all.",
        "",
        "| check | result | seconds | detail |",
        "|---|---|---|---|",
    ]
    for c in summary["checks"]:
        brief = c["error"] or ", ".join(f"{k}={_short(val)}" for k, val in c["detail"].items()
                                        if k in _BRIEF_KEYS)
        lines.append(f"| {c['name']} | {'pass' if c['ok'] else '**FAIL**'} | {c['seconds']:.1f} | {brief} |")
    return "\n".join(lines) + "\n"


_BRIEF_KEYS = ("final_golden", "mismatched_steps", "restarts", "resumed_from_step", "pinned", "stall_s",
               "d2h_copy_s", "stall_vs_copy", "stall_vs_async_save", "problems")


def _short(v: Any) -> str:
    if isinstance(v, str) and len(v) > 16:
        return v[:12] + "..."
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_summary(out: Path, summary: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``summary.json`` (atomically) and ``summary.md`` into ``out``; return both paths."""
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "summary.json", out / "summary.md"
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, js)
    md.write_text(render_markdown(summary))
    return js, md


# -- the checks (need CUDA) -----------------------------------------------------------------------


@dataclass(kw_only=True)
class Context:
    opts: Options
    gpus: int
    deadline: float

    @property
    def ranks(self) -> int:
        return ranks_for(self.gpus)

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 5:
            raise TimeoutError("the overall --timeout budget is spent")
        return left


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", ORCH_LOG_FORMAT="json",
               ORCH_RESTART_BACKOFF_INITIAL_S="0.2", ORCH_RESTART_BACKOFF_MAX_S="1", ORCH_PG_TIMEOUT_S="60",
               CUBLAS_WORKSPACE_CONFIG=":4096:8")
    env.update(extra)
    return env


def _run(ctx: Context, args: list[str], log: Path, **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=ctx.left())
    log.write_text(f"$ {shlex.join(args)}\n# rc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def _snapshots(ctx: Context, ckpt: Path) -> list[dict[str, Any]]:
    proc = _run(ctx, [sys.executable, "-m", "orchestrator.cli", "snapshots", "--checkpoint-dir", str(ckpt),
                      "--verify", "--json"], ctx.opts.out / f"{ckpt.name}-snapshots.log")
    if proc.returncode != 0:
        raise RuntimeError(f"orchestrator snapshots failed rc={proc.returncode}: {proc.stderr[-500:]}")
    out: list[dict[str, Any]] = json.loads(proc.stdout)
    return out


def check_digits_resume(ctx: Context) -> dict[str, Any]:
    o = ctx.opts
    detail: dict[str, Any] = {"ranks": ctx.ranks, "faults": fault_spec(o, ctx.ranks)}
    runs = {}
    for name, faults in (("golden", None), ("killed", fault_spec(o, ctx.ranks))):
        ckpt = work(o) / f"digits-{name}"
        shutil.rmtree(ckpt, ignore_errors=True)  # a previous check's snapshots would be resumed
        started = time.monotonic()
        proc = _run(ctx, launch_command(o, ckpt, ctx.ranks), o.out / f"digits-{name}.log",
                    **({"ORCH_FAULTS": faults} if faults else {}))
        detail[f"{name}_s"] = round(time.monotonic() - started, 2)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} run exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
        runs[name] = _snapshots(ctx, ckpt)
    status = _run(ctx, [sys.executable, "-m", "orchestrator.cli", "status", "--checkpoint-dir",
                        str(work(o) / "digits-killed"), "--json"], o.out / "digits-killed-status.log")
    st = json.loads(status.stdout) if status.returncode == 0 else {}
    detail["restarts"] = st.get("restarts")
    detail["resumed_from_step"] = st.get("resumed_from_step")
    ok, cmp = compare_digests(runs["golden"], runs["killed"], final_step=o.steps)
    detail.update(cmp)
    last: dict[str, Any] = next((s for s in reversed(runs["killed"]) if s.get("valid")), {})
    detail["components"] = sorted((last.get("components") or {}).keys())
    if not st.get("restarts"):
        ok = False
        detail.setdefault("problems", []).append("the killed run did not restart: the fault never fired")
    detail["ok"] = ok
    return detail


def check_pinned_staging(ctx: Context) -> dict[str, Any]:
    import torch

    from bench import core
    from bench.legs import savers, stall

    o = ctx.opts
    torch.manual_seed(0)
    model = core.make_model(o.staging_size, device="cuda")
    optimizer = core.make_optimizer(model)
    core.train_step(model, optimizer)
    directory = work(o) / "pinned"
    shutil.rmtree(directory, ignore_errors=True)
    ours = savers.Ours(model, optimizer, str(directory))
    try:
        stalls = []
        problems = []
        for step in (1, 2, 3):  # the first allocates the arena; count the later ones
            core.train_step(model, optimizer)
            expected = core.tensor_digest(core.training_state(model, optimizer))
            ours.save(step)
            core.train_step(model, optimizer)  # a deferred copy completes before this step's update
            stalls.append(ours.blocked())
            ours.wait()
            got = ours.saved_digest(step)  # verified load onto a copy of the CUDA model
            if got != expected:
                problems.append(f"step {step}: restored digest {got[:12]} != live {expected[:12]}")
            ours.delete(step)
        arena = ours.ckpt.arena
        buffer = getattr(arena, "_buffer", None)
        pinned = bool(arena.pin_memory and buffer is not None and buffer.is_pinned())
        copy = stall.copy_limit(model, optimizer, "cuda", 3).median
        measured = [s for s in stalls[1:] if s > 0]
        if not pinned:
            problems.append(f"staging arena not pinned (pin_memory={arena.pin_memory}, "
                            f"buffer {'missing' if buffer is None else 'pageable'})")
        if len(measured) != len(stalls[1:]):
            problems.append(f"stall not measured: {stalls}")
        stall_s = sorted(stalls[1:])[len(stalls[1:]) // 2]
        return {"state_bytes": core.state_bytes(model, optimizer), "pinned": pinned, "stall_s": stall_s,
                "stalls_s": stalls, "d2h_copy_s": copy, "stall_vs_copy": core.ratio(stall_s, copy),
                "staging": ours.ckpt.staging, "problems": problems, "ok": not problems}
    finally:
        ours.close()


def check_bench_cuda(ctx: Context) -> dict[str, Any]:
    o = ctx.opts
    try:
        proc = _run(ctx, bench_command(o), o.out / "bench-cuda.log")
    finally:
        shutil.rmtree(work(o) / "bench", ignore_errors=True)  # gigabytes of snapshots
    doc = json.loads((o.out / "bench-cuda.json").read_text()) if (o.out / "bench-cuda.json").exists() else {}
    detail: dict[str, Any] = {"rc": proc.returncode, "json": "bench-cuda.json", "markdown": "bench-cuda.md"}
    for leg in doc.get("legs", []):
        for t in leg.get("targets", []):
            if t["name"] in ("stall_vs_copy", "stall_vs_async_save"):
                detail[t["name"] if len(doc["legs"]) == 1 else f"{t['name']}_{leg['size']}"] = t["value"]
    errors = doc.get("errors", [])
    # The check is that the legs ran on CUDA and their saves were correct; a missed ratio is a
    # result to report (in bench-cuda.json), not a failure of the check.
    gates = [leg["correctness"]["ok"] for leg in doc.get("legs", [])]
    detail["correctness"] = gates
    detail["ok"] = bool(doc.get("legs")) and not errors and all(g is not False for g in gates) and doc.get(
        "device") == "cuda"
    if errors:
        detail["problems"] = [e["error"] for e in errors]
    return detail


CHECKS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "digits_resume": check_digits_resume,
    "pinned_staging": check_pinned_staging,
    "bench_cuda": check_bench_cuda,
}


# -- main ---------------------------------------------------------------------------------------


def cuda_status() -> tuple[int, str | None]:
    """(GPUs visible, why CUDA is unusable or None)."""
    import torch

    if torch.version.cuda is None:
        return 0, f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return 0, "torch sees no CUDA device (driver missing or CUDA_VISIBLE_DEVICES empty)"
    return torch.cuda.device_count(), None


def versions() -> dict[str, Any]:
    import torch

    nccl = None
    with contextlib.suppress(Exception):  # no NCCL in this build
        nccl = ".".join(str(x) for x in torch.cuda.nccl.version())  # type: ignore[no-untyped-call]
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),  # type: ignore[no-untyped-call]
            "nccl": nccl, "platform": platform.platform()}


def gpu_info() -> dict[str, Any]:
    import torch

    n = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "count": n, "memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}"}


def main(argv: Sequence[str] | None = None, *,
         checks: Mapping[str, Callable[[Context], dict[str, Any]]] | None = None,
         probe: Callable[[], tuple[int, str | None]] = cuda_status,
         describe: Callable[[], tuple[dict[str, Any], dict[str, Any]]] | None = None) -> int:
    """Run the GPU check; ``checks``/``probe``/``describe`` are seams for tests."""
    try:
        opts = parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK  # --help exits 0
    gpus, why = probe()
    if opts.dry_run:
        print("\n".join(plan(opts, gpus)))
        if why:
            print(f"(no CUDA here: {why}; a real run would exit {EXIT_NO_CUDA})")
        return EXIT_OK
    if why:
        print(f"gpu-check: no usable CUDA device: {why}; nothing was run (exit {EXIT_NO_CUDA})", file=sys.stderr)
        return EXIT_NO_CUDA
    started_wall = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    started = time.monotonic()
    ctx = Context(opts=opts, gpus=gpus, deadline=started + opts.timeout_s)
    opts.out.mkdir(parents=True, exist_ok=True)
    ver, gpu = describe() if describe is not None else (versions(), gpu_info())
    summary: dict[str, Any] = {
        "command": "python -m bench.gpu_check " + shlex.join(list(argv) if argv is not None else sys.argv[1:]),
        "started": started_wall, "versions": ver, "gpu": gpu, "ranks": ctx.ranks,
        "plan": plan(opts, gpus), "checks": [], "ok": False, "seconds": 0.0,
    }
    table = checks if checks is not None else CHECKS
    for name in opts.checks:
        print(f"[gpu-check] {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            detail = table[name](ctx)
            result = CheckResult(name=name, ok=bool(detail.pop("ok", False)), seconds=time.monotonic() - t0,
                                 detail=detail)
        except Exception as exc:  # one broken check must not lose the others
            result = CheckResult(name=name, ok=False, seconds=time.monotonic() - t0,
                                 detail={"traceback": traceback.format_exc()},
                                 error=f"{type(exc).__name__}: {exc}")
        summary["checks"].append(result.to_json())
        summary["seconds"] = round(time.monotonic() - started, 2)
        summary["ok"] = all(c["ok"] for c in summary["checks"])
        write_summary(opts.out, summary)  # partial results survive an interrupted run
        print(f"[gpu-check] {name}: {'pass' if result.ok else 'FAIL'} ({result.seconds:.1f} s)"
              f"{'' if result.error is None else ': ' + result.error}", file=sys.stderr, flush=True)
    summary["ok"] = len(summary["checks"]) == len(opts.checks) and all(c["ok"] for c in summary["checks"])
    js, md = write_summary(opts.out, summary)
    print(md.read_text())
    print(f"[gpu-check] wrote {js} and {md}", file=sys.stderr)
    return EXIT_OK if summary["ok"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
