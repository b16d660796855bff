"""Leaked multipart uploads (issue 13, point 5), without a network.

The S3 store against a fake boto3 client: a failed abort is remembered and retried by the next
`abort_incomplete_uploads` (one try per request, no retry inside the store), whatever the
upload's age; uploads under other prefixes and young foreign ones survive. The mirror against a
scripted remote: the abort pass after an upload that needed retries and the final pass of
`finish_mirror` retry transient errors with the mirror's policy, are bounded by the flush
timeout, report failures as events and never raise. The real-server twin is
tests/faults/test_uploads.py.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog
from botocore.exceptions import ClientError, EndpointConnectionError

from contract.codes import EXIT_OK
from contract.polling import wait_until
from orchestrator.mirror import Mirror, finish_mirror
from storage import PermanentStorageError, StorageSettings, TransientStorageError
from storage.objectstore import S3ObjectStore, open_object_store
from tests.unit.test_orchestrator_mirror import FAST, FakeRemote, Harness, snapshot, supervised
from tests.unit.test_orchestrator_supervisor import Attempt, Env

pytestmark = pytest.mark.timeout(30)

MiB = 1024 * 1024


# -- the S3 store against a fake client ----------------------------------------------------


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "op",
    )


def refused() -> EndpointConnectionError:
    return EndpointConnectionError(endpoint_url="http://127.0.0.1:9")


class FakeS3Client:
    """Just the multipart calls, over a dict; ``fail[op]`` raises its exceptions in order."""

    def __init__(self) -> None:
        self.uploads: dict[str, dict[str, Any]] = {}  # upload id -> {Key, Initiated}
        self.objects: dict[str, int] = {}
        self.fail: dict[str, list[Exception]] = {}
        self.calls: list[tuple[str, str]] = []
        self._ids = itertools.count(1)

    def _maybe_fail(self, op: str, key: str) -> None:
        self.calls.append((op, key))
        errors = self.fail.get(op)
        if errors:
            raise errors.pop(0)

    def add_upload(self, key: str, *, age_s: float = 0.0) -> str:
        uid = f"u{next(self._ids)}"
        initiated = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=age_s)
        self.uploads[uid] = {"Key": key, "UploadId": uid, "Initiated": initiated}
        return uid

    def create_multipart_upload(self, *, Bucket: str, Key: str, **_: Any) -> dict[str, Any]:
        self._maybe_fail("create", Key)
        return {"UploadId": self.add_upload(Key)}

    def upload_part(self, *, Key: str, UploadId: str, PartNumber: int, Body: bytes,
                    **_: Any) -> dict[str, Any]:
        self._maybe_fail("part", Key)
        if UploadId not in self.uploads:
            raise client_error("NoSuchUpload", 404)
        return {"ETag": f'"{PartNumber}"'}

    def complete_multipart_upload(self, *, Key: str, UploadId: str, **_: Any) -> None:
        self._maybe_fail("complete", Key)
        self.uploads.pop(UploadId)
        self.objects[Key] = 1

    def abort_multipart_upload(self, *, Bucket: str, Key: str, UploadId: str) -> None:
        self._maybe_fail("abort", Key)
        if UploadId not in self.uploads:
            raise client_error("NoSuchUpload", 404)
        del self.uploads[UploadId]

    def get_paginator(self, name: str) -> Any:
        assert name == "list_multipart_uploads"
        client = self

        class Paginator:
            def paginate(self, *, Bucket: str, Prefix: str) -> Iterator[dict[str, Any]]:
                client._maybe_fail("list", Prefix)
                found = [dict(u) for u in client.uploads.values() if u["Key"].startswith(Prefix)]
                # Two pages, as a real listing of many uploads would be.
                yield {"Uploads": found[:1]}
                yield {"Uploads": found[1:]}

        return Paginator()

    def close(self) -> None:
        pass


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[S3ObjectStore, FakeS3Client]]:
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEACCESS123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-0123456789")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    settings = StorageSettings(remote_part_size=1 * MiB, remote_multipart_threshold=1 * MiB,
                               remote_concurrency=2)
    store = open_object_store("s3://bkt/run", settings=settings)
    assert isinstance(store, S3ObjectStore)
    store._client.close()
    fake = FakeS3Client()
    store._client = fake
    yield store, fake


def big_file(tmp_path: Path) -> str:
    path = tmp_path / "tensors.bin"
    path.write_bytes(b"x" * (3 * MiB))
    return str(path)


def test_failed_abort_is_remembered_and_retried_by_the_next_pass(
    s3: tuple[S3ObjectStore, FakeS3Client], tmp_path: Path
) -> None:
    store, fake = s3
    # The endpoint goes away mid-upload: a part fails, then the abort cannot get through.
    fake.fail["part"] = [refused()]
    fake.fail["abort"] = [refused()]
    with structlog.testing.capture_logs() as logs, pytest.raises(TransientStorageError):
        store.put_file("snapshots/step-1/tensors.bin", big_file(tmp_path), size=3 * MiB)
    [uid] = fake.uploads
    assert store.abandoned_uploads() == [("snapshots/step-1/tensors.bin", uid)]
    failed = [e for e in logs if e["event"] == "remote.multipart_abort_failed"]
    assert failed and failed[0]["upload_id"] == uid and failed[0]["pending_aborts"] == 1
    # Young (another writer's live uploads are protected by the age), but ours: aborted by id.
    assert store.abort_incomplete_uploads("snapshots/", older_than_s=3600) == 1
    assert fake.uploads == {} and store.abandoned_uploads() == []
    assert store.abort_incomplete_uploads("snapshots/", older_than_s=3600) == 0


def test_abort_pass_raises_the_transient_error_and_resumes(
    s3: tuple[S3ObjectStore, FakeS3Client], tmp_path: Path
) -> None:
    store, fake = s3
    fake.fail["part"] = [refused()]
    fake.fail["abort"] = [refused(), client_error("ServiceUnavailable", 503)]
    with pytest.raises(TransientStorageError):
        store.put_file("snapshots/step-1/tensors.bin", big_file(tmp_path), size=3 * MiB)
    # One try per request: the caller's retry layer decides; the upload stays remembered.
    with pytest.raises(TransientStorageError, match="abort multipart upload"):
        store.abort_incomplete_uploads("snapshots/", older_than_s=3600)
    assert len(store.abandoned_uploads()) == 1
    assert store.abort_incomplete_uploads("snapshots/", older_than_s=3600) == 1
    assert fake.uploads == {}


def test_abort_permanent_error_is_raised_and_the_upload_kept(
    s3: tuple[S3ObjectStore, FakeS3Client], tmp_path: Path
) -> None:
    store, fake = s3
    fake.fail["part"] = [refused()]
    fake.fail["abort"] = [refused(), client_error("AccessDenied", 403)]
    with pytest.raises(TransientStorageError):
        store.put_file("snapshots/step-1/tensors.bin", big_file(tmp_path), size=3 * MiB)
    with pytest.raises(PermanentStorageError):
        store.abort_incomplete_uploads("snapshots/")
    assert len(store.abandoned_uploads()) == 1


def test_an_upload_gone_meanwhile_counts_as_aborted_away(
    s3: tuple[S3ObjectStore, FakeS3Client], tmp_path: Path
) -> None:
    store, fake = s3
    fake.fail["part"] = [refused()]
    fake.fail["abort"] = [refused()]
    with pytest.raises(TransientStorageError):
        store.put_file("snapshots/step-1/tensors.bin", big_file(tmp_path), size=3 * MiB)
    fake.uploads.clear()  # aborted by someone else (a sweep of the next launch)
    assert store.abort_incomplete_uploads("snapshots/") == 0
    assert store.abandoned_uploads() == []


def test_a_successful_abort_is_not_remembered(
    s3: tuple[S3ObjectStore, FakeS3Client], tmp_path: Path
) -> None:
    store, fake = s3
    fake.fail["part"] = [refused()]
    with pytest.raises(TransientStorageError):
        store.put_file("snapshots/step-1/tensors.bin", big_file(tmp_path), size=3 * MiB)
    assert fake.uploads == {} and store.abandoned_uploads() == []
    store.put_file("snapshots/step-1/tensors.bin", big_file(tmp_path), size=3 * MiB)
    assert fake.objects == {"run/snapshots/step-1/tensors.bin": 1} and fake.uploads == {}


def test_sweep_keeps_to_the_prefix_and_the_age(s3: tuple[S3ObjectStore, FakeS3Client]) -> None:
    store, fake = s3
    young = fake.add_upload("run/snapshots/step-2/tensors.bin")  # another node, live
    old = fake.add_upload("run/snapshots/step-1/tensors.bin", age_s=7200)  # a dead writer's
    other_run = fake.add_upload("run2/snapshots/step-1/tensors.bin", age_s=7200)
    outside = fake.add_upload("run/elsewhere/x.bin", age_s=7200)
    assert store.abort_incomplete_uploads("snapshots/", older_than_s=3600) == 1
    assert old not in fake.uploads and {young, other_run, outside} <= set(fake.uploads)
    # A single node is the only writer: every upload of its own snapshots/, nothing else.
    assert store.abort_incomplete_uploads("snapshots/") == 1
    assert set(fake.uploads) == {other_run, outside}


def test_a_failure_part_way_still_logs_what_was_aborted(
    s3: tuple[S3ObjectStore, FakeS3Client],
) -> None:
    store, fake = s3
    fake.add_upload("run/snapshots/step-1/a.bin")
    fake.add_upload("run/snapshots/step-1/b.bin")
    original = fake.abort_multipart_upload
    calls = itertools.count()

    def second_fails(**kw: Any) -> None:
        if next(calls) == 1:
            raise client_error("SlowDown", 503)
        original(**kw)

    fake.abort_multipart_upload = second_fails  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs, pytest.raises(TransientStorageError):
        store.abort_incomplete_uploads("snapshots/")
    [done] = [e for e in logs if e["event"] == "remote.stale_uploads_aborted"]
    assert done["count"] == 1
    assert store.abort_incomplete_uploads("snapshots/") == 1 and fake.uploads == {}


# -- the mirror against a scripted remote ------------------------------------------------------


class LeakyRemote(FakeRemote):
    """`abort_incomplete_uploads` answers from a script: an int (aborted) or an exception."""

    def __init__(self) -> None:
        super().__init__()
        self.abort_script: list[int | Exception] = []
        self.gate: threading.Event | None = None  # upload() waits on it (FakeRemote)
        self.abort_gate: threading.Event | None = None

    def abort_incomplete_uploads(self, *, older_than_s: float = 0.0) -> int:
        super().abort_incomplete_uploads(older_than_s=older_than_s)
        if self.abort_gate is not None:
            self.abort_gate.wait(20)
        if self.abort_script:
            item = self.abort_script.pop(0)
            if isinstance(item, Exception):
                raise item
            return item
        return 0


@pytest.fixture
def leaky(tmp_path: Path) -> Harness:
    return Harness(tmp_path, LeakyRemote())


def remote_of(h: Harness) -> LeakyRemote:
    assert isinstance(h.remote, LeakyRemote)
    return h.remote


def finish(h: Harness, timeout_s: float = 5.0, *, abort: bool = False) -> None:
    finish_mirror(h.mirror, timeout_s=timeout_s, abort=lambda: abort, events=h.events,
                  newest_local=None, publish_final=lambda: None)


def test_upload_retried_then_leftovers_aborted_with_retries(leaky: Harness) -> None:
    h, remote = leaky, remote_of(leaky)
    remote.upload_errors = [TransientStorageError("connection reset mid-part")]
    # The rescan's sweep finds nothing; the pass after the retried upload fails once (the
    # endpoint flaps), is retried with the mirror's policy and aborts the leaked upload.
    remote.abort_script = [0, TransientStorageError("abort: connection refused"), 1]
    snapshot(h.store, 10)
    h.mirror.notify([10])
    h.mirror.start()
    try:
        assert h.mirror.flush(5)
        # A flush waits for snapshots, not for the cleanup that follows them.
        wait_until(lambda: h.of("mirror.uploads_aborted"), timeout=5, what="the abort pass")
    finally:
        h.mirror.close()
    assert remote.aborted == 3
    retries = [e for e in h.of("mirror.retry") if e.get("op") == "abort_uploads"]
    assert len(retries) == 1 and "connection refused" in retries[0]["error"]
    [done] = h.of("mirror.uploads_aborted")
    assert (done["count"], done["final"]) == (1, False)
    assert h.of("mirror.uploads_abort_failed") == []


def test_no_pass_after_clean_uploads(leaky: Harness) -> None:
    h, remote = leaky, remote_of(leaky)
    for step in (10, 20):
        snapshot(h.store, step)
    h.mirror.notify([10, 20])
    h.mirror.start()
    try:
        assert h.mirror.flush(5)
    finally:
        h.mirror.close()
    assert remote.aborted == 1  # the start-up sweep only


def test_a_failing_pass_is_reported_and_uploads_go_on(leaky: Harness) -> None:
    h, remote = leaky, remote_of(leaky)
    remote.upload_errors = [TransientStorageError("reset")]
    remote.abort_script = [0, PermanentStorageError("abort: AccessDenied (403)")]
    snapshot(h.store, 10)
    h.mirror.notify([10])
    h.mirror.start()
    try:
        assert h.mirror.flush(5)
        snapshot(h.store, 20)
        h.mirror.notify([10, 20])
        assert h.mirror.flush(5)
    finally:
        h.mirror.close()
    [failed] = h.of("mirror.uploads_abort_failed")
    assert failed["permanent"] is True and failed["final"] is False
    assert "AccessDenied" in failed["error"]
    assert sorted(remote.snaps) == [10, 20] and h.mirror.error is None
    # Not repeated after every upload (a missing abort permission would say so each time):
    # the final pass tries again.
    assert remote.aborted == 2


def test_finish_runs_the_final_pass(leaky: Harness) -> None:
    h, remote = leaky, remote_of(leaky)
    remote.abort_script = [0, TransientStorageError("abort: reset"), 2]
    snapshot(h.store, 10)
    h.mirror.notify([10])
    h.mirror.start()
    finish(h)
    assert remote.aborted == 3
    [done] = h.of("mirror.uploads_aborted")
    assert (done["count"], done["final"]) == (2, True)
    names = h.names()
    assert names.index("mirror.uploads_aborted") < names.index("mirror.flushed")
    assert remote.abort_ages == [0.0, 0.0, 0.0]


def test_final_pass_uses_the_multi_node_age(tmp_path: Path) -> None:
    h = Harness(tmp_path, LeakyRemote())
    remote: Any = h.remote  # FakeRemote's upload() is typed loosely
    h.mirror = Mirror(remote=remote, local=h.store, events=h.events, settings=FAST,
                      stale_upload_age_s=3600.0)
    h.mirror.start()
    finish(h)
    assert remote_of(h).abort_ages == [3600.0, 3600.0]


def test_final_pass_failure_is_an_event_not_an_error(leaky: Harness) -> None:
    h, remote = leaky, remote_of(leaky)
    remote.abort_script = [0, PermanentStorageError("abort: AccessDenied (403)")]
    h.mirror.start()
    finish(h)
    [failed] = h.of("mirror.uploads_abort_failed")
    assert failed["final"] is True and failed["permanent"] is True
    assert "mirror.flushed" in h.names()


def test_final_pass_against_a_dead_endpoint_stops_at_the_deadline(tmp_path: Path) -> None:
    slow = replace(FAST, mirror_retry_initial_s=0.05, mirror_retry_max_s=0.1)
    h = Harness(tmp_path, LeakyRemote(), settings=slow)
    remote = remote_of(h)
    remote.abort_script = [0] + [TransientStorageError("refused")] * 1000
    h.mirror.start()
    finish(h, timeout_s=1.0)
    [failed] = h.of("mirror.uploads_abort_failed")
    assert failed["final"] is True and failed["permanent"] is False
    assert "refused" in failed["error"]
    assert "mirror.flushed" in h.names()
    assert 1 < remote.aborted < 1000  # retried, then given up


def test_final_pass_hung_in_a_call_is_abandoned_at_the_deadline(leaky: Harness) -> None:
    h, remote = leaky, remote_of(leaky)
    h.mirror.start()
    assert h.mirror.flush(5)
    remote.abort_gate = threading.Event()  # the pass's call hangs (a blackholed endpoint)
    # The call returns a while after the deadline (a network call ends at its timeout), so
    # close() joins the thread instead of leaving it behind.
    release = threading.Timer(1.5, remote.abort_gate.set)
    release.start()
    try:
        finish(h, timeout_s=0.5)
    finally:
        remote.abort_gate.set()
        release.cancel()
    [failed] = h.of("mirror.uploads_abort_failed")
    assert failed["final"] is True and failed["timeout_s"] == 0.5
    assert "mirror.flushed" in h.names()


def test_a_second_signal_skips_the_final_pass(leaky: Harness) -> None:
    h, remote = leaky, remote_of(leaky)
    h.mirror.start()
    assert h.mirror.flush(5)
    finish(h, abort=True)
    assert remote.aborted == 1


def test_supervisor_exit_code_unchanged_when_the_final_pass_fails(tmp_path: Path) -> None:
    remote = LeakyRemote()
    remote.abort_script = [0, PermanentStorageError("abort: AccessDenied (403)")]

    def script(env: Env) -> list[Attempt]:
        def work(attempt: int, _r: int | None) -> None:
            env.heartbeat(attempt, 10)
            env.snapshot(10)
        return [Attempt(0, polls=4, on_exit=work)]

    sup, _group, env, _ = supervised(tmp_path, script, remote=remote)
    out = sup.run()
    assert out.exit_code == EXIT_OK
    names = env.names()
    assert "mirror.uploads_abort_failed" in names and "mirror.flushed" in names
    assert sorted(remote.snaps) == [10]
