"""The mirror under a bandwidth cap and low priority, against the real S3 server (SeaweedFS).

No assertion on speed: a capped upload must still produce a valid remote snapshot (every
object's checksum verified by re-reading it), every byte must have gone through the shared
bucket exactly once, the priority setter must have run in the worker thread and in the object
store's part threads, and ``close()`` must cut a slow capped upload short without leaving a
multipart upload behind.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contract.polling import wait_until
from orchestrator.mirror import Mirror
from orchestrator.settings import load_settings
from storage import LocalSnapshotStore, Manifest, StorageSettings
from storage.objectstore import S3ObjectStore
from storage.remote import RemoteSnapshotStore
from tests.support.conftest_plugin import S3Bucket
from tests.support.s3server import S3Server

MiB = 1024 * 1024
DIGEST = "sha256:" + "ef" * 32
SETTINGS = StorageSettings(
    remote_part_size=5 * MiB,
    remote_multipart_threshold=5 * MiB,
    remote_concurrency=3,
    remote_connect_timeout_s=2.0,
    remote_read_timeout_s=10.0,
)
FAST = {"ORCH_MIRROR_RETRY_INITIAL_S": "0.05", "ORCH_MIRROR_RETRY_MAX_S": "0.2",
        "ORCH_MIRROR_RETRY_JITTER_S": "0"}


class Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        with self._lock:
            self.events.append((event, fields))


@pytest.fixture
def remote(s3_env: S3Server, s3_bucket: S3Bucket) -> Iterator[RemoteSnapshotStore]:
    r = RemoteSnapshotStore(s3_bucket.url, settings=SETTINGS)
    yield r
    assert isinstance(r.store, S3ObjectStore)
    r.store.close()


def commit(store: LocalSnapshotStore, step: int, size: int) -> Manifest:
    w = store.begin(step)
    w.write_bytes("tree.json", b'{"step": %d}' % step)
    w.write_bytes("tensors.bin", os.urandom(size))
    return w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)


@pytest.mark.timeout(120)
def test_capped_low_priority_upload_is_a_valid_snapshot(
    remote: RemoteSnapshotStore, tmp_path: Path
) -> None:
    local = LocalSnapshotStore(str(tmp_path / "local"))
    manifest = commit(local, 7, 12 * MiB)  # a 3-part multipart upload + a single PUT
    lowered: list[str] = []
    lock = threading.Lock()

    def lower() -> None:
        with lock:
            lowered.append(threading.current_thread().name)

    settings = load_settings({**FAST, "ORCH_MIRROR_MAX_MBPS": "40", "ORCH_MIRROR_NICE": "1"})
    events = Events()
    mirror = Mirror(remote=remote, local=local, events=events, settings=settings,
                    lower_priority=lower)
    assert mirror.bucket.rate_bps == 40e6
    mirror.start()
    try:
        mirror.notify([7])
        assert mirror.flush(90.0), mirror.error
    finally:
        mirror.close()
    assert [e for e, _ in events.events if e == "mirror.uploaded"] == ["mirror.uploaded"]
    info = remote.validate(7, verify_checksums=True)
    assert info.valid, info.reason
    assert info.manifest == manifest
    # Every data byte went through the shared bucket, once (the manifest is a small PUT).
    assert mirror.bucket.granted == manifest.total_bytes
    assert "orchestrator-mirror" in lowered
    assert any(n.startswith("s3-upload-part") for n in lowered)


@pytest.mark.timeout(120)
def test_close_cuts_a_capped_upload_short(
    remote: RemoteSnapshotStore, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    local = LocalSnapshotStore(str(tmp_path / "local"))
    commit(local, 9, 12 * MiB)
    # 0.2 MB/s: the upload would take a minute; close() must not wait for it.
    settings = load_settings({**FAST, "ORCH_MIRROR_MAX_MBPS": "0.2"})
    mirror = Mirror(remote=remote, local=local, events=Events(), settings=settings)
    mirror.start()
    mirror.notify([9])
    wait_until(lambda: mirror.bucket.granted > 0, timeout=60, what="the capped upload started")
    mirror.close(timeout_s=30.0)
    assert mirror._thread is not None and not mirror._thread.is_alive()
    assert mirror.error is None  # an interrupted wait is a clean stop, not a crash
    client = s3_bucket.server.client()
    assert client.list_multipart_uploads(Bucket=s3_bucket.bucket).get("Uploads", []) == []
    assert remote.list() == []
