"""``orchestrator check-resume``: prove (or disprove) that a script resumes bit-exactly.

The same script runs three times under ``orchestrator launch``, each stopped at the same step
(``ORCH_STOP_AT_STEP``, obeyed by the Checkpointer: a final snapshot, then a clean exit): two
fresh runs, and one whose last rank is SIGKILLed at the end of a step (``--at``, else chosen from
the first run's snapshots so that the resume re-executes steps; ``ORCH_FAULTS``) and recovered
by the supervisor. The per-component digests of their snapshots are compared step by step. Two
fresh runs that differ mean the script is not deterministic at all (an unseeded RNG, a
nondeterministic kernel, data order); fresh runs that agree while the resumed one differs mean
state that lives across the step boundary outside the registered training state (a prefetched
batch, a running average). Either way the first difference is named (step, component, rank)
with a hint in plain words. The comparison itself (:func:`compare`) is pure; the runs are
real processes. Never imports torch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from contract.paths import RunPaths
from orchestrator.runstate import read_state
from orchestrator.settings import FAULTS_VAR, STOP_AT_STEP_VAR, inherited_environment
from storage import LocalSnapshotStore

#: What one run left: snapshot step -> component name -> digest (``"digest"`` for the whole).
Digests = dict[int, dict[str, str]]


@dataclass(frozen=True, kw_only=True)
class Divergence:
    """The first difference between two runs."""

    step: int
    component: str
    rank: int | None
    #: ``fresh-vs-fresh`` or ``fresh-vs-resumed``.
    between: str
    expected: str | None
    got: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "component": self.component,
            "rank": self.rank,
            "between": self.between,
            "expected": self.expected,
            "got": self.got,
        }


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """The outcome of a check: exact, or the first divergence and hints."""

    exact: bool
    compared_steps: list[int]
    first_divergence: Divergence | None = None
    hints: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "exact": self.exact,
            "compared_steps": self.compared_steps,
            "first_divergence": None
            if self.first_divergence is None
            else self.first_divergence.to_json(),
            "hints": self.hints,
        }


_RANK = re.compile(r"(?:^|/)rank(\d+)(?:/|$)")
# Components compared first at a step: the inputs of a step before its results, so that the
# first name reported is the cause (an unseeded RNG), not the consequence (the weights).
_ORDER = ("rng/", "loader", "per_rank", "extras", "scheduler", "scaler", "optimizer", "ema", "model")


def _priority(name: str) -> tuple[int, str]:
    for i, prefix in enumerate(_ORDER):
        if name.startswith(prefix):
            return i, name
    return len(_ORDER), name


def _first_difference(
    a: Mapping[str, str], b: Mapping[str, str]
) -> tuple[str, str | None, str | None] | None:
    parts = sorted((set(a) | set(b)) - {"digest"}, key=_priority)
    for name in parts:
        if a.get(name) != b.get(name):
            return name, a.get(name), b.get(name)
    if a.get("digest") != b.get("digest"):
        return "digest", a.get("digest"), b.get("digest")
    return None


def _diverge(
    base: Digests, other: Digests, steps: Sequence[int], between: str
) -> Divergence | None:
    for step in steps:
        diff = _first_difference(base[step], other[step])
        if diff is not None:
            name, expected, got = diff
            m = _RANK.search(name)
            return Divergence(
                step=step,
                component=name,
                rank=int(m.group(1)) if m else None,
                between=between,
                expected=expected,
                got=got,
            )
    return None


def hints_for(divergence: Divergence) -> list[str]:
    """Likely causes, in plain words, for where and between which runs it diverged."""
    name = divergence.component
    if divergence.between == "fresh-vs-fresh":
        if name.startswith("rng/python"):
            return ["seed Python's random module on every rank (trainer.seed_everything(seed))"]
        if name.startswith("rng/numpy"):
            return ["seed numpy on every rank (trainer.seed_everything(seed))"]
        if name.startswith(("rng/torch", "rng/cuda")):
            return ["seed torch on every rank before building the model "
                    "(trainer.seed_everything(seed))"]
        if name.startswith("loader"):
            return ["the data order is not reproducible: seed the sampler / DataLoader workers "
                    "(trainer.ResumableDistributedSampler, trainer.ResumableLoader)"]
        return [
            "two fresh runs already differ: seed every RNG before building the model "
            "(trainer.seed_everything(seed)) and avoid nondeterministic kernels "
            "(torch.use_deterministic_algorithms(True))",
        ]
    hints = [
        "state kept across the step boundary outside the registered training state (a "
        "prefetched batch, running averages, a counter): register it (TrainingState(per_rank="
        "..., extras=...)) or recompute it after resume()",
    ]
    if name.startswith(("model", "optimizer", "ema", "scheduler", "scaler")):
        hints.append("state that differs per rank (a per-rank counter or position) registered "
                     "in extras is saved from rank 0 only: register it in "
                     "TrainingState(per_rank=...)")
    if name.startswith("rng/"):
        hints.append("an RNG is drawn from outside the step (e.g. a batch prefetched before the "
                     "snapshot): draw the next batch at the start of the step instead")
    if name.startswith("loader"):
        hints.append("the data position is not restored: use trainer.ResumableDistributedSampler "
                     "/ trainer.ResumableLoader and register the loader")
    return hints


def compare(fresh_a: Digests, fresh_b: Digests, resumed: Digests, *, resumed_from: int) -> Verdict:
    """The verdict on three runs' snapshot digests (pure).

    Fresh runs are compared at every step both have; the resumed run at the steps after its
    resume point that it shares with the first fresh run (before it, it is the same run). A
    final snapshot missing from one run is a difference at that step.
    """
    common = sorted(set(fresh_a) & set(fresh_b))
    final = max(set(fresh_a) | set(fresh_b) | set(resumed), default=None)
    after = sorted(s for s in set(fresh_a) & set(resumed) if s > resumed_from)
    compared = sorted(set(common) | set(after))
    div = _diverge(fresh_a, fresh_b, common, "fresh-vs-fresh")
    if div is None:
        div = _diverge(fresh_a, resumed, after, "fresh-vs-resumed")
    if div is None and final is not None:
        for between, run in (("fresh-vs-fresh", fresh_b), ("fresh-vs-resumed", resumed)):
            if final not in fresh_a or final not in run:
                div = Divergence(step=final, component="(final snapshot missing)", rank=None,
                                 between=between, expected=None, got=None)
                break
    if div is None:
        return Verdict(exact=True, compared_steps=compared)
    return Verdict(exact=False, compared_steps=compared, first_divergence=div,
                   hints=hints_for(div))


def read_digests(checkpoint_dir: str) -> Digests:
    """Every valid snapshot's component digests (plus ``"digest"``) in ``checkpoint_dir``."""
    store = LocalSnapshotStore(checkpoint_dir)
    out: Digests = {}
    for info in store.list():
        checked = store.validate(info.step)
        if not checked.valid or checked.manifest is None:
            continue
        components = dict(getattr(checked.manifest, "components", {}) or {})
        components["digest"] = checked.manifest.digest
        out[info.step] = components
    return out


#: Without ``--at``: each run stops at this step (or at the script's own end, if sooner) with
#: snapshots every :data:`DEFAULT_EVERY` steps, and the kill step is chosen from the first run.
DEFAULT_STOP_AT = 20
DEFAULT_EVERY = 5


@dataclass(frozen=True, kw_only=True)
class Plan:
    """How the three runs are made; ``at`` None: chosen from the first run (:func:`choose_kill`)."""

    script: str
    script_args: list[str]
    nproc_per_node: int
    stop_at: int
    at: int | None
    every: int
    workdir: str
    timeout_s: float


def plan(*, script: str, script_args: Sequence[str], nproc_per_node: int, at: int | None,
         workdir: str | None, timeout_s: float) -> Plan:
    """The default: stop at step 20 (or the script's end), snapshots every 5, the kill step
    chosen from the first fresh run; with ``--at K``: stop at 2K (at least K+2), snapshots at
    about K/2 apart, never at K."""
    if at is None:
        every, stop_at = DEFAULT_EVERY, DEFAULT_STOP_AT
    elif at < 1:
        raise ValueError(f"--at must be >= 1, got {at}")
    else:
        every = max(1, at // 2 - 1)
        if at % every == 0 and every > 1:
            every -= 1
        stop_at = max(2 * at, at + 2)
    return Plan(script=script, script_args=list(script_args), nproc_per_node=nproc_per_node,
                stop_at=stop_at, at=at, every=every,
                workdir=workdir or tempfile.mkdtemp(prefix="check-resume-"), timeout_s=timeout_s)


class CannotCheck(Exception):
    """The runs could not be compared: the script is too short, or a run itself failed."""

    def __init__(self, message: str, *, hints: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.hints = list(hints)


def choose_kill(snapshot_steps: Sequence[int]) -> int:
    """The kill step for a run whose snapshots (the last one is its final step) were these.

    The kill falls strictly inside an interval between two snapshots, so that the resume
    re-executes steps, and the latest such interval that still has a snapshot after it is
    preferred, so that the resumed run is compared at more than its final step. A resume point
    of 0 (a fresh start) is used only when no snapshot before the final one leaves room.
    """
    steps = sorted(set(snapshot_steps))
    if not steps:
        raise CannotCheck("the first fresh run left no snapshot",
                          hints=["the script never called Checkpointer.step_done"])
    final = steps[-1]
    gaps = [(a, b) for a, b in zip([0, *steps[:-1]], steps, strict=True) if b - a >= 2]
    if not gaps:
        raise CannotCheck(
            f"the script stopped at step {final}: check-resume needs a run of at least 2 steps "
            "(pass a longer run in SCRIPT_ARGS, or --at)"
        )
    # Rank: a real resume point first, then a snapshot to compare after the kill, then lateness.
    a, b = max(gaps, key=lambda g: (g[0] > 0, g[1] < final, g[0]))
    return a + (b - a + 1) // 2


def _launch(plan: Plan, name: str, *, faults: str | None) -> str:
    """One ``launch`` run; its checkpoint dir. Raises :class:`CannotCheck` when it fails."""
    ckpt = os.path.join(plan.workdir, name)
    env = inherited_environment()
    env[STOP_AT_STEP_VAR] = str(plan.stop_at)
    env.pop(FAULTS_VAR, None)
    if faults:
        env[FAULTS_VAR] = faults
    cmd = [
        sys.executable, "-m", "orchestrator.cli", "launch",
        "--nproc-per-node", str(plan.nproc_per_node),
        "--checkpoint-dir", ckpt,
        "--checkpoint-every", str(plan.every),
        "--max-restarts", "1",
        plan.script, *plan.script_args,
    ]
    log_path = os.path.join(plan.workdir, f"{name}.log")
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  timeout=plan.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            code: int | str = f"nothing within --timeout {plan.timeout_s:g}s"
        else:
            code = proc.returncode
    if code == 0:
        return ckpt
    what = f"exited {code}" if isinstance(code, int) else f"finished {code}"
    if faults is None:
        hint = (f"the script fails under orchestrator launch without any fault injected: "
                f"run it with launch yourself and read {log_path}")
    else:
        hint = ("the script did not recover from a SIGKILL: the resume itself failed (see the "
                "log's root cause: a refused resume, state that does not load, a crash after "
                "resume()")
    raise CannotCheck(f"the {name} run {what}; see {log_path}", hints=[hint])


def run_check(plan: Plan) -> tuple[Verdict, dict[str, Any]]:
    """Make the three runs and compare them; :class:`CannotCheck` when that is not possible."""
    os.makedirs(plan.workdir, exist_ok=True)
    runs: dict[str, Digests] = {"fresh-a": read_digests(_launch(plan, "fresh-a", faults=None))}
    at = plan.at if plan.at is not None else choose_kill(list(runs["fresh-a"]))
    runs["fresh-b"] = read_digests(_launch(plan, "fresh-b", faults=None))
    killed = f"step_end@{at}:rank={plan.nproc_per_node - 1}"
    runs["resumed"] = read_digests(_launch(plan, "resumed", faults=killed))
    state = read_state(RunPaths.of(os.path.join(plan.workdir, "resumed"))) or {}
    recorded = state.get("resumed_from_step")
    # What the last attempt resumed from (state.json); 0 when it had to start fresh.
    resumed_from = recorded if isinstance(recorded, int) else 0
    verdict = compare(runs["fresh-a"], runs["fresh-b"], runs["resumed"], resumed_from=resumed_from)
    details = {"workdir": plan.workdir, "at": at, "at_chosen_from_run": plan.at is None,
               "stop_at": plan.stop_at, "every": plan.every, "resumed_from": resumed_from}
    return verdict, details
