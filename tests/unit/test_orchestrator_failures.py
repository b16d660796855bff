"""Root-cause extraction: error files first, else torchrun's failure summary, else the exit code.

The torchrun fixtures are real outputs of ``torchrun --standalone --nproc-per-node 2
--max-restarts=0`` (torch 2.13, gloo, CPU) with rank 1 raising, and rank 1 SIGKILLing itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from contract.paths import RunPaths
from orchestrator.failures import (
    diagnose,
    parse_torchrun_failures,
    parse_torchrun_root_cause,
    signal_name,
)

pytestmark = pytest.mark.timeout(10)

FIXTURES = Path(__file__).parent / "fixtures"


def test_parse_exception_summary() -> None:
    root = parse_torchrun_root_cause((FIXTURES / "orchestrator_torchrun_exception.txt").read_text())
    assert root is not None
    assert (root.rank, root.exit_code, root.signal_name) == (1, 1, None)
    assert root.traceback is None
    assert root.describe() == "rank 1 exited with code 1"


def test_parse_sigkill_summary() -> None:
    root = parse_torchrun_root_cause((FIXTURES / "orchestrator_torchrun_sigkill.txt").read_text())
    assert root is not None
    assert (root.rank, root.exit_code, root.signal_name) == (1, -9, "SIGKILL")
    assert root.describe() == "rank 1 killed by SIGKILL"


def test_parse_uses_the_root_cause_block_not_other_failures() -> None:
    # The "Failures:" block above names rank 0 (SIGTERMed by torchrun); it is not the cause.
    root = parse_torchrun_root_cause((FIXTURES / "orchestrator_torchrun_sigkill.txt").read_text())
    assert root is not None and root.rank == 1


def test_parse_without_summary() -> None:
    assert parse_torchrun_root_cause("just some output\nTraceback...\n") is None


def test_signal_name() -> None:
    assert signal_name(-9) == "SIGKILL"
    assert signal_name(-15) == "SIGTERM"
    assert signal_name(1) is None


def _paths(tmp_path: Path) -> RunPaths:
    paths = RunPaths.of(str(tmp_path))
    os.makedirs(paths.logs_dir, exist_ok=True)
    return paths


def _error(paths: RunPaths, attempt: int, rank: int, **fields: object) -> None:
    d = paths.errors_dir(attempt)
    os.makedirs(d, exist_ok=True)
    doc = {"rank": rank, "attempt": attempt, "time": 1.0, "type": "RuntimeError",
           "message": "m", "traceback": "", "fatal": False, **fields}
    Path(d, f"rank-{rank}.json").write_text(json.dumps(doc))


def test_diagnose_prefers_the_earliest_error_file(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    Path(paths.attempt_log(0)).write_text((FIXTURES / "orchestrator_torchrun_exception.txt").read_text())
    _error(paths, 0, 0, time=20.0, message="later")
    _error(paths, 0, 3, time=10.0, type="OSError", message="disk went away")
    failure = diagnose(paths, 0, 1)
    assert failure.summary == "rank 3: OSError: disk went away"
    assert (failure.rank, failure.fatal, failure.source) == (3, False, "error_file")


def test_a_killed_rank_beats_its_peers_error_files(tmp_path: Path) -> None:
    # Rank 1 was SIGKILLed (no error file); rank 0 then failed in a collective and wrote one.
    paths = _paths(tmp_path)
    Path(paths.attempt_log(0)).write_text((FIXTURES / "orchestrator_torchrun_sigkill.txt").read_text())
    _error(paths, 0, 0, message="Connection closed by peer")
    failure = diagnose(paths, 0, 1)
    assert failure.summary == (
        "rank 1 killed by SIGKILL (then rank 0: RuntimeError: Connection closed by peer)"
    )
    assert failure.rank == 1 and not failure.fatal


def test_parse_all_reported_failures() -> None:
    text = (FIXTURES / "orchestrator_torchrun_sigkill.txt").read_text()
    failures = parse_torchrun_failures(text)
    assert [(f.rank, f.signal_name) for f in failures] == [(1, "SIGKILL"), (0, "SIGTERM")]


def test_diagnose_ignores_junk_error_files(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    os.makedirs(paths.errors_dir(0))
    Path(paths.errors_dir(0), "rank-0.json").write_text("{torn")
    Path(paths.errors_dir(0), "notes.txt").write_text("x")
    Path(paths.attempt_log(0)).write_text((FIXTURES / "orchestrator_torchrun_exception.txt").read_text())
    assert diagnose(paths, 0, 1).summary == "rank 1 exited with code 1"


def test_diagnose_only_reads_its_own_attempt(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    _error(paths, 0, 0, message="old attempt")
    Path(paths.attempt_log(1)).write_text((FIXTURES / "orchestrator_torchrun_sigkill.txt").read_text())
    assert diagnose(paths, 1, 1).summary == "rank 1 killed by SIGKILL"


def test_diagnose_exit_code_78_without_file_is_fatal(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    text = (FIXTURES / "orchestrator_torchrun_exception.txt").read_text()
    Path(paths.attempt_log(0)).write_text(text.replace("exitcode  : 1 (pid", "exitcode  : 78 (pid"))
    failure = diagnose(paths, 0, 1)
    assert failure.fatal and failure.summary == "rank 1 exited with code 78"


def test_diagnose_falls_back_to_torchrun_exit_status(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    failure = diagnose(paths, 4, -9)
    assert failure.summary.startswith("torchrun killed by SIGKILL")
    assert not failure.fatal


def test_long_messages_are_clipped(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    _error(paths, 0, 0, message="x" * 5000)
    assert len(diagnose(paths, 0, 1).summary) <= 500


_RDZV_CLOSED_LOG = """\
[W1123 12:00:01.000] torch/distributed/elastic/rendezvous/dynamic_rendezvous.py: joining
Traceback (most recent call last):
  File "torch/distributed/launcher/api.py", line 270, in launch_agent
    result = agent.run()
torch.distributed.elastic.rendezvous.api.RendezvousClosedError
"""


def test_a_closed_rendezvous_is_its_own_benign_kind(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    Path(paths.attempt_log(2)).write_text(_RDZV_CLOSED_LOG)
    failure = diagnose(paths, 2, 1)
    assert failure.source == "rendezvous_closed" and not failure.fatal
    assert "closed by another node" in failure.summary


def test_a_rendezvous_timeout_is_a_plain_failure_with_its_reason(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    Path(paths.attempt_log(0)).write_text(
        "torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError: "
        "The node 'h_1_0' has timed out waiting for the other nodes.\n"
    )
    failure = diagnose(paths, 0, 1)
    assert failure.source == "rendezvous" and not failure.fatal
    assert failure.summary.startswith("torchrun rendezvous failed: RendezvousTimeoutError: ")
    assert "timed out waiting" in failure.summary


def test_a_full_disk_diagnosis_comes_from_the_output_kept_in_memory(tmp_path: Path) -> None:
    """No error file and an empty attempt log (the disk filled): the ranks' ``worker.failed``
    JSON log lines in the supervisor's in-memory output tail name the root cause."""
    paths = RunPaths.of(str(tmp_path))
    os.makedirs(paths.logs_dir)
    Path(paths.attempt_log(2)).write_text("")
    failed = {"error_type": "DiskFull", "error": "no space left while creating /ck/snapshots/x",
              "fatal": False, "event": "worker.failed", "rank": 0, "level": "error"}
    peer = {**failed, "rank": 1, "error_type": "RuntimeError", "error": "Connection closed by peer"}
    output = "\n".join([
        "noise", "[default0]:" + json.dumps(failed), json.dumps(peer), '{"event": "worker.failed"',
        (FIXTURES / "orchestrator_torchrun_exception.txt").read_text(),
    ])
    failure = diagnose(paths, 2, 1, output=output)
    assert failure.summary == "rank 0: DiskFull: no space left while creating /ck/snapshots/x"
    assert (failure.rank, failure.fatal, failure.source) == (0, False, "error_file")
    fatal = json.dumps({**failed, "error_type": "NotWritable", "error": "Read-only", "fatal": True})
    assert diagnose(paths, 2, 1, output=fatal).fatal is True
    # the files, when there are any, still win
    assert diagnose(paths, 2, 1).source != "error_file"
