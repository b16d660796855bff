"""check-resume's comparison of three runs (pure: synthetic digests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.check_resume import CannotCheck, choose_kill, compare, plan

pytestmark = pytest.mark.timeout(30)


def run(steps: list[int], **changed: dict[int, str]) -> dict[int, dict[str, str]]:
    """Snapshots at ``steps``; ``changed={"component": {step: digest}}`` overrides."""
    out: dict[int, dict[str, str]] = {}
    for s in steps:
        comps = {
            "model": f"m{s}", "optimizer": f"o{s}", "rng/python/rank0": f"p{s}",
            "rng/python/rank1": f"p{s}'", "loader/rank1": f"l{s}",
        }
        for name, by_step in changed.items():
            if s in by_step:
                comps[name.replace("__", "/")] = by_step[s]
        comps["digest"] = "d" + "".join(sorted(comps.values()))
        out[s] = comps
    return out


STEPS = [5, 10, 15, 20]


def test_identical_runs_are_exact() -> None:
    v = compare(run(STEPS), run(STEPS), run(STEPS), resumed_from=10)
    assert v.exact and v.first_divergence is None and v.hints == []
    assert v.compared_steps == STEPS


def test_fresh_runs_differing_in_an_rng_name_it_first() -> None:
    b = run(STEPS, model={10: "x", 15: "y", 20: "z"}, rng__python__rank1={10: "q"})
    v = compare(run(STEPS), b, run(STEPS), resumed_from=10)
    d = v.first_divergence
    assert d is not None and not v.exact
    # The cause (the RNG) is named before its consequence (the weights) at the same step.
    assert (d.step, d.component, d.rank, d.between) == (10, "rng/python/rank1", 1, "fresh-vs-fresh")
    assert any("seed_everything" in h for h in v.hints)


def test_resumed_run_differing_after_the_resume_point() -> None:
    r = run(STEPS, loader__rank1={15: "skipped"}, model={15: "w", 20: "w2"})
    v = compare(run(STEPS), run(STEPS), r, resumed_from=10)
    d = v.first_divergence
    assert d is not None
    assert (d.step, d.component, d.rank, d.between) == (15, "loader/rank1", 1, "fresh-vs-resumed")
    assert any("across the step boundary" in h for h in v.hints)
    assert any("ResumableLoader" in h for h in v.hints)


def test_differences_before_the_resume_point_are_not_the_resumes() -> None:
    # The resumed run shares its history up to the resume point with... itself: only later
    # steps are compared against the fresh run.
    r = run(STEPS, model={5: "other"})
    v = compare(run(STEPS), run(STEPS), r, resumed_from=10)
    assert v.exact and v.compared_steps == STEPS


def test_a_missing_final_snapshot_is_a_difference() -> None:
    v = compare(run(STEPS), run(STEPS), run([5, 10, 15]), resumed_from=10)
    d = v.first_divergence
    assert d is not None and (d.step, d.between) == (20, "fresh-vs-resumed")


def test_whole_digest_only_manifests_still_compare() -> None:
    a = {10: {"digest": "a"}, 20: {"digest": "b"}}
    b = {10: {"digest": "a"}, 20: {"digest": "c"}}
    v = compare(a, b, a, resumed_from=10)
    d = v.first_divergence
    assert d is not None and (d.step, d.component) == (20, "digest")


@pytest.mark.parametrize(("at", "every", "stop"), [(None, 5, 20), (7, 2, 14), (1, 1, 3), (4, 1, 8)])
def test_plan_kills_between_snapshots(at: int | None, every: int, stop: int) -> None:
    p = plan(script="s.py", script_args=[], nproc_per_node=2, at=at, workdir="/tmp/x",
             timeout_s=60)
    assert (p.every, p.stop_at, p.at) == (every, stop, at)
    assert p.at is None or p.every == 1 or p.at % p.every != 0  # the resume re-executes steps


@pytest.mark.parametrize(
    ("snapshots", "kill"),
    [
        ([5, 10, 15, 20], 13),  # resume from 10, compared again at 15 and 20
        ([5, 10, 12], 8),  # the script ended at 12 on its own
        ([5, 10, 15, 16], 13),  # no room after 15: the interval before it
        ([5, 6], 3),  # only a fresh start leaves room
        ([3], 2),
        ([1, 2, 3, 4, 6], 5),  # the script snapshots every step until 4, then its end at 6
    ],
)
def test_the_kill_step_is_chosen_from_the_first_run(snapshots: list[int], kill: int) -> None:
    got = choose_kill(snapshots)
    assert got == kill
    assert got not in snapshots and 0 < got < max(snapshots)


@pytest.mark.parametrize("snapshots", [[], [1], [1, 2, 3]])
def test_too_short_a_run_cannot_be_checked(snapshots: list[int]) -> None:
    with pytest.raises(CannotCheck):
        choose_kill(snapshots)


def test_plan_rejects_a_bad_step() -> None:
    with pytest.raises(ValueError, match="--at"):
        plan(script="s.py", script_args=[], nproc_per_node=2, at=0, workdir=None, timeout_s=1)


def test_stop_at_step_commits_that_snapshot_and_exits_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ORCH_STOP_AT_STEP: the snapshot of that step is committed (off the interval), the process
    ends there with exit 0, and a fresh run to the same step has the same digest."""
    from dataclasses import replace

    import trainer.checkpoint

    def exit_here(code: int) -> None:  # os._exit would end pytest itself
        raise SystemExit(code)

    monkeypatch.setattr(trainer.checkpoint.os, "_exit", exit_here)

    from tests.unit.test_trainer_checkpoint import Job

    stopped = Job(tmp_path / "stopped", every=4)
    stopped.ckpt.settings = replace(stopped.ckpt.settings, stop_at_step=6)
    with pytest.raises(SystemExit) as info:
        stopped.train(20)
    assert info.value.code == 0
    steps = sorted(p.name for p in (tmp_path / "stopped" / "snapshots").iterdir())
    assert steps == ["step-000000000004", "step-000000000006"]
    full = Job(tmp_path / "full", every=2)
    full.train(6)
    assert stopped.ckpt.last_digest == full.ckpt.last_digest
