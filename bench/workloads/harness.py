"""Driving the workloads for the recovery legs: launch, watch progress, inject failures, clean up.

Every process a leg starts carries a unique ``BENCH_TOKEN`` in its environment; a :class:`Job`
finds them all through ``/proc`` (:func:`orchestrator.launcher.find_processes`: the supervisor,
torchrun, the ranks, even ranks that torchrun started in their own sessions or that outlived
their parent) and SIGKILLs whatever is left when the leg ends, so nothing survives a leg; it
can also be frozen (SIGSTOP) while another job is measured. Time is read from the workloads'
progress files, whose lines carry the wall-clock time at which each step completed; the first
step of a resumed attempt is the first line after that attempt's start-up record. A paced job
(the lost leg's) runs only as far as its pace file allows (:func:`set_pace`): the harness holds
it at the step it interrupts it after, so neither the run's end nor steps run on while a signal
takes effect can overtake the leg's schedule.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from bench import core
from bench.scratch import RUN_VAR
from contract import polling
from contract.env import ATTEMPT_VAR
from contract.paths import RunPaths
from orchestrator.launcher import find_processes, kill_and_wait
from orchestrator.runstate import read_json_lines
from storage import layout

REPO = Path(__file__).resolve().parents[2]
OURS = "bench/workloads/ours.py"
PLAIN = "bench/workloads/plain.py"
TOKEN_VAR = "BENCH_TOKEN"
#: Snapshot interval of every recovery run (steps); a kill comes ``KILL_AFTER`` steps after one.
EVERY = 4
KILL_AFTER = 2

T = TypeVar("T")


class BenchRunError(RuntimeError):
    """A workload run did not do what the leg needs (exited, hung, never resumed)."""


def _bin(name: str) -> list[str]:
    """The venv's console script next to this interpreter, else ``python -m``."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(path):
        return [path]
    module = {"torchrun": "torch.distributed.run", "orchestrator": "orchestrator.cli"}[name]
    return [sys.executable, "-m", module]


def base_env(**extra: str) -> dict[str, str]:
    """Our environment without launcher variables, single-threaded, the repo importable.

    The bench run's own marker (:data:`bench.scratch.RUN_VAR`) stays: it is how the run finds
    whatever a leg left alive before deleting its scratch directory.
    """
    env = {
        k: v for k, v in os.environ.items()
        if k == RUN_VAR or (
            not k.startswith(("ORCH_", "TORCHELASTIC_", "BENCH_"))
            and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))
    }
    path = env.get("PYTHONPATH")
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO) + (os.pathsep + path if path else ""),
        ORCH_LOG_FORMAT="json",
    )
    env.update(extra)
    return env


def steps_for(config: core.BenchConfig) -> int:
    """Total steps of every recovery run of this bench run (one golden run serves both legs).

    Resume: 4 steps per kill. Lost (paced, so exact): 8 per SIGTERM + SIGKILL pair, the last
    kill held at step 8n + 3 of 8n + 12; checked before each interruption (``bench.legs.lost``).
    """
    return EVERY * (2 * samples_per_case(config) + 3)


def samples_per_case(config: core.BenchConfig) -> int:
    """Failures of each kind per run: ``repeats``; quick: one (each costs a full relaunch)."""
    return 1 if config.quick else config.repeats


# -- files of one run ------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One training run's parameters (identical for ours, plain and the golden run)."""

    size: int
    steps: int
    every: int = EVERY
    seed: int = 7

    def args(self, files: RunFiles, *, plain: bool, paced: bool = False) -> list[str]:
        out = [
            "--size", str(self.size), "--steps", str(self.steps), "--seed", str(self.seed),
            "--progress", files.progress, "--phases", files.phases, "--result", files.result,
        ]
        if plain:
            out += ["--every", str(self.every), "--ckpt", files.plain_ckpt]
        if paced:
            out += ["--pace", files.pace]
        return out


@dataclass(frozen=True)
class RunFiles:
    """Where one run keeps its checkpoints, progress, phases, result and logs."""

    root: str

    @classmethod
    def fresh(cls, root: str) -> RunFiles:
        os.makedirs(root, exist_ok=False)
        return cls(root)

    @property
    def progress(self) -> str:
        return os.path.join(self.root, "progress.txt")

    @property
    def phases(self) -> str:
        return os.path.join(self.root, "phases.jsonl")

    @property
    def result(self) -> str:
        return os.path.join(self.root, "result.json")

    @property
    def log(self) -> str:
        return os.path.join(self.root, "launcher.log")

    @property
    def pace(self) -> str:
        """A paced run's leash: the last step it may run (see :func:`set_pace`)."""
        return os.path.join(self.root, "pace.txt")

    @property
    def ckpt_dir(self) -> str:
        """Ours: ``--checkpoint-dir``."""
        return os.path.join(self.root, "ckpt")

    @property
    def plain_dir(self) -> str:
        return os.path.join(self.root, "plain")

    @property
    def plain_ckpt(self) -> str:
        return os.path.join(self.plain_dir, "ckpt.pt")

    def read_progress(self) -> list[tuple[int, float]]:
        return read_progress(self.progress)

    def discard_bulk(self) -> None:
        """Delete the snapshots, exports and saves (gigabytes); logs and timings stay."""
        for path in (os.path.join(self.ckpt_dir, "snapshots"), os.path.join(self.ckpt_dir, "exports"),
                     self.plain_dir):
            shutil.rmtree(path, ignore_errors=True)

    def read_phases(self) -> list[dict[str, Any]]:
        return read_json_lines(self.phases)

    def read_result(self) -> dict[str, Any] | None:
        try:
            with open(self.result) as f:
                doc: dict[str, Any] = json.load(f)
            return doc
        except (OSError, ValueError):
            return None

    def read_events(self) -> list[dict[str, Any]]:
        return read_json_lines(os.path.join(self.ckpt_dir, "run", "events.jsonl"))

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


def read_progress(path: str) -> list[tuple[int, float]]:
    """``(step, time)`` of every complete line; a torn last line is ignored."""
    out: list[tuple[int, float]] = []
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return out
    for line in text.split("\n")[:-1]:
        parts = line.split()
        if len(parts) == 2:
            with contextlib.suppress(ValueError):
                out.append((int(parts[0]), float(parts[1])))
    return out


def max_step(lines: Sequence[tuple[int, float]]) -> int:
    return max((s for s, _ in lines), default=0)


def first_step_after(files: RunFiles, t: float) -> tuple[int, float, int] | None:
    """``(step, time, resumed_from)`` of the first step completed by an attempt that loaded after ``t``.

    That attempt's rank 0 wrote its phases line (with the step it resumed from) after loading and
    before its first step, so its steps are the progress lines from then on, whatever step the
    old attempt had reached (a resume need not go back: a snapshot may have been just taken).
    """
    # t_loaded, not t_start: a warm spare started before ``t`` and loaded after it.
    phase = next((p for p in files.read_phases() if float(p["t_loaded"]) > t), None)
    if phase is None:
        return None
    loaded = float(phase["t_loaded"])
    for step, at in files.read_progress():
        if at >= loaded:
            return step, at, int(phase["resumed_from"])
    return None


# -- processes -------------------------------------------------------------------------------


class Job:
    """One launcher command (and its relaunches) whose every process carries one token."""

    def __init__(self, argv: list[str], *, files: RunFiles, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.files = files
        self.token = uuid.uuid4().hex
        self.env = dict(env if env is not None else base_env())
        self.env[TOKEN_VAR] = self.token
        self.proc: subprocess.Popen[bytes] | None = None
        self.launches = 0

    def start(self) -> Job:
        if self.proc is not None and self.proc.poll() is None:
            raise BenchRunError("the previous launch is still running")
        with open(self.files.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.launches += 1
        return self

    def __enter__(self) -> Job:
        return self.start()

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None) -> None:
        self.stop()

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait(self, timeout: float) -> int:
        if self.proc is None:
            raise BenchRunError("wait() before start()")
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchRunError(
                f"{os.path.basename(self.argv[0])} still running after {timeout:.0f}s; "
                f"log tail:\n{self.files.log_tail()}"
            ) from None

    def pids(self, **env: str) -> list[int]:
        """Live processes of this job whose environment also has ``env``."""
        return find_processes({TOKEN_VAR: self.token, **env})

    def active_attempt(self) -> str | None:
        """Ours: the supervisor's current attempt (``run/state.json``); None for plain torchrun.

        With ``--warm-spare`` the next attempt's processes already run beside the active ones;
        only the active attempt's may be killed or watched.
        """
        try:
            with open(os.path.join(self.files.ckpt_dir, "run", "state.json")) as f:
                attempt = json.load(f).get("attempt")
        except (OSError, ValueError):
            return None
        return None if attempt is None else str(attempt)

    def _attempt_env(self) -> dict[str, str]:
        attempt = self.active_attempt()
        return {} if attempt is None else {ATTEMPT_VAR: attempt}

    def rank_pid(self, rank: int) -> int | None:
        found = self.pids(RANK=str(rank), **self._attempt_env())
        return max(found) if found else None

    def torchrun_pids(self) -> list[int]:
        """This job's live torchrun processes (``torchrun`` script or ``-m torch.distributed.run``).

        A rank between torchrun's fork and its exec still shows torchrun's command line: only
        candidates whose parent is not a candidate count.
        """
        found: dict[int, int] = {}
        for pid in self.pids(**self._attempt_env()):
            argv: list[str] = []
            ppid = 0
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if argv[1:2] and (argv[1].endswith("/torchrun") or argv[1:3] == ["-m", "torch.distributed.run"]):
                found[pid] = ppid
        return [pid for pid, ppid in found.items() if ppid not in found]

    def freeze(self) -> None:
        """SIGSTOP every process of the job: it uses no CPU while another job is measured.

        Scanned until no new process shows up: one that a not yet stopped parent forked after a
        scan would otherwise run on unfrozen.
        """
        stopped: set[int] = set()
        for _ in range(100):
            pids = set(self.pids())
            if self.proc is not None and self.proc.poll() is None:
                pids.add(self.proc.pid)
            new = pids - stopped
            if not new and (stopped or not pids):
                return
            for pid in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            stopped |= new
            time.sleep(0.02)
        raise BenchRunError("the job kept starting processes while being frozen")

    def thaw(self) -> None:
        pids = set(self.pids())
        if self.proc is not None and self.proc.poll() is None:
            pids.add(self.proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def wait_spare_ready(self, nproc: int, *, timeout: float) -> None:
        """Ours with ``--warm-spare``: pause training until the next attempt's spare is waiting.

        The active attempt's ranks are stopped (SIGSTOP; the supervisor and torchrun run on)
        until every spare rank logged ``spare.waiting``, then continued: a failure then finds the
        spare ready, as in a run whose failures are minutes apart, without spending steps.
        """
        attempt: str = wait_until(self.active_attempt, timeout=timeout, what="the supervisor's state", job=self)
        spare = int(attempt) + 1
        log = os.path.join(self.files.ckpt_dir, "run", "logs", f"attempt-{spare}.log")

        def started() -> bool:
            # The supervisor starts the spare once the attempt completed a step: let it train.
            return any(e.get("event") == "supervisor.spare_started" and e.get("attempt") == spare
                       for e in self.files.read_events())

        def ready() -> bool:
            try:
                with open(log, "rb") as f:
                    return f.read().count(b'"event": "spare.waiting"') >= nproc
            except OSError:
                return False

        wait_until(started, timeout=timeout, what="the warm spare's start", job=self, interval=0.05)
        ranks = find_processes({TOKEN_VAR: self.token, ATTEMPT_VAR: attempt}, present=("RANK",))
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(ready, timeout=timeout, what="the warm spare", job=self, interval=0.05)
        finally:
            for pid in ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGKILL everything of this job, including relaunch loops and orphaned ranks."""
        for _ in range(20):
            pids = self.pids()
            if self.proc is not None and self.proc.poll() is None:
                pids.append(self.proc.pid)
            if not pids:
                break
            kill_and_wait(sorted(set(pids)), 10.0)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


def ours_job(files: RunFiles, workload: Workload, *, max_restarts: int = 10, flags: Sequence[str] = (),
             paced: bool = False, **env: str) -> Job:
    """``orchestrator launch`` of ``ours.py``; ``paced``: held before step 1 until :func:`set_pace`."""
    if paced:
        set_pace(files, 0)
    argv = [
        *_bin("orchestrator"), "launch", "--nproc-per-node", "2", "--checkpoint-dir", files.ckpt_dir,
        "--checkpoint-every", str(workload.every), "--max-restarts", str(max_restarts), *flags,
        OURS, *workload.args(files, plain=False, paced=paced),
    ]
    return Job(argv, files=files, env=base_env(**env))


def plain_command(files: RunFiles, workload: Workload, *, max_restarts: int | None = None,
                  paced: bool = False) -> list[str]:
    extra = [] if max_restarts is None else ["--max-restarts", str(max_restarts)]
    return [*_bin("torchrun"), "--standalone", "--nproc-per-node", "2", *extra, PLAIN,
            *workload.args(files, plain=True, paced=paced)]


def plain_job(files: RunFiles, workload: Workload, *, max_restarts: int | None = None) -> Job:
    """A single plain torchrun."""
    os.makedirs(files.plain_dir, exist_ok=True)
    return Job(plain_command(files, workload, max_restarts=max_restarts), files=files)


def plain_loop_job(files: RunFiles, workload: Workload, *, paced: bool = False) -> Job:
    """The baseline relauncher: ``until torchrun ...; do :; done``; ``paced`` as in :func:`ours_job`."""
    os.makedirs(files.plain_dir, exist_ok=True)
    if paced:
        set_pace(files, 0)
    argv = ["bash", "-c", 'until "$@"; do :; done', "bench-loop",
            *plain_command(files, workload, paced=paced)]
    return Job(argv, files=files)


def set_pace(files: RunFiles, step: int) -> None:
    """Let a paced run (every attempt, relaunches too) run up to and including ``step``, then hold.

    Written atomically; the ranks poll it before every step. Only ever raised: a rank keeps the
    highest value it has read.
    """
    tmp = f"{files.pace}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{step}\n")
    os.replace(tmp, files.pace)


def preempt_requested(files: RunFiles) -> bool:
    """Ours: the supervisor's preemption request for its ranks is on disk (not yet answered)."""
    return os.path.exists(RunPaths.of(files.ckpt_dir).preempt_request)


def committed(files: RunFiles, step: int) -> bool:
    """Ours: the snapshot at ``step`` is committed (its manifest is in place)."""
    root = layout.snapshots_root(os.path.abspath(files.ckpt_dir))
    return os.path.exists(os.path.join(root, layout.snapshot_dirname(step), "manifest.json"))


def newest_committed(files: RunFiles, upto: int) -> int | None:
    """Ours: the newest committed snapshot step at or below ``upto``."""
    for step in range(upto, 0, -1):
        if committed(files, step):
            return step
    return None


def wait_until(predicate: Callable[[], T | None], *, timeout: float, what: str, job: Job | None = None,
               interval: float = 0.01) -> T:
    """Poll ``predicate`` until truthy; BenchRunError on timeout or if ``job`` exits meanwhile."""

    def exited() -> str | None:
        code = None if job is None else job.poll()
        return None if code is None else f"launcher exited {code}"

    try:
        return polling.wait_until(predicate, timeout=timeout, what=what, interval=interval,
                                  stop_if=exited)
    except (polling.PollAborted, polling.PollTimeout) as e:
        raise BenchRunError(f"{e}; log tail:\n{job.files.log_tail() if job else ''}") from None


# -- failures --------------------------------------------------------------------------------


class ExitWatch(threading.Thread):
    """Records the wall-clock time at which each watched process exits (pidfd, event-driven)."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(name="bench-exit-watch", daemon=True)
        self.exits: dict[str, float] = {}
        self._fds: dict[int, str] = {}
        for name, pid in pids.items():
            with contextlib.suppress(ProcessLookupError):
                self._fds[os.pidfd_open(pid)] = name
        self._stop_flag = threading.Event()

    def run(self) -> None:
        poller = select.poll()
        for fd in self._fds:
            poller.register(fd, select.POLLIN)
        pending = set(self._fds)
        while pending and not self._stop_flag.is_set():
            for fd, _ in poller.poll(50):
                self.exits[self._fds[fd]] = time.time()
                pending.discard(fd)
                poller.unregister(fd)

    def close(self) -> dict[str, float]:
        self._stop_flag.set()
        if self.is_alive():
            self.join(5)
        for fd in self._fds:
            os.close(fd)
        self._fds = {}
        return dict(self.exits)



@dataclass(frozen=True)
class Interruption:
    """One injected failure and how the run came back from it."""

    t_signal: float
    last_step: int  # newest step completed before the signal
    saved_step: int  # newest durable snapshot/save at the signal
    resumed_from: int
    t_first: float  # the first step completed after the resume
    exits: dict[str, float]  # when the old attempt's watched processes were gone
    exit_code: int | None = None  # the launcher's, when it was expected to exit and relaunched

    @property
    def seconds(self) -> float:
        return self.t_first - self.t_signal

    @property
    def lost(self) -> int:
        return max(0, self.last_step - self.resumed_from)

    @property
    def since_save(self) -> int:
        return self.last_step - self.saved_step


def wait_after_save(job: Job, saved: Callable[[int], int | None], snapshot: int, steps: int, *,
                    timeout: float) -> None:
    """Wait until a save at or after step ``snapshot`` is durable and ``steps`` more steps ran."""

    def ready() -> bool:
        last = max_step(job.files.read_progress())
        return last >= snapshot + steps and (saved(last) or 0) >= snapshot

    wait_until(ready, timeout=timeout, what=f"save {snapshot} and {steps} more steps", job=job)


def next_save(after: int, every: int = EVERY) -> int:
    """The first interval step strictly after step ``after``."""
    return (after // every + 1) * every


def interrupt(
    job: Job,
    send: Callable[[], None],
    *,
    saved_step: Callable[[int], int | None],
    drop_cache: str | None = None,
    relaunch: bool = False,
    watch: dict[str, int] | None = None,
    timeout: float,
) -> Interruption:
    """Fire ``send`` (a kill or a signal) now and wait for the first step after the resume.

    ``saved_step(last)`` says which snapshot/save was durable when the signal came (the newest at
    or below step ``last``); ``drop_cache`` is a directory evicted from the page cache right
    after the signal; ``relaunch``: the launcher is expected to exit, start it again; ``watch``:
    processes (name -> pid) whose exit times are recorded.
    """
    watcher = ExitWatch(watch or {})
    watcher.start()
    before = job.files.read_progress()
    saved = saved_step(max_step(before)) or 0
    t_signal = time.time()
    send()
    if drop_cache is not None:
        core.drop_page_cache(drop_cache)
    code = None
    try:
        if relaunch:
            code = job.wait(timeout)
            job.start()
        step, t_first, resumed_from = wait_until(
            lambda: first_step_after(job.files, t_signal), timeout=timeout,
            what="the first step after the resume", job=job)
    finally:
        exits = watcher.close()
    if step != resumed_from + 1:
        raise BenchRunError(f"resumed from step {resumed_from} but the next step logged is {step}")
    last = max((s for s, t in job.files.read_progress() if t <= t_signal), default=0)
    return Interruption(t_signal=t_signal, last_step=last, saved_step=saved, resumed_from=resumed_from,
                        t_first=t_first, exits=exits, exit_code=code)


def attempt_pids(job: Job, *, timeout: float = 120) -> dict[str, int]:
    """The live attempt's rank 0 and torchrun, to watch for their exits."""

    def found() -> dict[str, int] | None:
        rank0, torchrun = job.rank_pid(0), job.torchrun_pids()
        return {"rank0": rank0, "torchrun": max(torchrun)} if rank0 is not None and torchrun else None

    pids: dict[str, int] = wait_until(found, timeout=timeout, what="rank 0 and torchrun", job=job)
    return pids


def kill_rank(job: Job, rank: int, *, timeout: float = 120) -> Callable[[], None]:
    """A ``send`` that SIGKILLs the rank's live process (found before the clock starts)."""
    pid = wait_until(lambda: job.rank_pid(rank), timeout=timeout, what=f"rank {rank}", job=job)

    def send() -> None:
        os.kill(pid, signal.SIGKILL)

    return send


def signal_torchrun(job: Job, signum: int, *, timeout: float = 120) -> Callable[[], None]:
    """A ``send`` that signals the job's live torchrun (found before the clock starts)."""
    pid = wait_until(lambda: max(job.torchrun_pids(), default=None), timeout=timeout, what="torchrun", job=job)

    def send() -> None:
        os.kill(pid, signum)

    return send


def plain_saved(workload: Workload) -> Callable[[int], int]:
    """Plain saves synchronously before logging the step: the last multiple of the interval."""
    return lambda last: last - last % workload.every


def ours_saved(files: RunFiles) -> Callable[[int], int | None]:
    return lambda last: newest_committed(files, last)


# -- the uninterrupted reference -------------------------------------------------------------

_GOLDEN: dict[tuple[Workload, str], str] = {}


def golden_digest(config: core.BenchConfig, workload: Workload, *, beside: Callable[[], None] | None = None,
                  timeout: float = 600) -> str:
    """Final digest of an uninterrupted run (plain torchrun; ours must match it bit for bit).

    Computed once per workload and bench run, shared by the legs. ``beside`` runs meanwhile (work
    whose timing does not matter); it runs alone when the digest is already known.
    """
    key = (workload, config.workdir)
    if key in _GOLDEN:
        if beside is not None:
            beside()
        return _GOLDEN[key]
    root = os.path.join(config.workdir, f"golden-{core.size_label(workload.size)}-{uuid.uuid4().hex[:6]}")
    files = RunFiles.fresh(root)
    try:
        with plain_job(files, workload) as job:
            if beside is not None:
                beside()
            rc = job.wait(timeout)
    finally:
        files.discard_bulk()
    result = files.read_result()
    if rc != 0 or result is None:
        raise BenchRunError(f"golden run failed rc={rc}; log tail:\n{files.log_tail()}")
    _GOLDEN[key] = str(result["digest"])
    return _GOLDEN[key]


def gate_final(result: core.LegResult, who: str, rc: int, files: RunFiles, golden: str, *,
               manifest: bool) -> None:
    """The run ended well and bit-identical to the uninterrupted one (ours: and its manifest)."""
    doc = files.read_result()
    if rc != 0 or doc is None:
        raise BenchRunError(f"{who} run failed rc={rc}; log tail:\n{files.log_tail()}")
    result.gate(golden, str(doc["digest"]), f"{who}: final state after the failures vs the uninterrupted run")
    if manifest:
        result.gate(str(doc["live_manifest_digest"]), str(doc["manifest_digest"]),
                    f"{who}: final manifest digest vs the live state")


def timeout_for(size_bytes: int) -> float:
    """Generous bound on one start-up + resume (2 cores, a busy machine, big states)."""
    return 120.0 + 120.0 * size_bytes / core.GB


def state_bytes(size_bytes: int, width: int = 1024) -> int:
    """Bytes of model + AdamW state that :func:`bench.core.make_model` builds for ``size_bytes``."""
    params = max(width * 4, size_bytes // 12)
    layers = max(1, params // (width * width + width))
    return layers * (width * width + width) * 12


def leg_start(
    config: core.BenchConfig, size_bytes: int, leg: str
) -> tuple[int, Workload, core.LegResult, str, float]:
    """What the resume and lost legs start from: kills per case, the workload, an empty result,
    a fresh scratch dir and the per-run timeout."""
    workload = Workload(size=size_bytes, steps=steps_for(config))
    result = core.LegResult(leg=leg, size=core.size_label(size_bytes), size_bytes=state_bytes(size_bytes))
    base = config.scratch(f"{leg}-{result.size}")
    return samples_per_case(config), workload, result, base, timeout_for(size_bytes)
