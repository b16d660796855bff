"""The remote tier against a real S3 server (SeaweedFS on loopback) and a TCP fault proxy.

moto does not check checksums; SeaweedFS does (400 BadDigest on a wrong ChecksumSHA256), and it
implements If-None-Match, multipart uploads and their listing/abort like S3.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage import (
    CorruptSnapshot,
    LocalSnapshotStore,
    Manifest,
    PermanentStorageError,
    StorageSettings,
    TransientStorageError,
)
from storage.objectstore import S3ObjectStore, open_object_store
from storage.remote import RemoteSnapshotStore
from tests.support.conftest_plugin import S3Bucket, S3Proxy
from tests.support.s3server import S3Server

MiB = 1024 * 1024
DIGEST = "sha256:" + "ab" * 32
# Parts of 5 MiB (the S3 minimum) so that a 12 MiB file is a 3-part multipart upload.
SETTINGS = StorageSettings(
    remote_part_size=5 * MiB,
    remote_multipart_threshold=5 * MiB,
    remote_concurrency=3,
    remote_connect_timeout_s=2.0,
    remote_read_timeout_s=10.0,
)


def commit(store: LocalSnapshotStore, step: int, size: int) -> Manifest:
    w = store.begin(step)
    w.write_bytes("tree.json", b'{"step": %d}' % step)
    w.write_bytes("tensors.bin", os.urandom(size))
    return w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)


def uploads(client: Any, bucket: str) -> list[dict[str, Any]]:
    return list(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


@pytest.fixture
def remote(s3_env: S3Server, s3_bucket: S3Bucket) -> Iterator[RemoteSnapshotStore]:
    r = RemoteSnapshotStore(s3_bucket.url, settings=SETTINGS)
    yield r
    assert isinstance(r.store, S3ObjectStore)
    r.store.close()


@pytest.mark.timeout(120)
def test_multipart_round_trip(
    remote: RemoteSnapshotStore, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    src = LocalSnapshotStore(str(tmp_path / "src"))
    m = commit(src, 20, 12 * MiB + 123)
    remote.preflight()
    res = remote.upload(src, 20)
    assert not res.skipped and res.bytes == m.total_bytes
    client = s3_bucket.server.client()
    assert uploads(client, s3_bucket.bucket) == []
    head = client.head_object(
        Bucket=s3_bucket.bucket, Key="run/snapshots/step-000000000020/tensors.bin"
    )
    assert head["ContentLength"] == 12 * MiB + 123
    assert head["ETag"].endswith('-3"')  # three parts
    assert remote.upload(src, 20).skipped

    [info] = remote.list()
    assert info.step == 20 and info.valid is None and info.digest == DIGEST
    assert remote.validate(20, verify_checksums=True).valid

    dst = LocalSnapshotStore(str(tmp_path / "dst"))
    seen: list[tuple[int, int]] = []
    remote.download(20, dst, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (m.total_bytes, m.total_bytes)
    for name in ("manifest.json", "tree.json", "tensors.bin"):
        assert Path(dst.path(20), name).read_bytes() == Path(src.path(20), name).read_bytes()
    assert dst.validate(20, verify_checksums=True).valid


@pytest.mark.timeout(120)
def test_corrupt_remote_object_skipped(
    remote: RemoteSnapshotStore, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    src = LocalSnapshotStore(str(tmp_path / "src"))
    commit(src, 1, 1000)
    commit(src, 2, 6 * MiB)
    remote.upload(src, 1)
    remote.upload(src, 2)
    client = s3_bucket.server.client()
    key = "run/snapshots/step-000000000002/tensors.bin"
    data = bytearray(client.get_object(Bucket=s3_bucket.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x40
    client.put_object(Bucket=s3_bucket.bucket, Key=key, Body=bytes(data))
    assert remote.validate(2, verify_checksums=False).valid
    bad = remote.validate(2, verify_checksums=True)
    assert bad.valid is False and "checksum" in (bad.reason or "")
    newest = remote.newest_valid(verify_checksums=True)
    assert newest is not None and newest.step == 1
    dst = LocalSnapshotStore(str(tmp_path / "dst"))
    with pytest.raises(CorruptSnapshot):
        remote.download(2, dst)
    assert dst.list() == [] and os.listdir(dst.root) == []
    remote.download(1, dst)
    assert dst.validate(1).valid


@pytest.mark.timeout(60)
def test_manifest_less_snapshot_invisible(
    remote: RemoteSnapshotStore, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    src = LocalSnapshotStore(str(tmp_path / "src"))
    commit(src, 3, 1000)
    remote.upload(src, 3)
    client = s3_bucket.server.client()
    client.put_object(
        Bucket=s3_bucket.bucket, Key="run/snapshots/step-000000000004/tensors.bin", Body=b"torn"
    )
    client.put_object(Bucket=s3_bucket.bucket, Key="run/snapshots/junk", Body=b"x")
    assert [i.step for i in remote.list()] == [3]
    remote.delete(3)
    assert remote.list() == []


@pytest.mark.timeout(60)
def test_if_none_match_second_commit_refused(s3_env: S3Server, s3_bucket: S3Bucket) -> None:
    store = open_object_store(s3_bucket.url, settings=SETTINGS)
    assert store.put_bytes("snapshots/step-000000000001/manifest.json", b"a", if_none_match=True)
    assert not store.put_bytes(
        "snapshots/step-000000000001/manifest.json", b"b", if_none_match=True
    )
    assert store.get_bytes("snapshots/step-000000000001/manifest.json") == b"a"
    assert isinstance(store, S3ObjectStore) and store._inm_supported is True


@pytest.mark.timeout(120)
def test_interrupted_multipart_leaves_no_upload(
    remote: RemoteSnapshotStore,
    s3_bucket: S3Bucket,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = LocalSnapshotStore(str(tmp_path / "src"))
    commit(src, 5, 16 * MiB)
    store = remote.store
    assert isinstance(store, S3ObjectStore)
    real = store._upload_part

    def failing(key: str, full: str, upload_id: str, number: int, data: bytes, *rest: Any) -> Any:
        if number == 2:
            raise TransientStorageError("injected part failure")
        return real(key, full, upload_id, number, data, *rest)

    monkeypatch.setattr(store, "_upload_part", failing)
    with pytest.raises(TransientStorageError, match="injected"):
        remote.upload(src, 5)
    client = s3_bucket.server.client()
    assert uploads(client, s3_bucket.bucket) == []
    assert remote.list() == []
    monkeypatch.setattr(store, "_upload_part", real)
    assert not remote.upload(src, 5).skipped
    assert remote.validate(5).valid


@pytest.mark.timeout(120)
def test_rotted_local_file_aborts_multipart(
    remote: RemoteSnapshotStore, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    src = LocalSnapshotStore(str(tmp_path / "src"))
    commit(src, 6, 11 * MiB)
    p = Path(src.path(6), "tensors.bin")
    with open(p, "r+b") as f:
        f.seek(10 * MiB)
        b = f.read(1)
        f.seek(10 * MiB)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(CorruptSnapshot, match="do not match"):
        remote.upload(src, 6)
    client = s3_bucket.server.client()
    assert uploads(client, s3_bucket.bucket) == []
    assert remote.list() == []


@pytest.mark.timeout(60)
def test_abort_incomplete_uploads(remote: RemoteSnapshotStore, s3_bucket: S3Bucket) -> None:
    client = s3_bucket.server.client()
    client.create_multipart_upload(Bucket=s3_bucket.bucket, Key="run/snapshots/x/tensors.bin")
    client.create_multipart_upload(Bucket=s3_bucket.bucket, Key="elsewhere/tensors.bin")
    assert remote.abort_incomplete_uploads(older_than_s=3600) == 0
    assert remote.abort_incomplete_uploads() == 1
    assert [u["Key"] for u in uploads(client, s3_bucket.bucket)] == ["elsewhere/tensors.bin"]


@pytest.mark.timeout(60)
def test_server_rejects_wrong_checksum(remote: RemoteSnapshotStore) -> None:
    """The server validates the per-request SHA-256 (what our uploads rely on)."""
    store = remote.store
    assert isinstance(store, S3ObjectStore)
    with pytest.raises(TransientStorageError, match="BadDigest"), store._call("put", "x"):
        store._client.put_object(
            Bucket=store.bucket,
            Key=store._key("x"),
            Body=b"abc",
            ChecksumSHA256=base64.b64encode(hashlib.sha256(b"abd").digest()).decode(),
        )
    assert store.head("x") is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", ["secret", "key"])
def test_bad_credentials_permanent_and_fast(
    s3_env: S3Server, s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    bad = "wrong-" + secrets.token_hex(8)
    var = "AWS_SECRET_ACCESS_KEY" if which == "secret" else "AWS_ACCESS_KEY_ID"
    monkeypatch.setenv(var, bad)
    remote = RemoteSnapshotStore(s3_bucket.url, settings=SETTINGS)
    t0 = time.monotonic()
    with pytest.raises(PermanentStorageError) as ei:
        remote.preflight()
    with pytest.raises(PermanentStorageError):
        remote.list()
    assert time.monotonic() - t0 < 5
    text = str(ei.value)
    assert s3_bucket.bucket in text
    for secret in (bad, s3_env.secret_key, s3_env.access_key):
        assert secret not in text


@pytest.mark.timeout(60)
def test_missing_bucket_permanent_and_fast(s3_env: S3Server) -> None:
    remote = RemoteSnapshotStore(f"s3://no-such-bucket-{secrets.token_hex(4)}/p", settings=SETTINGS)
    t0 = time.monotonic()
    with pytest.raises(PermanentStorageError, match="does not exist"):
        remote.preflight()
    with pytest.raises(PermanentStorageError, match="does not exist"):
        remote.list()
    assert time.monotonic() - t0 < 5


@pytest.mark.timeout(60)
def test_connection_refused_transient_and_fast(
    s3_env: S3Server, s3_proxy: S3Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_proxy.endpoint_url)
    s3_proxy.refuse()
    remote = RemoteSnapshotStore(s3_proxy.url, settings=SETTINGS)
    t0 = time.monotonic()
    with pytest.raises(TransientStorageError):
        remote.preflight()
    with pytest.raises(TransientStorageError):
        remote.list()
    assert time.monotonic() - t0 < 5


@pytest.mark.timeout(60)
def test_blackhole_times_out(
    s3_env: S3Server, s3_proxy: S3Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_proxy.endpoint_url)
    settings = StorageSettings(remote_connect_timeout_s=1.0, remote_read_timeout_s=1.5)
    remote = RemoteSnapshotStore(s3_proxy.url, settings=settings)
    remote.preflight()
    s3_proxy.blackhole()
    t0 = time.monotonic()
    with pytest.raises(TransientStorageError):
        remote.list()
    assert time.monotonic() - t0 < 6


@pytest.mark.timeout(120)
@pytest.mark.parametrize("once", [True, False])
def test_reset_mid_upload_then_retry(
    s3_env: S3Server,
    s3_proxy: S3Proxy,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    once: bool,
) -> None:
    """A reset mid-upload: the multipart upload is aborted when the endpoint still answers
    (once=True); during a lasting outage the abort cannot get through, and the mirror's
    start-up sweep (abort_incomplete_uploads) removes it once the endpoint is back."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_proxy.endpoint_url)
    src = LocalSnapshotStore(str(tmp_path / "src"))
    commit(src, 8, 12 * MiB)
    remote = RemoteSnapshotStore(s3_proxy.url, settings=SETTINGS)
    s3_proxy.reset(after_bytes=7 * MiB, once=once)
    with pytest.raises(TransientStorageError):
        remote.upload(src, 8)
    s3_proxy.passthrough()
    client = s3_proxy.direct_client()
    if not once:
        assert len(uploads(client, s3_proxy.bucket)) == 1
        assert remote.abort_incomplete_uploads() == 1
    assert uploads(client, s3_proxy.bucket) == []
    assert remote.list() == []
    assert not remote.upload(src, 8).skipped
    assert remote.validate(8, verify_checksums=True).valid
