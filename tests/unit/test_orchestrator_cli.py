"""The CLI in-process: bad input exits 2 and launches nothing; status and snapshots views."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from contract.paths import RunPaths
from orchestrator import cli
from orchestrator.mirror import MirrorUnavailable, PermanentStorageError, safe_url
from orchestrator.runstate import RunLock, write_json_atomic
from storage import LocalSnapshotStore
from storage.errors import StorageError, TransientStorageError
from tests.unit.test_orchestrator_mirror import FakeRemote

pytestmark = pytest.mark.timeout(20)

DIGEST = "sha256:" + "ab" * 32


class NoLaunch:
    def __init__(self, **_: Any) -> None:
        raise AssertionError("a worker group was created")


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(cli, "TorchrunGroup", NoLaunch)
    yield
    # main() configures structlog onto this test's captured stderr, which pytest closes.
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def script(tmp_path: Path) -> str:
    p = tmp_path / "train.py"
    p.write_text("print('hi')\n")
    return str(p)


def launch(*argv: str) -> int:
    return cli.main(["launch", *argv])


def test_missing_script_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = tmp_path / "ck"
    assert launch("--checkpoint-dir", str(ck), str(tmp_path / "nope.py")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (ck / "run" / "logs").exists()


def test_no_script_at_all_exits_2(tmp_path: Path) -> None:
    assert launch("--checkpoint-dir", str(tmp_path / "ck")) == 2


def test_negative_max_restarts_exits_2(tmp_path: Path, script: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert launch("--checkpoint-dir", str(tmp_path / "ck"), "--max-restarts", "-1", script) == 2
    assert "--max-restarts must be >= 0" in capsys.readouterr().err


def test_unknown_flag_exits_2(tmp_path: Path, script: str) -> None:
    with pytest.raises(SystemExit) as exc:
        launch("--checkpoint-dir", str(tmp_path / "ck"), "--bogus", "1", script)
    assert exc.value.code == 2


def test_non_integer_flag_exits_2(tmp_path: Path, script: str) -> None:
    with pytest.raises(SystemExit) as exc:
        launch("--checkpoint-dir", str(tmp_path / "ck"), "--nproc-per-node", "two", script)
    assert exc.value.code == 2


def test_nodes_without_endpoint_exits_2(tmp_path: Path, script: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert launch("--checkpoint-dir", str(tmp_path / "ck"), "--nodes", "2", script) == 2
    assert "--rdzv-endpoint" in capsys.readouterr().err


def test_mirror_without_remote_tier_or_bad_url_exits_2_without_echoing_secrets(
        tmp_path: Path, script: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    def unusable(url: str) -> Any:
        raise MirrorUnavailable(f"--mirror {safe_url(url)}: unknown protocol")

    monkeypatch.setattr(cli, "open_remote", unusable)
    url = "s3://AKIAKEY:supersecret@bucket/run"
    assert launch("--checkpoint-dir", str(tmp_path / "ck"), "--mirror", url, script) == 2
    err = capsys.readouterr().err
    assert "bucket/run" in err
    assert "supersecret" not in err and "AKIAKEY" not in err


@pytest.mark.parametrize("error, words", [
    (PermanentStorageError("AccessDenied: 403 Forbidden"), "not usable"),
    (PermanentStorageError("NoSuchBucket: the bucket does not exist"), "does not exist"),
    (TransientStorageError("connect timeout"), "unreachable"),
])
def test_preflight_failure_exits_2_fast_before_anything_starts(
        tmp_path: Path, script: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, error: StorageError, words: str) -> None:
    remote = FakeRemote()
    remote.preflight_error = error
    monkeypatch.setattr(cli, "open_remote", lambda url: remote)
    monkeypatch.setenv("ORCH_MIRROR_RETRY_INITIAL_S", "0.01")
    monkeypatch.setenv("ORCH_MIRROR_RETRY_MAX_S", "0.02")
    monkeypatch.setenv("ORCH_MIRROR_RETRY_JITTER_S", "0")
    ck = tmp_path / "ck"
    assert launch("--checkpoint-dir", str(ck), "--mirror", "s3://K:S@bkt/run", script) == 2
    err = capsys.readouterr().err
    assert words in err and "bkt/run" in err and "K:S" not in err
    assert not (ck / "run" / "state.json").exists() and not (ck / "run" / "events.jsonl").exists()


def test_keep_remote_needs_mirror(tmp_path: Path, script: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert launch("--checkpoint-dir", str(tmp_path / "ck"), "--keep-remote", "2", script) == 2
    assert "--keep-remote needs --mirror" in capsys.readouterr().err


def test_unwritable_checkpoint_dir_exits_2(tmp_path: Path, script: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert launch("--checkpoint-dir", str(blocker / "ck"), script) == 2


def test_dir_held_by_live_supervisor_exits_2(tmp_path: Path, script: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    ck = tmp_path / "ck"
    lock = RunLock(str(ck), holder_file=RunPaths.of(str(ck)).lock)
    lock.acquire()
    try:
        assert launch("--checkpoint-dir", str(ck), script) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert "held by a live supervisor" in err and f"pid {os.getpid()}" in err


def test_bad_config_file_exits_2(tmp_path: Path, script: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("wat = 1\n")
    assert launch("--config", str(conf), "--checkpoint-dir", str(tmp_path / "ck"), script) == 2


def test_bad_settings_env_exits_2(tmp_path: Path, script: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_POLL_INTERVAL_S", "soon")
    assert launch("--checkpoint-dir", str(tmp_path / "ck"), script) == 2


def _remote_with_run(tmp_path: Path) -> FakeRemote:
    ck = _snapshot_dir(tmp_path)
    remote = FakeRemote()
    store = LocalSnapshotStore(str(ck))
    remote.add(store, 100)
    w = store.begin(150)
    w.write_bytes("tensors.bin", bytes(16))
    w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)
    remote.add(store, 150)
    remote.corrupt(150)
    now = time.time()
    remote.put_state(0, {
        "run_id": "r1", "phase": "running", "attempt": 1, "restarts": 1, "preemptions": 0,
        "step": 160, "resumed_from_step": 100, "last_failure": None,
        "newest_local_step": 150, "newest_remote_step": 100, "mirror_lag_steps": 50,
        "started_at": now - 100, "updated_at": now - 1, "pid": 1,
        "nodes": [{"node_rank": 0, "heartbeat_age_s": 0.5, "phase": "running"}]})
    remote.put_state(1, {
        "run_id": "r1", "phase": "running", "attempt": 1, "restarts": 1, "preemptions": 0,
        "step": 170, "newest_local_step": None, "started_at": now - 100,
        "updated_at": now - 2, "pid": 2,
        "nodes": [{"node_rank": 1, "heartbeat_age_s": 1.0, "phase": "running"}]})
    return remote


def test_snapshots_mirror_lists_and_verifies_the_remote(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    remote = _remote_with_run(tmp_path)
    monkeypatch.setattr(cli, "open_remote", lambda url: remote)
    capsys.readouterr()
    assert cli.main(["snapshots", "--mirror", "s3://b/x", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["tier"], r["valid"]) for r in rows] == [(100, "remote", True),
                                                                 (150, "remote", True)]
    for r in rows:
        assert {"step", "tier", "valid", "digest", "bytes", "created_at", "path"} <= set(r)
    assert cli.main(["snapshots", "--mirror", "s3://b/x", "--verify", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["valid"] for r in rows] == [True, False] and "checksum" in rows[1]["reason"]
    # Both tiers at once, ordered by step (local before remote at the same step).
    assert cli.main(["snapshots", "--mirror", "s3://b/x", "--checkpoint-dir",
                     str(tmp_path / "ck"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["tier"]) for r in rows] == [
        (10, "local"), (20, "local"), (100, "local"), (100, "remote"), (150, "local"),
        (150, "remote")]
    assert cli.main(["snapshots", "--mirror", "s3://b/x"]) == 0
    assert "remote" in capsys.readouterr().out


def test_status_mirror_aggregates_every_node(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    remote = _remote_with_run(tmp_path)
    monkeypatch.setattr(cli, "open_remote", lambda url: remote)
    capsys.readouterr()
    assert cli.main(["status", "--mirror", "s3://b/x", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["run_id"], doc["phase"], doc["step"]) == ("r1", "running", 170)
    assert (doc["newest_local_step"], doc["newest_remote_step"], doc["mirror_lag_steps"]) == (
        150, 150, 0)
    assert [n["node_rank"] for n in doc["nodes"]] == [0, 1]
    assert doc["nodes"][0]["heartbeat_age_s"] >= 1.5
    assert doc["supervisor_alive"] is True
    assert cli.main(["status", "--mirror", "s3://b/x"]) == 0
    assert "newest_remote_step" in capsys.readouterr().out


def test_status_mirror_without_run(capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "open_remote", lambda url: FakeRemote())
    assert cli.main(["status", "--mirror", "s3://b/x"]) == 1
    assert "no run found on the mirror" in capsys.readouterr().err


def test_snapshots_needs_a_location(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["snapshots"]) == 2


def test_status_needs_exactly_one_location() -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["status"])
    assert exc.value.code == 2


def _snapshot_dir(tmp_path: Path) -> Path:
    ck = tmp_path / "ck"
    store = LocalSnapshotStore(str(ck))
    for step in (5, 10, 20, 100):
        w = store.begin(step)
        w.write_bytes("tensors.bin", bytes(32))
        w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)
    with open(Path(store.path(10)) / "tensors.bin", "r+b") as f:
        f.write(b"\x01")  # same size, wrong checksum
    os.remove(Path(store.path(20)) / "manifest.json")
    shutil.rmtree(store.path(5))
    os.makedirs(ck / "snapshots" / "junk")
    return ck


def test_snapshots_json_oldest_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = _snapshot_dir(tmp_path)
    capsys.readouterr()
    assert cli.main(["snapshots", "--checkpoint-dir", str(ck), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows] == [10, 20, 100]
    for r in rows:
        assert {"step", "tier", "valid", "digest", "bytes", "created_at", "path"} <= set(r)
        assert r["tier"] == "local" and r["verified"] is False
    # Without --verify only sizes are checked: the flipped byte goes unnoticed.
    assert [r["valid"] for r in rows] == [True, False, True]
    assert "manifest" in rows[1]["reason"]
    assert rows[2]["digest"] == DIGEST and rows[2]["bytes"] == 32


def test_snapshots_verify_checks_checksums(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    ck = _snapshot_dir(tmp_path)
    capsys.readouterr()
    assert cli.main(["snapshots", "--checkpoint-dir", str(ck), "--verify", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["valid"] for r in rows] == [False, False, True]
    assert "checksum" in rows[0]["reason"]
    assert all(r["verified"] for r in rows)


def test_snapshots_table_and_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = _snapshot_dir(tmp_path)
    capsys.readouterr()
    assert cli.main(["snapshots", "--checkpoint-dir", str(ck)]) == 0
    out = capsys.readouterr().out
    assert "100" in out and "NO" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["snapshots", "--checkpoint-dir", str(empty), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert not (empty / "snapshots").exists(), "a read-only command creates nothing"


def test_status_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = _snapshot_dir(tmp_path)
    capsys.readouterr()
    paths = RunPaths.of(str(ck))
    os.makedirs(paths.progress_dir)
    write_json_atomic(paths.state, {
        "run_id": "r1", "phase": "running", "attempt": 2, "restarts": 2, "preemptions": 0,
        "step": 40, "resumed_from_step": 10, "last_failure": "rank 1 killed by SIGKILL",
        "newest_local_step": 20, "newest_remote_step": None, "mirror_lag_steps": None,
        "started_at": 1.0, "updated_at": 2.0, "pid": 1,
        "nodes": [{"node_rank": 0, "heartbeat_age_s": 1.0, "phase": "running"}],
    })
    (Path(paths.progress_dir) / "rank-0.json").write_text(json.dumps(
        {"pid": 1, "rank": 0, "step": 45, "epoch": 0, "time": 1.0, "attempt": 2}))
    assert cli.main(["status", "--checkpoint-dir", str(ck), "--json", "--watch"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("run_id", "phase", "step", "restarts", "preemptions", "resumed_from_step",
                "last_failure", "newest_local_step", "newest_remote_step", "mirror_lag_steps",
                "nodes"):
        assert key in doc
    assert doc["step"] == 45
    assert doc["newest_local_step"] == 100
    assert doc["supervisor_alive"] is False
    assert doc["nodes"][0]["phase"] == "unknown"  # no supervisor holds the lock any more
    assert doc["nodes"][0]["heartbeat_age_s"] > 1000
    assert cli.main(["status", "--checkpoint-dir", str(ck)]) == 0
    assert "rank 1 killed by SIGKILL" in capsys.readouterr().out


def test_status_without_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--checkpoint-dir", str(tmp_path)]) == 1
    assert "no run found" in capsys.readouterr().err
    assert cli.main(["status", "--checkpoint-dir", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("command", [[], ["launch"], ["status"], ["snapshots"]])
def test_help_renders(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: orchestrator" in capsys.readouterr().out


def test_cli_never_imports_torch_or_trainer() -> None:
    code = (
        "import sys, orchestrator.cli, orchestrator.supervisor, orchestrator.launcher\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'trainer')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_status_pairs_not_alive_with_the_final_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The supervisor writes ``done`` and then releases its lock: if status reads the state first,
    it can print a stale ``running`` with ``supervisor_alive: false`` (and end ``--watch`` on it)."""
    from orchestrator import status

    ck = _snapshot_dir(tmp_path)
    capsys.readouterr()
    paths = RunPaths.of(str(ck))
    os.makedirs(paths.run_dir, exist_ok=True)
    write_json_atomic(paths.state, {"run_id": "r1", "phase": "running", "attempt": 0, "nodes": []})
    real_lock_is_held = status.lock_is_held

    def supervisor_finishes_now(path: str) -> bool:
        # The supervisor's last moments, between any two reads of status: final state, then exit.
        write_json_atomic(paths.state, {"run_id": "r1", "phase": "done", "attempt": 0, "nodes": []})
        return real_lock_is_held(path)

    monkeypatch.setattr(status, "lock_is_held", supervisor_finishes_now)
    assert cli.main(["status", "--checkpoint-dir", str(ck), "--json", "--watch"]) == 0
    frames = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert (frames[-1]["phase"], frames[-1]["supervisor_alive"]) == ("done", False)


def test_metrics_port_in_use_exits_2_before_anything_starts(
    tmp_path: Path, script: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ck = tmp_path / "ck"
        assert launch("--checkpoint-dir", str(ck), "--metrics-port", str(port), script) == 2
    assert str(port) in capsys.readouterr().err
    events = (ck / "run" / "events.jsonl")
    assert not events.exists() or "supervisor.started" not in events.read_text()
