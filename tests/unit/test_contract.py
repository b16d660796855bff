"""The supervisor/worker contract: one definition each of paths, documents, codes, phases, env."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contract import codes
from contract.codes import IllegalTransition, Phase
from contract.documents import (
    ErrorRecord,
    Heartbeat,
    PreemptAck,
    PreemptRequest,
    SpareGate,
    read_document,
    write_document,
)
from contract.env import VARIABLES, WorkerEnv
from contract.interval import Interval
from contract.paths import RunPaths
from contract.threads import run_in_thread

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


# -- worker environment ------------------------------------------------------------------------

_envs = st.builds(
    WorkerEnv,
    checkpoint_dir=st.none() | st.text(min_size=1, max_size=20).filter(lambda s: s.strip() == s),
    run_id=st.none() | st.from_regex(r"run-[a-z0-9]{1,12}", fullmatch=True),
    attempt=st.integers(0, 10**6),
    node_rank=st.integers(0, 1000),
    allow_config_change=st.booleans(),
    checkpoint_every=st.none()
    | st.just(Interval("auto"))
    | st.builds(Interval, st.just("steps"), st.integers(0, 10**6))
    | st.builds(Interval, st.just("seconds"),
                st.floats(min_value=1e-3, max_value=1e7, allow_nan=False, allow_infinity=False)),
    pg_timeout_s=st.floats(min_value=1e-3, max_value=1e6, allow_nan=False),
    log_format=st.sampled_from([None, "json", "console"]),
    spare_gate=st.none() | st.just("/ck/run/spare/attempt-3.json"),
    launch_token=st.none() | st.from_regex(r"[0-9a-f]{8}", fullmatch=True),
    on_divergence=st.sampled_from(["warn", "fail"]),
).flatmap(
    lambda e: st.sampled_from(
        [
            e,
            WorkerEnv(**{**_fields(e), "resume_mode": "fresh"}),
            WorkerEnv(**{**_fields(e), "resume_mode": "step", "resume_step": 12}),
        ]
    )
)


def _fields(e: WorkerEnv) -> dict[str, object]:
    return {k: getattr(e, k) for k in e.__dataclass_fields__}


@given(_envs)
def test_worker_env_round_trips_through_the_environment(env: WorkerEnv) -> None:
    assert WorkerEnv.from_env(env.to_env()) == env


def test_apply_replaces_every_inherited_contract_variable() -> None:
    inherited = {
        "PATH": "/bin",
        "ORCH_CHECKPOINT_EVERY": "5",  # from the caller's shell: must not override the script
        "ORCH_RESUME_STEP": "9",
        "ORCH_SPARE_GATE": "/stale",
        "ORCH_FAULTS": "step_end@3",  # not contract: inherited untouched
    }
    env = WorkerEnv(checkpoint_dir="/ck", run_id="r", attempt=2).apply(inherited)
    assert env["PATH"] == "/bin" and env["ORCH_FAULTS"] == "step_end@3"
    assert "ORCH_CHECKPOINT_EVERY" not in env and "ORCH_SPARE_GATE" not in env
    assert "ORCH_RESUME_STEP" not in env  # auto: the worker selects
    assert WorkerEnv.from_env(env) == WorkerEnv(checkpoint_dir="/ck", run_id="r", attempt=2)
    assert {k for k in env if k.startswith("ORCH_")} - {"ORCH_FAULTS"} <= VARIABLES


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"ORCH_ATTEMPT": "x"}, "ORCH_ATTEMPT must be an integer"),
        ({"ORCH_ATTEMPT": "-1"}, "ORCH_ATTEMPT must be >= 0"),
        ({"ORCH_RESUME_STEP": "later"}, "ORCH_RESUME_STEP must be an integer or 'none'"),
        ({"ORCH_ALLOW_CONFIG_CHANGE": "maybe"}, "ORCH_ALLOW_CONFIG_CHANGE must be 0 or 1"),
        ({"ORCH_LOG_FORMAT": "xml"}, "ORCH_LOG_FORMAT must be one of"),
        ({"ORCH_PG_TIMEOUT_S": "0"}, "ORCH_PG_TIMEOUT_S must be > 0"),
    ],
)
def test_bad_worker_environment_names_the_variable(variables: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        WorkerEnv.from_env(variables)


def test_resume_encoding() -> None:
    assert WorkerEnv.from_env({"ORCH_RESUME_STEP": "none"}).resume_mode == "fresh"
    assert WorkerEnv.from_env({"ORCH_RESUME_STEP": " NONE "}).resume_mode == "fresh"
    stepped = WorkerEnv.from_env({"ORCH_RESUME_STEP": "40"})
    assert (stepped.resume_mode, stepped.resume_step) == ("step", 40)
    assert WorkerEnv.from_env({"ORCH_RESUME_STEP": "  "}).resume_mode == "auto"
    with pytest.raises(ValueError, match="resume_step is set exactly"):
        WorkerEnv(resume_mode="step")


# -- documents -----------------------------------------------------------------------------------

_DOCS = [
    PreemptRequest(attempt=3, requested_at=1.5, deadline=31.5, signal="SIGTERM", source="SIGTERM"),
    PreemptRequest(attempt=0, requested_at=2.0, deadline=3.0, signal=None, source="notice (aws)"),
    PreemptAck(step=40, attempt=3, time=9.0, digest="sha256:ab"),
    PreemptAck(step=40, attempt=3, time=9.0, digest=None, snapshot_rank=0),
    Heartbeat(rank=1, step=7, attempt=2, time=5.0, resumed_from=4, epoch=1, pid=123),
    Heartbeat(rank=0, step=0, attempt=0, time=5.0),
    ErrorRecord(rank=2, attempt=1, time=4.0, type="ValueError", message="m", traceback="tb",
                fatal=True),
    SpareGate(attempt=4, resume_step=None),
    SpareGate(attempt=4, resume_step=12),
]


@pytest.mark.parametrize("doc", _DOCS, ids=lambda d: type(d).__name__)
def test_documents_round_trip_through_files(tmp_path: Path, doc: object) -> None:
    path = str(tmp_path / "doc.json")
    write_document(path, doc, durable=False)  # type: ignore[type-var]
    assert read_document(path, type(doc)) == doc  # type: ignore[arg-type]
    json.loads(Path(path).read_text())  # plain JSON for operators and other tools


@pytest.mark.parametrize("kind", [PreemptRequest, PreemptAck, Heartbeat, ErrorRecord, SpareGate])
@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"[]", b"null", b'{"attempt": "3", "step": "4", "rank": "1"}',
     b'{"attempt": true, "step": false, "rank": true, "time": true}'],
)
def test_junk_documents_read_as_absent(tmp_path: Path, kind: type, content: bytes) -> None:
    path = tmp_path / "doc.json"
    path.write_bytes(content)
    assert read_document(str(path), kind) is None
    assert read_document(str(tmp_path / "missing.json"), kind) is None


def test_file_name_rank_wins_over_the_documents_own() -> None:
    doc = Heartbeat(rank=1, step=7, attempt=2, time=5.0).to_json()
    assert Heartbeat.from_json(doc, rank=3) == Heartbeat(rank=3, step=7, attempt=2, time=5.0)
    record = ErrorRecord.from_json({"type": "X"}, rank=2)
    assert record is not None and record.time == float("inf") and not record.fatal


def test_paths_are_under_the_run_dir(tmp_path: Path) -> None:
    paths = RunPaths.of(str(tmp_path / "ck" / ".." / "ck"))
    run = os.path.join(str(tmp_path / "ck"), "run")
    assert paths.run_dir == run
    for path in (paths.state, paths.events, paths.lock, paths.attempt_log(3), paths.heartbeat(2),
                 paths.preempt_request, paths.preempt_ack, paths.error_file(3, 2),
                 paths.spare_gate(4)):
        assert path.startswith(run + os.sep)
    assert os.path.dirname(paths.error_file(3, 2)) == paths.errors_dir(3)
    assert os.path.dirname(paths.heartbeat(2)) == paths.progress_dir
    assert os.path.dirname(paths.spare_gate(4)) == paths.spare_dir


# -- codes and phases ----------------------------------------------------------------------------


def test_exit_codes_are_the_documented_ones() -> None:
    assert (codes.EXIT_OK, codes.EXIT_FAILED, codes.EXIT_USAGE) == (0, 1, 2)
    assert (codes.EXIT_PREEMPTED, codes.EXIT_FATAL) == (75, 78)


_ALLOWED = {
    ("starting", "running"), ("starting", "checkpointing"), ("starting", "failed"),
    ("running", "done"), ("running", "starting"), ("running", "recovering"),
    ("running", "checkpointing"), ("running", "failed"),
    ("recovering", "starting"), ("recovering", "checkpointing"), ("recovering", "failed"),
    ("checkpointing", "done"), ("checkpointing", "preempted"), ("checkpointing", "failed"),
}


@pytest.mark.parametrize("source", list(Phase), ids=lambda p: p.value)
@pytest.mark.parametrize("target", list(Phase), ids=lambda p: p.value)
def test_phase_transitions_table(source: Phase, target: Phase) -> None:
    allowed = (source.value, target.value) in _ALLOWED or (source is target and not source.terminal)
    assert source.can_enter(target) is allowed
    if allowed:
        source.check_transition(target)
    else:
        with pytest.raises(IllegalTransition, match=f"{source.value} -> {target.value}"):
            source.check_transition(target)


def test_terminal_phases() -> None:
    assert {p.value for p in Phase if p.terminal} == codes.TERMINAL_PHASE_NAMES
    assert {"done", "preempted", "failed"} == codes.TERMINAL_PHASE_NAMES


def test_contract_is_the_lowest_layer() -> None:
    """contract imports the standard library and structlog only: never storage, torch or the
    packages above it (both sides of the process boundary must be able to import it)."""
    code = (
        "import sys, pkgutil, importlib, contract\n"
        "for m in pkgutil.iter_modules(contract.__path__):\n"
        "    importlib.import_module('contract.' + m.name)\n"
        "bad = [m for m in sys.modules\n"
        "       if m.split('.')[0] in ('torch', 'numpy', 'trainer', 'orchestrator', 'storage')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT)


def test_run_in_thread_hands_back_the_result_or_the_error() -> None:
    seen: list[str] = []

    def work() -> int:
        seen.append(threading.current_thread().name)
        return 7

    assert run_in_thread(work, name="t-ok").result(timeout=10) == 7
    assert seen == ["t-ok"]

    def boom() -> None:
        raise KeyboardInterrupt("not swallowed")  # a BaseException travels too

    future = run_in_thread(boom, name="t-err")
    with pytest.raises(KeyboardInterrupt, match="not swallowed"):
        future.result(timeout=10)
