"""bench/gpu_check.py without a GPU: arguments, plan, digest comparison, summary, exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import gpu_check as g

pytestmark = pytest.mark.timeout(60)


def snap(step: int, digest: str, valid: bool = True) -> dict[str, Any]:
    return {"step": step, "digest": digest, "valid": valid, "tier": "local"}


def test_parse_args_defaults_and_errors(tmp_path: Path) -> None:
    o = g.parse_args(["--out", str(tmp_path)])
    assert o.checks == g.CHECK_NAMES and o.steps == 120 and o.every == 20 and o.kill_step == 50
    assert o.staging_size == 256_000_000 and not o.dry_run
    assert g.parse_args(["--checks", "pinned_staging", "--dry-run"]).checks == ("pinned_staging",)
    for bad in (["--checks", "nope"], ["--kill-step", "130"], ["--kill-step", "5"],
                ["--staging-size", "lots"], ["--bench-sizes", "1G,x"], ["--timeout", "0"]):
        with pytest.raises(SystemExit):
            g.parse_args(bad)
    assert g.main(["--checks", "nope"], probe=lambda: (1, None)) == g.EXIT_USAGE


def test_plan_one_or_two_ranks(tmp_path: Path) -> None:
    o = g.parse_args(["--out", str(tmp_path)])
    one, two = g.plan(o, 1), g.plan(o, 4)
    assert any("1 rank(s)" in line for line in one) and not any("NCCL" in line for line in one)
    assert any("2 rank(s) with NCCL" in line for line in two)
    killed = next(line for line in two if "killed run" in line)
    assert "ORCH_FAULTS=step_end@50:rank=1" in killed and "--nproc-per-node 2" in killed
    assert any("--device cuda" in line for line in one)
    assert g.ranks_for(0) == 1 and g.ranks_for(2) == 2


def test_compare_digests() -> None:
    golden = [snap(20, "a"), snap(40, "b"), snap(60, "c")]
    ok, d = g.compare_digests(golden, [snap(20, "a"), snap(40, "x", valid=False), snap(60, "c")], final_step=60)
    assert ok and d["compared_steps"] == [20, 60] and d["final_resumed"] == "c"
    ok, d = g.compare_digests(golden, [snap(20, "a"), snap(40, "B"), snap(60, "c")], final_step=60)
    assert not ok and d["mismatched_steps"] == [40]
    ok, d = g.compare_digests(golden, [snap(20, "a"), snap(40, "b")], final_step=60)
    assert not ok and "final step 60" in d["problems"][0]
    ok, _ = g.compare_digests([], [], final_step=60)
    assert not ok


def test_no_cuda_exits_69_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    called: list[str] = []

    def check(ctx: g.Context) -> dict[str, Any]:
        called.append("ran")
        return {"ok": True}

    rc = g.main(["--out", str(out)], probe=lambda: (0, "torch sees no CUDA device"),
                checks=dict.fromkeys(g.CHECK_NAMES, check))
    assert rc == g.EXIT_NO_CUDA == 69
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu-check: no usable CUDA device")
    assert not out.exists() and called == []


def test_dry_run_prints_plan_anywhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = g.main(["--out", str(tmp_path / "o"), "--dry-run"], probe=lambda: (0, "CPU-only build"))
    text = capsys.readouterr().out
    assert rc == 0 and "digits_resume: golden run" in text and "would exit 69" in text
    assert not (tmp_path / "o").exists()


def test_main_with_fake_checks_writes_summary(tmp_path: Path) -> None:
    def passes(ctx: g.Context) -> dict[str, Any]:
        assert ctx.ranks == 2
        return {"ok": True, "final_golden": "f" * 64, "mismatched_steps": []}

    def fails(ctx: g.Context) -> dict[str, Any]:
        return {"ok": False, "pinned": False, "problems": ["staging arena not pinned"]}

    def raises(ctx: g.Context) -> dict[str, Any]:
        raise RuntimeError("bench exploded")

    rc = g.main(["--out", str(tmp_path)], probe=lambda: (2, None),
                describe=lambda: ({"torch": "2.x", "cuda": "12.x"}, {"name": "Fake GPU", "count": 2}),
                checks={"digits_resume": passes, "pinned_staging": fails, "bench_cuda": raises})
    assert rc == g.EXIT_FAILED
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False and summary["gpu"]["name"] == "Fake GPU" and summary["ranks"] == 2
    by = {c["name"]: c for c in summary["checks"]}
    assert by["digits_resume"]["ok"] and "ok" not in by["digits_resume"]["detail"]
    assert not by["pinned_staging"]["ok"]
    assert by["bench_cuda"]["error"] == "RuntimeError: bench exploded"
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# GPU check: FAIL") and "Fake GPU x 2" in md and "**FAIL**" in md

    rc = g.main(["--out", str(tmp_path), "--checks", "digits_resume"], probe=lambda: (1, None),
                describe=lambda: ({}, {"name": "Fake", "count": 1}),
                checks={"digits_resume": lambda ctx: {"ok": True}})
    assert rc == g.EXIT_OK
    assert json.loads((tmp_path / "summary.json").read_text())["ok"] is True


class FakeRun:
    """Stands in for gpu_check._run: answers each command from a table, records what ran."""

    def __init__(self, tmp: Path, snaps: dict[str, list[dict[str, Any]]], restarts: int) -> None:
        self.tmp, self.snaps, self.restarts = tmp, snaps, restarts
        self.calls: list[tuple[list[str], dict[str, str]]] = []

    def __call__(self, ctx: g.Context, args: list[str], log: Path, **env: str) -> Any:
        import subprocess

        self.calls.append((args, env))
        out = ""
        if "snapshots" in args:
            out = json.dumps(self.snaps[Path(args[args.index("--checkpoint-dir") + 1]).name])
        elif "status" in args:
            out = json.dumps({"restarts": self.restarts, "resumed_from_step": 40})
        elif "bench" in args:
            doc = {"device": "cuda", "errors": [], "legs": [{"size": "1G", "correctness": {"ok": True}, "targets": [
                {"name": "stall_vs_copy", "value": 0.4}, {"name": "stall_vs_async_save", "value": 0.2}]}]}
            Path(args[args.index("--json") + 1]).write_text(json.dumps(doc))
        return subprocess.CompletedProcess(args, 0, out, "")


def ctx_for(tmp_path: Path, gpus: int = 2) -> g.Context:
    import time

    return g.Context(opts=g.parse_args(["--out", str(tmp_path)]), gpus=gpus, deadline=time.monotonic() + 60)


def test_digits_resume_flow_with_a_fake_launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    golden = [snap(s, f"d{s}") for s in range(20, 121, 20)]
    fake = FakeRun(tmp_path, {"digits-golden": golden, "digits-killed": golden}, restarts=1)
    monkeypatch.setattr(g, "_run", fake)
    detail = g.check_digits_resume(ctx_for(tmp_path))
    assert detail["ok"] and detail["ranks"] == 2 and detail["final_resumed"] == "d120"
    launches = [(a, e) for a, e in fake.calls if "launch" in a]
    assert [e.get("ORCH_FAULTS") for _, e in launches] == [None, "step_end@50:rank=1"]
    assert all(a[a.index("--nproc-per-node") + 1] == "2" for a, _ in launches)

    fake.restarts = 0  # the fault never fired: digests equal, but nothing was tested
    assert not g.check_digits_resume(ctx_for(tmp_path))["ok"]


def test_bench_cuda_reads_the_legs_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(g, "_run", FakeRun(tmp_path, {}, restarts=0))
    detail = g.check_bench_cuda(ctx_for(tmp_path, gpus=1))
    assert detail["ok"] and detail["stall_vs_copy"] == 0.4 and detail["stall_vs_async_save"] == 0.2
