"""The determinism audit's contract: the worker-env field, the journal and report documents,
their paths and the merge of the ranks' reports; and the ``status`` view of it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from contract.documents import (
    DeterminismReport,
    JournalEntry,
    JournalStart,
    parse_journal_line,
    read_document,
    summarize_determinism,
    write_document,
)
from contract.env import VARIABLES, WorkerEnv
from contract.paths import RunPaths
from contract.settings import BY_NAME
from orchestrator.runstate import read_determinism
from orchestrator.status import merge_determinism, render_status, status_document
from tests.support.clock import FakeClock

pytestmark = pytest.mark.timeout(60)


def test_on_divergence_is_part_of_the_worker_contract() -> None:
    assert "ORCH_ON_DIVERGENCE" in VARIABLES
    assert BY_NAME["ORCH_ON_DIVERGENCE"].set_by == "supervisor"
    assert WorkerEnv().on_divergence == "warn"
    env = WorkerEnv(on_divergence="fail")
    assert env.to_env()["ORCH_ON_DIVERGENCE"] == "fail"
    assert WorkerEnv.from_env(env.to_env()) == env
    with pytest.raises(ValueError, match=re.escape("ORCH_ON_DIVERGENCE must be one of")):
        WorkerEnv.from_env({"ORCH_ON_DIVERGENCE": "ignore"})
    # an inherited value never overrides the supervisor's
    assert WorkerEnv().apply({"ORCH_ON_DIVERGENCE": "fail"})["ORCH_ON_DIVERGENCE"] == "warn"


def test_journal_and_report_paths(tmp_path: Path) -> None:
    paths = RunPaths.of(str(tmp_path))
    assert paths.journal(3) == str(tmp_path / "run" / "journal" / "rank-3.jsonl")
    assert paths.journal_old(3) == paths.journal(3) + ".1"
    assert paths.determinism(3) == str(tmp_path / "run" / "determinism" / "rank-3.json")


def test_journal_lines_round_trip_and_junk_is_none() -> None:
    start = JournalStart(run_id="r", attempt=2, rank=1, resumed_from=10, config_hash="sha256:x", time=1.5)
    entry = JournalEntry(step=11, attempt=2, fp={"loss": (0.1).hex()})
    snap = JournalEntry(step=15, attempt=2, fp={}, components={"model": "sha256:a"})
    for doc in (start, entry, snap):
        assert parse_journal_line(json.dumps(doc.to_json())) == doc
    for junk in (b"", b"{", b"[]", b'{"step":"1","attempt":0,"fp":{}}', b'{"step":1,"attempt":0}',
                 b'{"step":1,"attempt":0,"fp":{"loss":1.0}}', b'{"start":true,"run_id":"r"}',
                 b'{"start":1,"run_id":"r","attempt":0,"rank":0,"resumed_from":0}'):
        assert parse_journal_line(junk) is None, junk


def test_report_round_trips_and_junk_reads_as_absent(tmp_path: Path) -> None:
    doc = DeterminismReport(rank=1, state="diverged", run_id="r", attempt=3, resumed_from=10,
                            checked_through_step=10, first_divergence_step=11, fingerprint="loss",
                            expected="0x1.0p+0", got="0x1.0000000000001p+0", time=2.0)
    path = str(tmp_path / "d.json")
    write_document(path, doc, durable=False)
    assert read_document(path, DeterminismReport) == doc
    for junk in (b"{}", b'{"rank":0,"state":"maybe"}', b'{"state":"verified"}', b"[1]"):
        Path(path).write_bytes(junk)
        assert read_document(path, DeterminismReport) is None


def _r(rank: int, state: str, through: int | None = None, first: int | None = None) -> DeterminismReport:
    return DeterminismReport(rank=rank, state=state, run_id="r", checked_through_step=through,
                             first_divergence_step=first, fingerprint="loss" if first else None,
                             expected="0x1p+0" if first else None, got="0x1p+1" if first else None)


def test_summary_of_the_ranks() -> None:
    unchecked = {"state": "unchecked", "checked_through_step": None, "first_divergence_step": None}
    assert summarize_determinism([]) == unchecked
    assert summarize_determinism([_r(0, "unchecked")]) == unchecked
    assert summarize_determinism([_r(0, "verified", 12), _r(1, "verified", 11)]) == {
        "state": "verified", "checked_through_step": 11, "first_divergence_step": None}
    merged = summarize_determinism([_r(0, "verified", 12), _r(1, "diverged", 13, 14), _r(2, "diverged", 11, 12)])
    assert merged["state"] == "diverged" and merged["first_divergence_step"] == 12 and merged["rank"] == 2
    assert (merged["fingerprint"], merged["expected"], merged["got"]) == ("loss", "0x1p+0", "0x1p+1")


# -- status --------------------------------------------------------------------------------------


def _run_dir(tmp_path: Path) -> RunPaths:
    paths = RunPaths.of(str(tmp_path))
    Path(paths.run_dir).mkdir(parents=True)
    Path(paths.state).write_text(json.dumps({"run_id": "r", "phase": "running", "attempt": 1, "nodes": []}))
    return paths


def test_status_without_reports_is_unchecked(tmp_path: Path) -> None:
    _run_dir(tmp_path)
    doc = status_document(str(tmp_path), clock=FakeClock())
    assert doc["determinism"] == {"state": "unchecked", "checked_through_step": None,
                                  "first_divergence_step": None}
    assert "determinism" in render_status(doc) and "unchecked" in render_status(doc)


def test_status_shows_verified_and_diverged(tmp_path: Path) -> None:
    paths = _run_dir(tmp_path)
    Path(paths.determinism_dir).mkdir()
    write_document(paths.determinism(0), _r(0, "verified", 12), durable=False)
    write_document(paths.determinism(1), _r(1, "verified", 12), durable=False)
    Path(paths.determinism_dir, "junk.txt").write_text("x")
    doc = status_document(str(tmp_path), clock=FakeClock())
    assert doc["determinism"]["state"] == "verified" and doc["determinism"]["checked_through_step"] == 12
    line = next(x for x in render_status(doc).splitlines() if x.startswith("determinism"))
    assert line.split(None, 1)[1] == "verified through step 12"

    write_document(paths.determinism(1), _r(1, "diverged", 10, 11), durable=False)
    doc = status_document(str(tmp_path), clock=FakeClock())
    assert {k: doc["determinism"][k] for k in ("state", "checked_through_step", "first_divergence_step")} == {
        "state": "diverged", "checked_through_step": 10, "first_divergence_step": 11}
    assert "DIVERGED at step 11 (rank 1, loss: expected 0x1p+0, got 0x1p+1)" in render_status(doc)
    json.dumps(doc)


def test_status_ignores_reports_of_another_run(tmp_path: Path) -> None:
    paths = _run_dir(tmp_path)
    Path(paths.determinism_dir).mkdir()
    stale = DeterminismReport(rank=0, state="diverged", run_id="old-run", first_divergence_step=3)
    write_document(paths.determinism(0), stale, durable=False)
    assert read_determinism(paths, "r")["state"] == "unchecked"
    assert read_determinism(paths, "old-run")["state"] == "diverged"


def test_mirror_status_merges_every_nodes_audit() -> None:
    def verified(through: int) -> dict[str, Any]:
        return {"state": "verified", "checked_through_step": through, "first_divergence_step": None}
    diverged = {"state": "diverged", "checked_through_step": 10, "first_divergence_step": 11,
                "rank": 3, "fingerprint": "loss", "expected": "0x1p+0", "got": "0x1p+1"}
    assert merge_determinism([verified(20), diverged, None])["first_divergence_step"] == 11
    assert merge_determinism([verified(20), verified(15)]) == verified(15)
    unchecked = {"state": "unchecked", "checked_through_step": None, "first_divergence_step": None}
    assert merge_determinism([None, "junk", unchecked]) == unchecked
    assert merge_determinism([]) == unchecked


def test_launch_flag_reaches_the_workers() -> None:
    from orchestrator.cli import build_parser
    from orchestrator.config import LaunchConfig, build_config
    from orchestrator.launcher import build_worker_env
    from orchestrator.settings import Settings

    args = build_parser().parse_args(["launch", "--checkpoint-dir", "ck", "--on-divergence", "fail", "t.py"])
    assert args.on_divergence == "fail"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["launch", "--checkpoint-dir", "ck", "--on-divergence", "no", "t.py"])
    config = build_config({"checkpoint_dir": "ck", "script": "t.py", "on_divergence": "fail"})
    env = build_worker_env(base={}, config=config, settings=Settings(), run_id="r", attempt=1,
                           resume_step=5, token="t")
    assert env["ORCH_ON_DIVERGENCE"] == "fail"
    assert WorkerEnv.from_env(env).on_divergence == "fail"
    default = build_config({"checkpoint_dir": "ck", "script": "t.py"})
    assert default.on_divergence == "warn"
    env = build_worker_env(base={"ORCH_ON_DIVERGENCE": "fail"}, config=default, settings=Settings(),
                           run_id="r", attempt=1, resume_step=5, token="t")
    assert env["ORCH_ON_DIVERGENCE"] == "warn"
    with pytest.raises(ValueError, match="--on-divergence"):
        LaunchConfig(checkpoint_dir="ck", script="t.py", on_divergence="maybe")
