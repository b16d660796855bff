"""Leaked uploads (issue 13, point 5): a run leaves no incomplete multipart upload of its own.

Real SeaweedFS on loopback behind the TCP fault proxy; real multipart uploads of 5 MiB parts.
The tester's case: the endpoint goes away in the middle of a multipart upload (a reset mid-part,
then every connection reset or refused while it "restarts"), so the abort of that upload fails
too (``remote.multipart_abort_failed``). The mirror retries the upload and aborts the leaked one
with its transient-retry policy; the final flush lists and aborts what is left of the run's own
(never another run's, never another node's live upload); an unreachable endpoint at the end
bounds that pass by the flush timeout and never changes the exit code.

The outcome is read from the server itself (``list_multipart_uploads`` straight to it, past the
proxy), never from our own bookkeeping. No timed assertions: every wait is bounded and the
test timeout catches a hang.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from contract.polling import wait_until
from orchestrator.mirror import Mirror, finish_mirror
from orchestrator.settings import Settings
from storage import LocalSnapshotStore, Manifest, StorageSettings, TransientStorageError
from storage.objectstore import S3ObjectStore
from storage.remote import RemoteSnapshotStore
from tests.integration.test_cli_mirror import WORKER, env, named
from tests.support import cli as support_cli
from tests.support.conftest_plugin import S3Proxy

pytestmark = pytest.mark.timeout(90)

MiB = 1024 * 1024
DIGEST = "sha256:" + "cd" * 32
# 5 MiB parts (the S3 minimum): a 12 MiB file is a 3-part upload; short timeouts keep a dead
# endpoint's calls short.
STORAGE = StorageSettings(
    remote_part_size=5 * MiB,
    remote_multipart_threshold=5 * MiB,
    remote_concurrency=2,
    remote_connect_timeout_s=1.0,
    remote_read_timeout_s=3.0,
)
MIRROR = Settings(
    mirror_retry_initial_s=0.1, mirror_retry_max_s=0.3, mirror_retry_jitter_s=0.05,
    mirror_permanent_retry_s=30.0, mirror_flush_timeout_s=30.0, mirror_preflight_attempts=2,
)


@dataclass
class Events:
    """The mirror's event sink, in memory."""

    lines: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def emit(self, event: str, **fields: Any) -> None:
        with self.lock:
            self.lines.append({"event": event, **fields})

    def named(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.lines if e["event"] == name]


def commit(store: LocalSnapshotStore, step: int, size: int) -> Manifest:
    w = store.begin(step)
    w.write_bytes("tree.json", b'{"step": %d}' % step)
    w.write_bytes("tensors.bin", os.urandom(size))
    return w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)


def server_uploads(proxy: S3Proxy, prefix: str = "") -> list[str]:
    """Keys of the incomplete multipart uploads the server holds under ``prefix``."""
    client = proxy.direct_client(retries={"max_attempts": 1}, read_timeout=10)
    resp = client.list_multipart_uploads(Bucket=proxy.bucket, Prefix=prefix)
    return sorted(u["Key"] for u in resp.get("Uploads", []))


def start_foreign_upload(proxy: S3Proxy, key: str) -> None:
    """An incomplete upload with one part, by another writer (straight to the server)."""
    client = proxy.direct_client(retries={"max_attempts": 1}, read_timeout=10)
    uid = client.create_multipart_upload(Bucket=proxy.bucket, Key=key)["UploadId"]
    client.upload_part(Bucket=proxy.bucket, Key=key, UploadId=uid, PartNumber=1,
                       Body=b"p" * (5 * MiB))


@pytest.fixture
def aws(s3_proxy: S3Proxy, monkeypatch: pytest.MonkeyPatch) -> S3Proxy:
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_proxy.env().items():
        monkeypatch.setenv(k, v)
    return s3_proxy


@pytest.fixture
def remote(aws: S3Proxy) -> Iterator[RemoteSnapshotStore]:
    r = RemoteSnapshotStore(aws.url, settings=STORAGE)
    yield r
    assert isinstance(r.store, S3ObjectStore)
    r.store.close()


def s3_store(remote: RemoteSnapshotStore) -> S3ObjectStore:
    assert isinstance(remote.store, S3ObjectStore)
    return remote.store


def make_mirror(remote: RemoteSnapshotStore, local: LocalSnapshotStore, events: Events,
                **kw: Any) -> Mirror:
    return Mirror(remote=remote, local=local, events=events, settings=MIRROR, **kw)


def finish(mirror: Mirror, events: Events, timeout_s: float = 30.0) -> None:
    finish_mirror(mirror, timeout_s=timeout_s, abort=lambda: False, events=events,
                  newest_local=None, publish_final=lambda: None)


def leak_one_upload(remote: RemoteSnapshotStore, proxy: S3Proxy, local: LocalSnapshotStore,
                    step: int) -> None:
    """An upload of ours whose abort fails: reset 7 MiB into it, the endpoint gone after."""
    proxy.reset(after_bytes=7 * MiB)
    try:
        with pytest.raises(TransientStorageError):
            remote.upload(local, step)
    finally:
        proxy.passthrough()
    assert len(s3_store(remote).abandoned_uploads()) == 1


def test_endpoint_restart_mid_multipart_leaves_no_upload(
    aws: S3Proxy, remote: RemoteSnapshotStore, tmp_path: Path
) -> None:
    """The tester's case: the mirror's own upload is cut mid-part, its abort cannot get
    through; once the endpoint is back the upload is retried and the leak aborted."""
    local = LocalSnapshotStore(str(tmp_path / "ck"))
    commit(local, 8, 12 * MiB)
    events = Events()
    mirror = make_mirror(remote, local, events)
    mirror.start()
    assert mirror.flush(20)  # the start-up rescan is done before the fault
    # The endpoint dies 7 MiB into the upload and stays dead (every connection reset): the
    # failed upload's abort fails as well.
    aws.reset(after_bytes=7 * MiB)
    mirror.notify([8])
    try:
        wait_until(lambda: events.named("mirror.retry"), timeout=30, what="a failed attempt")
        assert s3_store(remote).abandoned_uploads(), "the abort should have failed"
        # The "restart": refused for a moment, then back.
        aws.refuse()
        wait_until(lambda: len(events.named("mirror.retry")) >= 2, timeout=30,
                   what="a refused attempt")
    finally:
        aws.passthrough()
    assert mirror.flush(30)
    finish(mirror, events)
    assert server_uploads(aws) == []
    aborted = events.named("mirror.uploads_aborted")
    assert aborted and aborted[0]["count"] >= 1 and aborted[0]["final"] is False
    assert s3_store(remote).abandoned_uploads() == []
    assert remote.validate(8, verify_checksums=True).valid
    assert events.named("mirror.flushed") and not events.named("mirror.uploads_abort_failed")


def test_final_flush_aborts_the_runs_own_uploads_and_no_one_elses(
    aws: S3Proxy, remote: RemoteSnapshotStore, tmp_path: Path
) -> None:
    """Single node: every upload under the run's snapshots/ (it is the only writer), e.g. one
    whose create got through although its answer was lost; another run's, never."""
    prefix = aws.url.split("/", 3)[3]
    local = LocalSnapshotStore(str(tmp_path / "ck"))
    events = Events()
    mirror = make_mirror(remote, local, events)
    mirror.start()
    assert mirror.flush(20)
    start_foreign_upload(aws, f"{prefix}/snapshots/step-000000000004/tensors.bin")
    start_foreign_upload(aws, f"{prefix}2/snapshots/step-000000000004/tensors.bin")  # other run
    finish(mirror, events)
    assert server_uploads(aws) == [f"{prefix}2/snapshots/step-000000000004/tensors.bin"]
    [done] = events.named("mirror.uploads_aborted")
    assert (done["count"], done["final"]) == (1, True)


def test_multi_node_final_flush_aborts_only_what_it_started(
    aws: S3Proxy, remote: RemoteSnapshotStore, tmp_path: Path
) -> None:
    """Several nodes share the prefix: a live upload of another node survives the final pass,
    this node's leaked one (its abort failed) is aborted by id, however young."""
    prefix = aws.url.split("/", 3)[3]
    local = LocalSnapshotStore(str(tmp_path / "ck"))
    commit(local, 6, 12 * MiB)
    events = Events()
    mirror = make_mirror(remote, local, events, stale_upload_age_s=3600.0)
    mirror.start()
    assert mirror.flush(20)
    leak_one_upload(remote, aws, local, 6)
    other_node = f"{prefix}/snapshots/step-000000000010/tensors.bin"
    start_foreign_upload(aws, other_node)
    finish(mirror, events)
    assert server_uploads(aws) == [other_node]
    [done] = events.named("mirror.uploads_aborted")
    assert (done["count"], done["final"]) == (1, True)


def test_an_abort_failing_once_is_retried(
    aws: S3Proxy, remote: RemoteSnapshotStore, tmp_path: Path
) -> None:
    local = LocalSnapshotStore(str(tmp_path / "ck"))
    commit(local, 6, 12 * MiB)
    events = Events()
    mirror = make_mirror(remote, local, events, stale_upload_age_s=3600.0)
    mirror.start()
    assert mirror.flush(20)
    leak_one_upload(remote, aws, local, 6)
    assert len(server_uploads(aws)) == 1
    resets = aws.resets
    aws.reset(once=True)  # the next request (the abort by id) is reset, then the endpoint heals
    finish(mirror, events)
    assert server_uploads(aws) == []
    retries = [e for e in events.named("mirror.retry") if e.get("op") == "abort_uploads"]
    assert len(retries) == 1 and aws.resets == resets + 1
    [done] = events.named("mirror.uploads_aborted")
    assert (done["count"], done["final"]) == (1, True)
    assert not events.named("mirror.uploads_abort_failed")


@pytest.mark.parametrize("outage", ["refuse", "blackhole"])
def test_unreachable_endpoint_at_the_end_is_bounded(
    aws: S3Proxy, remote: RemoteSnapshotStore, tmp_path: Path, outage: str
) -> None:
    """The leak cannot be aborted: the final pass gives up within the flush timeout, says so,
    and raises nothing; the next launch's rescan aborts it."""
    local = LocalSnapshotStore(str(tmp_path / "ck"))
    commit(local, 6, 12 * MiB)
    events = Events()
    mirror = make_mirror(remote, local, events)
    mirror.start()
    assert mirror.flush(20)
    leak_one_upload(remote, aws, local, 6)
    getattr(aws, outage)()
    aws.reset_all()
    try:
        finish(mirror, events, timeout_s=3.0)
    finally:
        aws.passthrough()
        aws.reset_all()
    [failed] = events.named("mirror.uploads_abort_failed")
    assert failed["final"] is True and failed["permanent"] is False
    assert events.named("mirror.flushed")
    assert len(server_uploads(aws)) == 1
    # The next launch's rescan (a fresh process: nothing remembered) removes it.
    again = RemoteSnapshotStore(aws.url, settings=STORAGE)
    try:
        assert again.abort_incomplete_uploads() == 1
    finally:
        s3_store(again).close()
    assert server_uploads(aws) == []


# -- the real launch ---------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    yield from support_cli.run_dir(tmp_path, WORKER)


def launch(run_dir: Path, proxy: S3Proxy, *script: str, **extra: str) -> subprocess.Popen[str]:
    # Parts of 5 MiB, so the worker's 12 MiB snapshots are multipart uploads.
    e = env(proxy.env(), ORCH_REMOTE_PART_SIZE=str(5 * MiB),
            ORCH_REMOTE_MULTIPART_THRESHOLD=str(5 * MiB), **extra)
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "launch", "--nproc-per-node", "1",
         "--checkpoint-dir", str(run_dir / "ck"), "--mirror", proxy.url, "worker.py", *script],
        env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=run_dir)


def finished(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=75)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return proc.returncode, err


def test_launch_with_a_restart_mid_upload_leaves_no_upload(run_dir: Path, s3_proxy: S3Proxy) -> None:
    # 4 steps, a 12 MiB snapshot every 2: the first upload is cut 7 MiB in, the endpoint stays
    # dead (the abort fails), "restarts" (refused), then comes back.
    proc = launch(run_dir, s3_proxy, "4", "2", str(12 * MiB), "0.5")
    try:
        wait_until(lambda: named(run_dir, "mirror.rescanned"), timeout=60, what="the rescan")
        s3_proxy.reset(after_bytes=7 * MiB)
        wait_until(lambda: named(run_dir, "mirror.retry"), timeout=60, what="a failed upload")
        s3_proxy.refuse()
        wait_until(lambda: len(named(run_dir, "mirror.retry")) >= 2, timeout=30,
                   what="a refused attempt")
    finally:
        s3_proxy.passthrough()
    code, err = finished(proc)
    assert code == 0, err[-3000:]
    assert "remote.multipart_abort_failed" in err  # the tester's precondition
    assert server_uploads(s3_proxy) == []
    assert named(run_dir, "mirror.uploads_aborted")
    assert named(run_dir, "mirror.flushed")


@pytest.mark.parametrize("outage", ["refuse", "blackhole"])
def test_launch_exit_code_unchanged_when_the_endpoint_is_gone_at_the_end(
    run_dir: Path, s3_proxy: S3Proxy, outage: str
) -> None:
    # No snapshots (every=0): nothing to upload, so the final abort pass itself meets the
    # dead endpoint; it must end within the flush timeout and leave the exit code 0.
    proc = launch(run_dir, s3_proxy, "10", "0", "0", "0.2", ORCH_MIRROR_FLUSH_TIMEOUT_S="3")
    try:
        wait_until(lambda: named(run_dir, "mirror.rescanned"), timeout=60, what="the rescan")
        getattr(s3_proxy, outage)()
        s3_proxy.reset_all()  # refused means pooled connections too: the server is gone
        code, err = finished(proc)
    finally:
        s3_proxy.passthrough()
        s3_proxy.reset_all()
    assert code == 0, err[-3000:]
    [failed] = named(run_dir, "mirror.uploads_abort_failed")
    assert failed["final"] is True and failed["permanent"] is False
    assert (run_dir / "ck" / "final.txt").exists()
