"""The mirror, cross-tier restore and their supervisor integration, against an in-memory remote.

``FakeRemote`` implements the ``RemoteTier`` protocol over dicts (checksums and all), with
scripted failures, so the mirror's policy (order, rescan, retries, permanent errors, retention,
lag) and the supervisor's cross-tier resume are tested without a network. The mirror thread
runs for real, with retry delays shrunk to milliseconds; every wait is bounded.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from contract.codes import EXIT_OK, Phase
from contract.paths import RunPaths
from orchestrator.clock import RealClock
from orchestrator.config import LaunchConfig
from orchestrator.mirror import (
    Mirror,
    MirrorCrashed,
    MirrorUnavailable,
    PermanentStorageError,
    mirror_lag,
    preflight,
)
from orchestrator.runstate import EventLog, read_events
from orchestrator.settings import Settings
from orchestrator.supervisor import StopRequest, Supervisor
from storage import LocalSnapshotStore, Manifest, SnapshotInfo
from storage.blockhash import checksum_of
from storage.errors import CorruptSnapshot, StorageError, TransientStorageError
from tests.support.clock import FakeClock
from tests.unit.test_orchestrator_supervisor import SETTINGS, Attempt, Env, FakeGroup

pytestmark = pytest.mark.timeout(30)

DIGEST = "sha256:" + "0" * 64
FAST = Settings(
    mirror_retry_initial_s=0.001, mirror_retry_max_s=0.005, mirror_retry_jitter_s=0.001,
    mirror_permanent_retry_s=30.0, mirror_flush_timeout_s=10.0, mirror_preflight_attempts=3,
    state_mirror_interval_s=1.0,
)


@dataclass(frozen=True)
class Result:
    step: int
    bytes: int
    seconds: float
    skipped: bool


class FakeRemote:
    """An in-memory remote tier: step -> {file name: bytes} (manifest.json last)."""

    def __init__(self) -> None:
        self.snaps: dict[int, dict[str, bytes]] = {}
        self.states: dict[int, dict[str, Any]] = {}
        self.uploads: list[int] = []
        self.downloads: list[int] = []
        self.deleted: list[int] = []
        self.aborted = 0
        self.abort_ages: list[float] = []
        self.lock = threading.Lock()
        #: Raised, in order, by the next upload calls.
        self.upload_errors: list[BaseException] = []
        self.list_errors: list[BaseException] = []
        #: Raised by list() when called from the supervisor's loop (restore), not the mirror.
        self.restore_list_errors: list[BaseException] = []
        self.preflight_error: BaseException | None = None
        self.gate: threading.Event | None = None  # uploads time out until it is set

    def add(self, local: LocalSnapshotStore, step: int) -> None:
        manifest = local.read_manifest(step)
        files = {n: local.open_verified(step, n) for n in manifest.files}
        files["manifest.json"] = manifest.to_json()
        self.snaps[step] = files

    def corrupt(self, step: int) -> None:
        name = next(n for n in self.snaps[step] if n != "manifest.json")
        data = bytearray(self.snaps[step][name])
        data[0] ^= 0xFF
        self.snaps[step][name] = bytes(data)

    def upload(
        self,
        local: LocalSnapshotStore,
        step: int,
        progress: Any = None,
        on_phase: Any = None,
        pacing: Any = None,
    ) -> Result:
        if self.gate is not None and not self.gate.wait(0.05):
            # A blackholed endpoint: the store's own timeout turns it into a transient error.
            raise TransientStorageError("read timeout on endpoint")
        with self.lock:
            self.uploads.append(step)
            if self.upload_errors:
                raise self.upload_errors.pop(0)
            if step in self.snaps:
                return Result(step, 0, 0.0, True)
        info = local.validate(step)
        if not info.valid:
            raise CorruptSnapshot(str(info.reason))
        self.add(local, step)
        return Result(step, info.bytes or 0, 0.01, False)

    def _manifest(self, step: int) -> Manifest:
        return Manifest.from_json(self.snaps[step]["manifest.json"])

    def list(self) -> list[SnapshotInfo]:
        if self.list_errors:
            raise self.list_errors.pop(0)
        if self.restore_list_errors and threading.current_thread().name != "orchestrator-mirror":
            raise self.restore_list_errors.pop(0)
        return [
            SnapshotInfo(step=s, path=f"memory://x/snapshots/{s}", tier="remote",
                         manifest=self._manifest(s), valid=None)
            for s in sorted(self.snaps)
        ]

    def validate(self, step: int, *, verify_checksums: bool = True) -> SnapshotInfo:
        m = self._manifest(step)
        info = SnapshotInfo(step=step, path=f"memory://x/snapshots/{step}", tier="remote",
                            manifest=m, valid=True)
        for name, entry in m.files.items():
            data = self.snaps[step].get(name)
            if data is None or len(data) != entry.size:
                return SnapshotInfo(step=step, path=info.path, tier="remote", manifest=m,
                                    valid=False, reason=f"{name}: size")
            if verify_checksums and checksum_of(data, entry.algorithm) != entry.checksum:
                return SnapshotInfo(step=step, path=info.path, tier="remote", manifest=m,
                                    valid=False, reason=f"{name}: checksum mismatch")
        return info

    def download(self, step: int, local: LocalSnapshotStore,
                 progress: Callable[[int, int], None] | None = None) -> SnapshotInfo:
        self.downloads.append(step)
        checked = self.validate(step, verify_checksums=True)
        if not checked.valid:
            raise CorruptSnapshot(f"step {step}: {checked.reason}")
        m = self._manifest(step)
        w = local.begin(step)
        for name in m.files:
            w.write_bytes(name, self.snaps[step][name])
        w.commit(run_id=m.run_id, epoch=m.epoch, world_size=m.world_size, digest=m.digest,
                 metadata=dict(m.metadata))
        if progress is not None:
            progress(m.total_bytes, m.total_bytes)
        return local.validate(step)

    def delete(self, step: int) -> None:
        self.deleted.append(step)
        self.snaps.pop(step, None)

    def put_state(self, node_rank: int, doc: Mapping[str, Any]) -> None:
        self.states[node_rank] = dict(doc)

    def get_state(self) -> list[dict[str, Any]]:
        return [self.states[k] for k in sorted(self.states)]

    def abort_incomplete_uploads(self, *, older_than_s: float = 0.0) -> int:
        self.aborted += 1
        self.abort_ages.append(older_than_s)
        return 0

    def preflight(self) -> None:
        if self.preflight_error is not None:
            raise self.preflight_error


def snapshot(store: LocalSnapshotStore, step: int, payload: bytes | None = None) -> None:
    w = store.begin(step)
    w.write_bytes("tensors.bin", payload if payload is not None else step.to_bytes(8, "little") * 8)
    w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)


class Harness:
    def __init__(self, tmp_path: Path, remote: FakeRemote | None = None, *,
                 keep_remote: int | None = None, settings: Settings = FAST) -> None:
        self.store = LocalSnapshotStore(str(tmp_path / "ck"))
        self.paths = RunPaths.of(str(tmp_path / "ck"))
        self.events = EventLog(self.paths.events, clock=RealClock(), run_id="r")
        self.remote = remote or FakeRemote()
        self.mirror = Mirror(remote=self.remote, local=self.store, events=self.events,
                             settings=settings, keep_remote=keep_remote)

    def names(self) -> list[str]:
        return [e["event"] for e in read_events(self.paths)]

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e for e in read_events(self.paths) if e["event"] == name]

    def local_steps(self) -> list[int]:
        return [i.step for i in self.store.list()]


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_lag() -> None:
    assert mirror_lag(None, None) == 0
    assert mirror_lag(30, 30) == 0
    assert mirror_lag(30, 10) == 20
    assert mirror_lag(30, None) == 30
    assert mirror_lag(10, 30) == 0  # local wiped / behind: nothing to lose


def test_uploads_in_ascending_order_when_keeping_up(h: Harness) -> None:
    h.mirror.start()
    try:
        for step in (10, 20, 30):
            snapshot(h.store, step)
            h.mirror.notify(h.local_steps())
            assert h.mirror.flush(5)
    finally:
        h.mirror.close()
    assert h.remote.uploads == [10, 20, 30]
    assert h.mirror.newest_remote_step == 30 and h.mirror.lag == 0
    assert h.mirror.mirrored_steps() == {10, 20, 30}
    up = h.of("mirror.uploaded")
    assert [e["step"] for e in up] == [10, 20, 30]
    assert all(e["bytes"] == 64 and e["seconds"] >= 0 and "mb_per_s" in e for e in up)
    assert [e["step"] for e in h.of("mirror.queued")] == [10, 20, 30]
    assert h.remote.aborted == 1  # stale multipart uploads aborted on start


def test_backlog_uploads_newest_first_then_oldest_first(h: Harness) -> None:
    for step in (10, 20, 30, 40):
        snapshot(h.store, step)
    h.mirror.notify(h.local_steps())
    h.mirror.start()
    try:
        assert h.mirror.flush(5)
    finally:
        h.mirror.close()
    assert h.remote.uploads == [40, 10, 20, 30]


def test_rescan_after_restart_is_idempotent(tmp_path: Path) -> None:
    first = Harness(tmp_path)
    for step in (10, 20):
        snapshot(first.store, step)
    first.remote.add(first.store, 10)  # uploaded by an earlier supervisor
    snapshot(first.store, 30)
    first.mirror.notify(first.local_steps())
    first.mirror.start()
    try:
        assert first.mirror.flush(5)
    finally:
        first.mirror.close()
    assert sorted(first.remote.uploads) == [20, 30]
    assert [e["step"] for e in first.of("mirror.skipped")] == [10]
    # A second supervisor on the same dir and remote uploads nothing.
    second = Mirror(remote=first.remote, local=first.store, events=first.events, settings=FAST)
    second.notify(first.local_steps())
    second.start()
    try:
        assert second.flush(5)
    finally:
        second.close()
    assert sorted(first.remote.uploads) == [20, 30]
    assert first.remote.aborted == 2
    assert second.mirrored_steps() == {10, 20, 30}


def test_transient_errors_are_retried_with_events(h: Harness) -> None:
    h.remote.upload_errors = [TransientStorageError("connection reset"),
                              TransientStorageError("read timeout")]
    h.remote.list_errors = [TransientStorageError("endpoint down")]
    snapshot(h.store, 10)
    h.mirror.notify([10])
    h.mirror.start()
    try:
        assert h.mirror.flush(5)
    finally:
        h.mirror.close()
    retries = h.of("mirror.retry")
    assert [(e["step"], e["attempt"]) for e in retries] == [(None, 1), (10, 1), (10, 2)]
    assert "connection reset" in retries[1]["error"] and retries[1]["delay_s"] >= 0
    assert [e["step"] for e in h.of("mirror.uploaded")] == [10]
    assert h.mirror.error is None


def test_permanent_error_is_reported_at_once_and_flush_does_not_wait(h: Harness) -> None:
    h.remote.upload_errors = [PermanentStorageError("AccessDenied (403) for bucket b")]
    snapshot(h.store, 10)
    h.mirror.notify([10])
    h.mirror.start()
    try:
        started = time.monotonic()
        assert h.mirror.flush(10) is False
        assert time.monotonic() - started < 5
        assert h.mirror.error is not None and "403" in h.mirror.error
        failed = h.of("mirror.failed")
        assert failed and failed[0]["permanent"] is True and failed[0]["step"] == 10
        assert h.mirror.pending_steps() == [10]
    finally:
        h.mirror.close()


def test_close_interrupts_endless_retries(h: Harness) -> None:
    slow = Settings(mirror_retry_initial_s=5.0, mirror_retry_max_s=5.0, mirror_retry_jitter_s=0)
    mirror = Mirror(remote=h.remote, local=h.store, events=h.events, settings=slow)
    h.remote.upload_errors = [TransientStorageError("blackholed")] * 100
    snapshot(h.store, 10)
    mirror.notify([10])
    mirror.start()
    assert mirror.flush(0.3) is False
    started = time.monotonic()
    mirror.close(timeout_s=5)
    assert time.monotonic() - started < 2


def test_unexpected_exception_is_re_raised(h: Harness) -> None:
    h.remote.upload_errors = [ZeroDivisionError("bug")]
    snapshot(h.store, 10)
    h.mirror.notify([10])
    h.mirror.start()
    with pytest.raises(MirrorCrashed):
        h.mirror.flush(5)
    assert h.mirror.error is not None and "ZeroDivisionError" in h.mirror.error
    with pytest.raises(MirrorCrashed):
        h.mirror.close()


def test_corrupt_local_snapshot_is_not_uploaded(h: Harness) -> None:
    snapshot(h.store, 10)
    with open(Path(h.store.path(10)) / "tensors.bin", "r+b") as f:
        f.write(b"\xee")
    h.mirror.notify([10])
    h.mirror.start()
    try:
        assert h.mirror.flush(5)
    finally:
        h.mirror.close()
    assert h.remote.snaps == {}
    assert h.of("mirror.failed")[0]["local"] is True


def test_keep_remote_deletes_old_remote_snapshots(tmp_path: Path) -> None:
    h = Harness(tmp_path, keep_remote=2)
    h.mirror.start()
    try:
        for step in (10, 20, 30, 40):
            snapshot(h.store, step)
            h.mirror.notify(h.local_steps())
            assert h.mirror.flush(5)
    finally:
        h.mirror.close()
    assert sorted(h.remote.snaps) == [30, 40]
    deleted = h.of("retention.deleted")
    assert all(e["tier"] == "remote" for e in deleted)
    assert sorted(s for e in deleted for s in e["steps"]) == [10, 20]


def test_keep_remote_skips_superseded_backlog(tmp_path: Path) -> None:
    h = Harness(tmp_path, keep_remote=1)
    for step in (10, 20, 30):
        snapshot(h.store, step)
    h.mirror.notify(h.local_steps())
    h.mirror.start()
    try:
        assert h.mirror.flush(5)
    finally:
        h.mirror.close()
    assert h.remote.uploads == [30]
    assert {e["step"]: e["reason"] for e in h.of("mirror.skipped")} == {10: "superseded",
                                                                         20: "superseded"}
    assert h.mirror.mirrored_steps() == {10, 20, 30}


def test_state_is_mirrored(h: Harness) -> None:
    h.mirror.start()
    try:
        h.mirror.publish_state({"run_id": "r", "phase": "running"})
        assert h.mirror.flush(5)
    finally:
        h.mirror.close()
    assert h.remote.states == {0: {"run_id": "r", "phase": "running"}}


def test_preflight_errors_are_configuration_errors() -> None:
    remote = FakeRemote()
    remote.preflight_error = PermanentStorageError("NoSuchBucket: bucket 'nope' does not exist")
    with pytest.raises(MirrorUnavailable, match="nope"):
        preflight(remote, "s3://KEY:SECRET@nope/run", FAST)
    remote.preflight_error = TransientStorageError("connect timeout")
    with pytest.raises(MirrorUnavailable, match="unreachable") as exc:
        preflight(remote, "s3://KEY:SECRET@nope/run", FAST)
    assert "SECRET" not in str(exc.value) and "nope" in str(exc.value)


# -- the supervisor with a mirror ------------------------------------------------------------


def supervised(tmp_path: Path, script: Callable[[Env], list[Attempt]], *,
               remote: FakeRemote | None = None, settings: Settings | None = None,
               prepare: Callable[[Env, FakeRemote], None] | None = None,
               **config: Any) -> tuple[Supervisor, FakeGroup, Env, FakeRemote]:
    remote = remote or FakeRemote()
    holder: dict[str, Any] = {}

    def wrapped(env: Env) -> list[Attempt]:
        holder["env"] = env
        if prepare is not None:
            prepare(env, remote)
        return script(env)

    base = settings or replace(
        SETTINGS, mirror_retry_initial_s=0.001, mirror_retry_max_s=0.005,
        mirror_retry_jitter_s=0.001, mirror_flush_timeout_s=10.0,
    )
    clock = FakeClock()
    env = Env(tmp_path, clock)
    os.makedirs(env.paths.run_dir, exist_ok=True)
    group = FakeGroup(wrapped(env))
    cfg = LaunchConfig(checkpoint_dir=env.dir, script="train.py", nproc_per_node=2,
                       mirror="memory://x", **config)
    events = EventLog(env.paths.events, clock=clock, run_id="r")
    mirror = Mirror(remote=remote, local=env.store, events=events, settings=base,
                    keep_remote=cfg.keep_remote)
    sup = Supervisor(config=cfg, settings=base, run_id="r", paths=env.paths, clock=clock,
                     group=group, store=env.store, events=events, stop=StopRequest(),
                     pid=1, mirror=mirror)
    return sup, group, env, remote


def test_supervisor_mirrors_every_snapshot_and_reports_lag(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        def work(attempt: int, _r: int | None) -> None:
            env.heartbeat(attempt, 30)
            for step in (10, 20, 30):
                env.snapshot(step)
        return [Attempt(0, polls=4, on_exit=work)]

    sup, _group, env, remote = supervised(tmp_path, script)
    out = sup.run()
    assert out.exit_code == EXIT_OK
    assert sorted(remote.snaps) == [10, 20, 30]
    s = env.state()
    assert (s["newest_local_step"], s["newest_remote_step"], s["mirror_lag_steps"]) == (30, 30, 0)
    assert s["mirror_pending_steps"] == [] and s["mirror_error"] is None
    assert "mirror.flushed" in env.names()
    assert remote.states[0]["phase"] == "done" and remote.states[0]["mirror_lag_steps"] == 0


def test_unmirrored_snapshots_are_protected_from_local_retention(tmp_path: Path) -> None:
    remote = FakeRemote()
    remote.gate = threading.Event()  # the object store "hangs": nothing gets mirrored

    def script(env: Env) -> list[Attempt]:
        def work(attempt: int, _r: int | None) -> None:
            env.heartbeat(attempt, 40)
            for step in (10, 20, 30, 40):
                env.snapshot(step)
        return [Attempt(0, polls=4, on_exit=work)]

    settings = replace(SETTINGS, mirror_flush_timeout_s=0.3)
    sup, _g, env, _ = supervised(tmp_path, script, remote=remote, settings=settings, keep_local=1)
    out = sup.run()
    remote.gate.set()
    assert out.exit_code == EXIT_OK  # a mirror behind never changes the exit code
    assert [i.step for i in env.store.list()] == [10, 20, 30, 40]
    s = env.state()
    assert s["mirror_lag_steps"] == 40 and s["mirror_pending_steps"] == [10, 20, 30, 40]
    behind = [e for e in env.events() if e["event"] == "mirror.behind"]
    assert behind and behind[0]["pending_steps"] == [10, 20, 30, 40]


def test_mirrored_snapshots_are_released_to_local_retention(tmp_path: Path) -> None:
    def script(env: Env) -> list[Attempt]:
        def work(attempt: int, _r: int | None) -> None:
            env.heartbeat(attempt, 40)
            for step in (10, 20, 30, 40):
                env.snapshot(step)
        return [Attempt(0, polls=4, on_exit=work)]

    sup, _g, _env, remote = supervised(tmp_path, script, keep_local=1)
    # Once the upload of every step is confirmed, the next scans prune the local tier.
    assert sup.run().exit_code == EXIT_OK
    assert sorted(remote.snaps) == [10, 20, 30, 40]
    sup2, _g2, env2, _ = supervised(tmp_path, lambda e: [Attempt(0, polls=3)], remote=remote,
                                    keep_local=1)
    assert sup2.run().exit_code == EXIT_OK
    assert [i.step for i in env2.store.list()] == [40]


def test_permanent_mirror_error_does_not_stop_training(tmp_path: Path) -> None:
    remote = FakeRemote()
    remote.upload_errors = [PermanentStorageError("AccessDenied (403)")]

    def script(env: Env) -> list[Attempt]:
        def work(attempt: int, _r: int | None) -> None:
            env.heartbeat(attempt, 10)
            env.snapshot(10)
        return [Attempt(0, polls=6, on_start=lambda a, r: env.snapshot(5), on_exit=work)]

    sup, _group, env, _ = supervised(tmp_path, script, remote=remote)
    out = sup.run()
    assert (out.exit_code, out.phase) == (EXIT_OK, Phase.DONE)
    s = env.state()
    assert s["mirror_error"] is not None and "403" in s["mirror_error"]
    assert any(e["event"] == "mirror.failed" and e["permanent"] for e in env.events())


def test_resume_downloads_a_newer_remote_snapshot(tmp_path: Path) -> None:
    def prepare(env: Env, remote: FakeRemote) -> None:
        env.snapshot(10)
        env.snapshot(30)
        remote.add(env.store, 10)
        remote.add(env.store, 30)
        env.store.delete(30)  # e.g. a replacement node that only had an old copy

    sup, group, env, remote = supervised(tmp_path, lambda e: [Attempt(0)], prepare=prepare)
    assert sup.run().exit_code == EXIT_OK
    assert group.starts == [(0, 30)] and remote.downloads == [30]
    names = env.names()
    assert "restore.download_started" in names and "restore.downloaded" in names
    assert env.store.validate(30).valid


def test_resume_from_remote_when_local_dir_is_empty(tmp_path: Path) -> None:
    def prepare(env: Env, remote: FakeRemote) -> None:
        env.snapshot(20)
        remote.add(env.store, 20)
        env.store.delete(20)

    sup, group, env, _remote = supervised(tmp_path, lambda e: [Attempt(0)], prepare=prepare)
    assert sup.run().exit_code == EXIT_OK
    assert group.starts == [(0, 20)]
    done = next(e for e in env.events() if e["event"] == "restore.downloaded")
    assert done["step"] == 20 and done["bytes"] == 64 and done["seconds"] >= 0


def test_corrupt_local_is_replaced_by_the_remote_copy(tmp_path: Path) -> None:
    def prepare(env: Env, remote: FakeRemote) -> None:
        env.snapshot(20)
        remote.add(env.store, 20)
        env.store.delete(20)
        env.snapshot(20, corrupt=True)

    sup, group, env, remote = supervised(tmp_path, lambda e: [Attempt(0)], prepare=prepare)
    assert sup.run().exit_code == EXIT_OK
    assert group.starts == [(0, 20)] and remote.downloads == [20]
    assert "supervisor.snapshot_invalid" in env.names()
    assert env.store.validate(20).valid


def test_corrupt_remote_falls_back_to_the_previous_valid(tmp_path: Path) -> None:
    def prepare(env: Env, remote: FakeRemote) -> None:
        for step in (10, 20, 30):
            env.snapshot(step)
            remote.add(env.store, step)
        remote.corrupt(30)
        env.store.delete(30)
        env.store.delete(20)

    sup, group, env, remote = supervised(tmp_path, lambda e: [Attempt(0)], prepare=prepare)
    assert sup.run().exit_code == EXIT_OK
    assert group.starts == [(0, 20)] and remote.downloads == [30, 20]
    failed = [e for e in env.events() if e["event"] == "restore.download_failed"]
    assert failed[0]["step"] == 30 and failed[0]["corrupt"] is True
    assert 30 not in [i.step for i in env.store.list()]  # nothing partial committed


def test_corrupt_remote_falls_back_to_local(tmp_path: Path) -> None:
    def prepare(env: Env, remote: FakeRemote) -> None:
        env.snapshot(10)
        env.snapshot(30)
        remote.add(env.store, 30)
        remote.corrupt(30)
        env.store.delete(30)

    sup, group, _env, _remote = supervised(tmp_path, lambda e: [Attempt(0)], prepare=prepare)
    assert sup.run().exit_code == EXIT_OK
    assert group.starts == [(0, 10)]


def test_local_newer_than_remote_wins_without_download(tmp_path: Path) -> None:
    def prepare(env: Env, remote: FakeRemote) -> None:
        env.snapshot(10)
        remote.add(env.store, 10)
        env.snapshot(40)

    sup, group, _env, remote = supervised(tmp_path, lambda e: [Attempt(0)], prepare=prepare)
    assert sup.run().exit_code == EXIT_OK
    assert group.starts == [(0, 40)] and remote.downloads == []
    assert sorted(remote.snaps) == [10, 40]  # and the missing one got mirrored


def test_both_tiers_empty_is_a_fresh_start(tmp_path: Path) -> None:
    sup, group, _env, _remote = supervised(tmp_path, lambda e: [Attempt(0)])
    assert sup.run().exit_code == EXIT_OK
    assert group.starts == [(0, None)]


def test_unreachable_remote_at_resume_falls_back_to_local(tmp_path: Path) -> None:
    def prepare(env: Env, remote: FakeRemote) -> None:
        env.snapshot(10)
        remote.restore_list_errors = [TransientStorageError("timeout")] * 3

    sup, group, env, _ = supervised(tmp_path, lambda e: [Attempt(0)], prepare=prepare)
    assert sup.run().exit_code == EXIT_OK
    assert group.starts == [(0, 10)]
    failed = [e for e in env.events() if e["event"] == "restore.download_failed"]
    assert failed and failed[0]["stage"] == "list" and failed[0]["transient"] is True


def test_a_crashed_mirror_fails_the_run_loudly(tmp_path: Path) -> None:
    remote = FakeRemote()
    remote.upload_errors = [KeyError("bug in the mirror")]

    def script(env: Env) -> list[Attempt]:
        return [Attempt(0, polls=10_000, on_start=lambda a, r: env.snapshot(5))]

    # The fake clock makes the loop spin fast; the crash surfaces on a scan.
    sup, group, _env, _ = supervised(tmp_path, script, remote=remote)
    with pytest.raises(MirrorCrashed):
        sup.run()
    assert group.kills == 1


def test_storage_error_text_never_carries_userinfo() -> None:
    from orchestrator.mirror import error_text

    text = error_text(StorageError("cannot reach s3://AKIA:SECRETKEY@bucket/run"))
    assert "SECRETKEY" not in text and "bucket/run" in text
