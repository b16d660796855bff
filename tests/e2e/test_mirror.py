"""End-to-end mirror: real SeaweedFS S3 on loopback, real torchrun, faults in the network path.

Every run is compared with the uninterrupted golden run's digests: mirroring must never change
what is trained, and a node that lost its disk must continue bit-identically from the remote.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from contract.polling import wait_until
from tests.e2e import harness
from tests.support.conftest_plugin import S3Bucket, S3Proxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

MIRROR_ENV = {
    "ORCH_MIRROR_FLUSH_TIMEOUT_S": "60",
    "ORCH_MIRROR_RETRY_INITIAL_S": "0.2",
    "ORCH_MIRROR_RETRY_MAX_S": "1",
}


def _remote(url: str, env: dict[str, str]) -> dict[int, str]:
    return harness.digests(harness.snapshots(mirror=url, verify=True, env=env))


def _no_incomplete_uploads(s3: S3Bucket) -> None:
    client = s3.server.client()
    uploads = client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
    assert uploads == [], f"orphaned multipart uploads: {uploads}"


def test_wiped_local_dir_resumes_from_remote(
    golden: dict[int, str], s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    """A replacement node with an empty disk continues from the object store, bit-identically."""
    env = {**s3_bucket.server.env(), **MIRROR_ENV}
    first = tmp_path / "node-a"
    result = harness.launch(
        first, faults="step_end@73:rank=0", max_restarts=0, env=env,
        extra_launch=("--mirror", s3_bucket.url),
    )
    assert result.rc == 1, result.stderr[-3000:]
    assert sorted(_remote(s3_bucket.url, env)) == [20, 40, 60]
    shutil.rmtree(first)
    replacement = tmp_path / "node-b"
    result = harness.launch(replacement, env=env, extra_launch=("--mirror", s3_bucket.url))
    harness.assert_matches_golden(result, golden)
    st = result.status()
    assert st["resumed_from_step"] == 60
    assert st["newest_remote_step"] == harness.STEPS and st["mirror_lag_steps"] == 0
    remote = _remote(s3_bucket.url, env)
    assert remote[harness.STEPS] == golden[harness.STEPS]
    _no_incomplete_uploads(s3_bucket)


def test_corrupt_remote_snapshot_is_skipped(
    golden: dict[int, str], s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    env = {**s3_bucket.server.env(), **MIRROR_ENV}
    first = tmp_path / "node-a"
    harness.launch(first, faults="step_end@73:rank=0", max_restarts=0, env=env,
                   extra_launch=("--mirror", s3_bucket.url))
    client = s3_bucket.server.client()
    key = f"{s3_bucket.prefix}/snapshots/step-000000000060/tensors.bin"
    body = bytearray(client.get_object(Bucket=s3_bucket.bucket, Key=key)["Body"].read())
    body[len(body) // 3] ^= 0x10
    client.put_object(Bucket=s3_bucket.bucket, Key=key, Body=bytes(body))
    listed = {s["step"]: s for s in harness.snapshots(mirror=s3_bucket.url, env=env)}
    assert listed[60]["valid"] is False and listed[40]["valid"] is True
    shutil.rmtree(first)
    result = harness.launch(tmp_path / "node-b", env=env, extra_launch=("--mirror", s3_bucket.url))
    harness.assert_matches_golden(result, golden)
    assert result.status()["resumed_from_step"] == 40


# "refuse" (connection refused: a fast transient error, retried like a reset) is covered by
# test_remote_s3.py::test_connection_refused_transient_and_fast with
# test_orchestrator_mirror.py::test_transient_errors_are_retried_with_events and, through the
# real CLI, test_cli_mirror.py::test_resets_mid_upload_are_retried.
@pytest.mark.parametrize("fault", ["blackhole", "reset"])
def test_endpoint_outage_never_blocks_training(
    golden: dict[int, str], s3_proxy: S3Proxy, tmp_path: Path, fault: str
) -> None:
    """The endpoint fails for a while mid-run: training finishes unchanged, the mirror catches up."""
    env = {**s3_proxy.env(), **MIRROR_ENV, "ORCH_REMOTE_CONNECT_TIMEOUT_S": "1",
           "ORCH_REMOTE_READ_TIMEOUT_S": "2"}
    ckpt = tmp_path / "ckpt"
    outage_seen = threading.Event()

    def outage() -> None:
        wait_until(lambda: (p := harness.progress(ckpt, 0)) and p["step"] >= 15,
                   timeout=120, what="training to start")
        if fault == "reset":
            s3_proxy.proxy.reset(after_bytes=100_000)  # mid-object: uploads die half-way
        else:
            getattr(s3_proxy.proxy, fault)()
        if fault == "blackhole":
            s3_proxy.proxy.reset_all()
        outage_seen.set()
        time.sleep(4)  # the outage itself: a span of wall time, not synchronisation
        s3_proxy.proxy.passthrough()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    result = harness.launch(ckpt, env=env, extra_launch=("--mirror", s3_proxy.url),
                            script_args=("--step-delay", "0.05"))
    thread.join(timeout=60)
    assert outage_seen.is_set()
    harness.assert_matches_golden(result, golden)
    remote = _remote(s3_proxy.url, s3_proxy.server.env())
    assert remote[harness.STEPS] == golden[harness.STEPS], sorted(remote)
    for step, digest in remote.items():
        assert digest == golden[step]
    _no_incomplete_uploads(S3Bucket(s3_proxy.server, s3_proxy.bucket, s3_proxy.url))


def test_supervisor_killed_mid_upload_next_launch_completes(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    """SIGKILL of the supervisor inside a multipart upload: the next launch finishes the job.

    A GPT-style model whose snapshot (~12 MB) spans several 5 MiB parts (S3's minimum part
    size, which SeaweedFS enforces), so the kill lands with a multipart upload in flight.
    """
    env = harness.base_env(**s3_bucket.server.env(), **MIRROR_ENV,
                           ORCH_REMOTE_MULTIPART_THRESHOLD=str(5 << 20),
                           ORCH_REMOTE_PART_SIZE=str(5 << 20))
    ckpt = tmp_path / "ckpt"
    args = [
        *harness.ORCH, "launch", "--nproc-per-node", "2", "--checkpoint-dir", str(ckpt),
        "--checkpoint-every", "10", "--mirror", s3_bucket.url, str(harness.REPO / "examples" /
        "synthetic_lm.py"), "--size", "tiny", "--d-model", "128", "--layers", "4", "--heads", "4",
        "--vocab", "1024", "--steps", "30", "--seed", "3",
    ]
    killed = subprocess.run(args, env={**env, "ORCH_FAULTS": "mirror_after_part@10"},
                            cwd=harness.REPO, capture_output=True, text=True, timeout=240)
    assert killed.returncode == -9, killed.stderr[-3000:]
    client = s3_bucket.server.client()
    in_flight = client.list_multipart_uploads(Bucket=s3_bucket.bucket).get("Uploads", [])
    assert in_flight, "the kill should have left a multipart upload behind"
    assert 10 not in _remote(s3_bucket.url, env)
    result = subprocess.run(args, env=env, cwd=harness.REPO, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    local = harness.digests(harness.snapshots(ckpt))
    remote = _remote(s3_bucket.url, env)
    assert sorted(remote) == sorted(local) == [10, 20, 30], (sorted(local), sorted(remote))
    assert remote == local
    _no_incomplete_uploads(s3_bucket)
