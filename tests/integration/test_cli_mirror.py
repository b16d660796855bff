"""``orchestrator launch --mirror`` end to end: real CLI, real torchrun, real SeaweedFS S3.

The training script is plain Python (no torch): a deterministic hash chain stands for the model
state, one step at a time, and rank 0 writes real snapshots with ``storage.LocalSnapshotStore``
every few steps. The final chain value is the run's "digest": a resumed run must end with the
same value as an uninterrupted one, whichever tier it resumed from. Faults on the object store
come from the TCP fault proxy of tests/support.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contract.polling import wait_until
from orchestrator.launcher import find_processes
from tests.support import cli as support_cli

WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    from storage import LocalSnapshotStore

    rank = int(os.environ["RANK"])
    attempt = int(os.environ["ORCH_ATTEMPT"])
    ckpt = os.environ["ORCH_CHECKPOINT_DIR"]
    total, every, pad, nap = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    store = LocalSnapshotStore(ckpt)
    resume = os.environ.get("ORCH_RESUME_STEP", "none")
    if resume == "none":
        step, state = 0, bytes(32)
    else:
        step = int(resume)
        state = store.open_verified(step, "state.bin")
    print(f"rank {rank} attempt {attempt} resume={resume}", flush=True)
    os.makedirs(f"{ckpt}/run/progress", exist_ok=True)
    while step < total:
        step += 1
        state = hashlib.sha256(state + step.to_bytes(8, "little")).digest()
        beat = {"pid": os.getpid(), "rank": rank, "step": step, "epoch": 0,
                "time": time.time(), "attempt": attempt}
        tmp = f"{ckpt}/run/progress/.rank-{rank}.tmp"
        with open(tmp, "w") as f:
            json.dump(beat, f)
        os.replace(tmp, f"{ckpt}/run/progress/rank-{rank}.json")
        if rank == 0 and every and step % every == 0:
            w = store.begin(step)
            w.write_bytes("state.bin", state)
            w.write_bytes("pad.bin", hashlib.sha256(state).digest() * (pad // 32))
            w.commit(run_id=os.environ["ORCH_RUN_ID"], epoch=0,
                     world_size=int(os.environ["WORLD_SIZE"]),
                     digest="sha256:" + hashlib.sha256(state).hexdigest())
        time.sleep(nap)
    if rank == 0:
        with open(f"{ckpt}/final.txt", "w") as f:
            f.write(state.hex())
    """
)


def golden(total: int) -> str:
    state = bytes(32)
    for step in range(1, total + 1):
        state = hashlib.sha256(state + step.to_bytes(8, "little")).digest()
    return state.hex()


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "worker.py").write_text(WORKER)
    yield tmp_path
    ck = str(tmp_path / "ck")
    leftovers = find_processes({"ORCH_CHECKPOINT_DIR": ck})
    for pid in leftovers:
        os.kill(pid, 9)
    assert leftovers == [], "processes of the run were left behind"


#: Mirror tunables shrunk so retries, scans and flushes happen within a test.
MIRROR_FAST = {
    "ORCH_SCAN_INTERVAL_S": "0.2",
    "ORCH_MIRROR_RETRY_INITIAL_S": "0.1",
    "ORCH_MIRROR_RETRY_MAX_S": "0.5",
    "ORCH_MIRROR_RETRY_JITTER_S": "0.1",
    "ORCH_MIRROR_PREFLIGHT_ATTEMPTS": "2",
    "ORCH_STATE_MIRROR_INTERVAL_S": "0.5",
    "ORCH_MIRROR_FLUSH_TIMEOUT_S": "60",
    "ORCH_REMOTE_CONNECT_TIMEOUT_S": "1",
    "ORCH_REMOTE_READ_TIMEOUT_S": "2",
}


def env(s3: dict[str, str], **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return support_cli.env(base=base, **{**s3, **MIRROR_FAST, **extra})


def orch(run_dir: Path, s3: dict[str, str], *args: str, timeout: float = 120,
         **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env(s3, **extra),
                          capture_output=True, text=True, timeout=timeout, cwd=run_dir,
                          check=False)


def launch(run_dir: Path, s3: dict[str, str], url: str, *script: str, extra_flags: tuple[str, ...] = (),
           timeout: float = 120, **extra: str) -> subprocess.CompletedProcess[str]:
    return orch(run_dir, s3, "launch", "--nproc-per-node", "1", "--checkpoint-dir",
                str(run_dir / "ck"), "--mirror", url, *extra_flags, "worker.py", *script,
                timeout=timeout, **extra)


def events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "ck" / "run" / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def named(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in events(run_dir) if e["event"] == name]


def state(run_dir: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((run_dir / "ck" / "run" / "state.json").read_text())
    return doc


def remote_rows(run_dir: Path, s3: dict[str, str], url: str, *flags: str) -> list[dict[str, Any]]:
    out = orch(run_dir, s3, "snapshots", "--mirror", url, "--json", *flags, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


@pytest.mark.timeout(180)
def test_every_snapshot_mirrored_then_resume_from_remote_after_wipe(run_dir: Path,
                                                                    s3_bucket: Any) -> None:
    server, _bucket, url = s3_bucket
    s3 = server.env()
    out = launch(run_dir, s3, url, "6", "2", "4096", "0.05")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run_dir / "ck" / "final.txt").read_text() == golden(6)
    rows = remote_rows(run_dir, s3, url, "--verify")
    assert [(r["step"], r["tier"], r["valid"]) for r in rows] == [
        (2, "remote", True), (4, "remote", True), (6, "remote", True)]
    up = named(run_dir, "mirror.uploaded")
    assert sorted(e["step"] for e in up) == [2, 4, 6]
    assert all(e["bytes"] > 4096 and e["seconds"] >= 0 for e in up)
    s = state(run_dir)
    assert (s["newest_local_step"], s["newest_remote_step"], s["mirror_lag_steps"]) == (6, 6, 0)
    status = orch(run_dir, s3, "status", "--mirror", url, "--json", timeout=60)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert (doc["phase"], doc["newest_remote_step"], doc["mirror_lag_steps"]) == ("done", 6, 0)
    assert "secret" not in out.stderr.lower() or s3["AWS_SECRET_ACCESS_KEY"] not in out.stderr

    # A replacement node: empty local disk, same mirror. It resumes from step 6 and finishes
    # with the golden digest.
    shutil.rmtree(run_dir / "ck")
    out = launch(run_dir, s3, url, "10", "2", "4096", "0.0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run_dir / "ck" / "final.txt").read_text() == golden(10)
    s = state(run_dir)
    assert s["resumed_from_step"] == 6
    done = named(run_dir, "restore.downloaded")
    assert done and done[0]["step"] == 6 and done[0]["bytes"] > 4096
    assert sorted(r["step"] for r in remote_rows(run_dir, s3, url)) == [2, 4, 6, 8, 10]
    assert s3["AWS_SECRET_ACCESS_KEY"] not in out.stderr


@pytest.mark.timeout(120)
def test_keep_remote_prunes_the_remote(run_dir: Path, s3_bucket: Any) -> None:
    server, _bucket, url = s3_bucket
    s3 = server.env()
    out = launch(run_dir, s3, url, "8", "2", "1024", "0.05", extra_flags=("--keep-remote", "2"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["step"] for r in remote_rows(run_dir, s3, url)] == [6, 8]
    assert any(e["tier"] == "remote" for e in named(run_dir, "retention.deleted"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["bad_credentials", "missing_bucket"])
def test_preflight_failure_exits_2_fast_and_launches_nothing(run_dir: Path, s3_bucket: Any,
                                                             case: str) -> None:
    server, bucket, url = s3_bucket
    s3 = server.env()
    if case == "bad_credentials":
        s3 = {**s3, "AWS_SECRET_ACCESS_KEY": "not-the-secret-0123456789"}
    else:
        url = url.replace(bucket, bucket + "-missing")
    started = time.monotonic()
    out = launch(run_dir, s3, url, "4", "2", "64", "0.0", timeout=60)
    elapsed = time.monotonic() - started
    assert out.returncode == 2, out.stderr[-2000:]
    assert elapsed < 15, f"preflight took {elapsed:.1f}s"
    assert "--mirror" in out.stderr
    assert s3["AWS_SECRET_ACCESS_KEY"] not in out.stderr
    assert not (run_dir / "ck" / "run" / "logs").exists(), "a worker was started"
    assert not (run_dir / "ck" / "final.txt").exists()


@pytest.mark.timeout(60)
def test_unreachable_endpoint_exits_2(run_dir: Path, s3_proxy: Any) -> None:
    s3_proxy.refuse()
    started = time.monotonic()
    out = launch(run_dir, s3_proxy.env(), s3_proxy.url, "4", "2", "64", "0.0", timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "unreachable" in out.stderr
    assert time.monotonic() - started < 30
    assert not (run_dir / "ck" / "run" / "logs").exists()


def _wait_for_event(run_dir: Path, name: str, timeout_s: float) -> None:
    wait_until(lambda: named(run_dir, name), timeout=timeout_s, what=f"a {name} event")


@pytest.mark.timeout(180)
def test_blackholed_endpoint_never_blocks_training(run_dir: Path, s3_proxy: Any) -> None:
    s3 = s3_proxy.env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "launch", "--nproc-per-node", "1",
         "--checkpoint-dir", str(run_dir / "ck"), "--mirror", s3_proxy.url, "worker.py",
         "20", "2", "2048", "0.1"],
        env=env(s3, ORCH_MIRROR_FLUSH_TIMEOUT_S="1"), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, cwd=run_dir)
    try:
        # Preflight went through; black-hole the endpoint as soon as the workers run.
        _wait_for_event(run_dir, "supervisor.attempt_started", 60)
        s3_proxy.blackhole()
        started = time.monotonic()
        _, err = proc.communicate(timeout=120)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err[-3000:]
    # 20 steps of 0.1 s: training itself never waited for the object store (flush 1 s, close 5 s
    # and torchrun's start/stop are the rest).
    assert elapsed < 30, f"launch took {elapsed:.1f}s after the blackhole"
    assert (run_dir / "ck" / "final.txt").read_text() == golden(20)
    s = state(run_dir)
    assert s["mirror_lag_steps"] > 0 and s["mirror_pending_steps"]
    assert named(run_dir, "mirror.behind")
    # Nothing partial is ever listed valid.
    for r in remote_rows(run_dir, s3_proxy.server.env() | {"AWS_ENDPOINT_URL":
                                                           s3_proxy.server.endpoint_url},
                         s3_proxy.url, "--verify"):
        assert r["valid"] is True

    # The endpoint is back: the next launch finishes what is missing (idempotent rescan).
    s3_proxy.passthrough()
    s3_proxy.reset_all()
    out = launch(run_dir, s3, s3_proxy.url, "20", "2", "2048", "0.0")
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [r["step"] for r in remote_rows(run_dir, s3, s3_proxy.url, "--verify")]
    assert steps == list(range(2, 21, 2))
    assert state(run_dir)["mirror_lag_steps"] == 0


@pytest.mark.timeout(180)
def test_resets_mid_upload_are_retried(run_dir: Path, s3_proxy: Any) -> None:
    s3 = s3_proxy.env()
    # Let the preflight through, then reset three uploads mid-stream (50 kB into each), then
    # let the endpoint heal: the mirror retries and every snapshot arrives whole.
    def chaos(stop: threading.Event) -> None:
        _wait_for_event(run_dir, "supervisor.attempt_started", 60)
        for n in range(1, 4):
            s3_proxy.reset(after_bytes=50_000, direction="up", once=True)
            while s3_proxy.resets < n and not stop.is_set():
                stop.wait(0.05)

    stop = threading.Event()
    t = threading.Thread(target=chaos, args=(stop,), daemon=True)
    t.start()
    try:
        out = launch(run_dir, s3, s3_proxy.url, "8", "2", "200000", "0.05")
    finally:
        stop.set()
        t.join(10)
        s3_proxy.passthrough()
    assert out.returncode == 0, out.stderr[-3000:]
    rows = remote_rows(run_dir, s3, s3_proxy.url, "--verify")
    assert [(r["step"], r["valid"]) for r in rows] == [(2, True), (4, True), (6, True), (8, True)]
    assert s3_proxy.resets >= 1 and named(run_dir, "mirror.retry")
