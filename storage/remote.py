"""The remote snapshot tier: committed snapshots mirrored to an object store.

Layout under the mirror URL (a prefix)::

    snapshots/step-000000000025/tensors.bin      data objects, uploaded first
    snapshots/step-000000000025/tree.json
    snapshots/step-000000000025/manifest.json    uploaded LAST, put-if-absent
    run/node-<R>/state.json                      a supervisor's run state, mirrored

A remote snapshot exists only once its manifest does, and the manifest is byte-identical to the
local one, so a snapshot is the same object (same digest, created_at, files) on both tiers.
Uploads re-hash every local byte against the local manifest while reading (a file that rotted on
disk is refused with `CorruptSnapshot`, never shipped). Downloads go into a local temporary
snapshot, every file hashed while written and checked against the remote manifest before the
local commit, so a torn or corrupt download never becomes a valid local snapshot. A remote
manifest is parsed like a local one: a file name that is not a plain name (``../x``, ``/abs``,
``a/b``, NUL) makes it unreadable, so nothing is ever written outside the temporary snapshot.
A trainer snapshot's content digest (:mod:`storage.content`) is computed from the downloaded
bytes as they stream (``tree.json`` first) and must match the manifest's before the commit, as
it must when validating with checksums.

Retrying is not done here: transient failures surface as `TransientStorageError` and the one
retrying layer (the supervisor's mirror) decides.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import structlog

from contract.paths import RUN_DIR
from storage import layout
from storage.blockhash import checksum_of
from storage.content import ContentHasher, ContentPlan, check_digest, plan_from_json
from storage.errors import (
    CorruptSnapshot,
    NewerSnapshotFormat,
    ObjectNotFound,
    SnapshotConflict,
    SnapshotNotFound,
    TransientStorageError,
)
from storage.local import LocalSnapshotStore
from storage.manifest import FileEntry, Manifest
from storage.objectstore import ObjectStore, Pacing, open_object_store
from storage.settings import StorageSettings
from storage.sharded import arena_digest_expected, is_sharded, validate_files
from storage.tier import RemoteTier, SnapshotInfo, TransferProgress, UploadResult

log = structlog.get_logger("storage.remote")

_SNAP = layout.SNAPSHOTS_DIR + "/"
_NODE_STATE = re.compile(r"run/node-([0-9]{1,9})/state\.json")


class _Counter:
    """Turns per-part byte deltas into (done, total) progress calls.

    `on_first` runs once, when the first part (or object) has reached the store: the point
    where a killed uploader leaves a multipart upload in flight (fault point
    `mirror_after_part`).
    """

    def __init__(
        self,
        total: int,
        progress: TransferProgress | None,
        on_first: Callable[[], None] | None = None,
    ) -> None:
        self.total = total
        self.done = 0
        self._progress = progress
        self._on_first = on_first

    def __call__(self, n: int) -> None:
        first = self.done == 0 and n > 0
        self.done += n
        if first and self._on_first is not None:
            self._on_first()
        if self._progress is not None:
            self._progress(self.done, self.total)


class _HashSink:
    """A writable that only hashes (remote checksum verification without a local copy)."""

    def __init__(self, entry: FileEntry) -> None:
        self.hash = entry.hasher()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        self.hash.update(data)
        n = len(memoryview(data).cast("B"))
        self.size += n
        return n


class _ContentSink:
    """Passes writes through to ``inner`` while feeding them to a content digest."""

    def __init__(self, inner: Any, hasher: ContentHasher) -> None:
        self._inner = inner
        self.hasher = hasher

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        self.hasher.update(memoryview(data).cast("B"))
        return int(self._inner.write(data))


def _snapshot_key(step: int, name: str) -> str:
    if name != layout.MANIFEST_NAME and not layout.is_safe_filename(name):
        # Manifest parsing refuses such names already; a key is never built from one.
        raise CorruptSnapshot(f"unsafe file name {name!r} in a remote manifest"[:200])
    return f"{_SNAP}{layout.snapshot_dirname(step)}/{name}"


def _download_order(files: Mapping[str, FileEntry]) -> builtins.list[str]:
    """The tree first (its content plan checks the arena as it streams), then by name."""
    return sorted(files, key=lambda n: (n != layout.TREE_FILE, n))


class RemoteSnapshotStore:
    """Snapshots under `<url>/snapshots/` in an object store (tier "remote").

    Implements :class:`storage.tier.RemoteTier` (and so :class:`storage.tier.SnapshotTier`).
    """

    tier = "remote"

    def __init__(
        self,
        url: str,
        *,
        settings: StorageSettings | None = None,
        store: ObjectStore | None = None,
        verify_content: bool = True,
    ) -> None:
        #: Whether validation with checksums also checks a trainer snapshot's content digest
        #: (False: object checksums only, what ``snapshots --verify`` reports).
        self.verify_content = verify_content
        self._settings = settings or StorageSettings.from_env()
        self.store: ObjectStore = store or open_object_store(url, settings=self._settings)
        self.url = url.rstrip("/")

    def path(self, step: int) -> str:
        return f"{self.url}/{_SNAP}{layout.snapshot_dirname(step)}"

    # -- object-store passthroughs the mirror needs -----------------------------------------

    def preflight(self) -> None:
        """The bucket/prefix is reachable and writable (a probe object written and deleted)."""
        self.store.preflight()

    def abort_incomplete_uploads(self, *, older_than_s: float = 0.0) -> int:
        """Abort multipart uploads left under this prefix by a dead writer; how many."""
        # Only under snapshots/ (the only multipart keys): a mirror at a bucket's root must not
        # abort the uploads of another run mirrored to a prefix of the same bucket.
        return self.store.abort_incomplete_uploads(_SNAP, older_than_s=older_than_s)

    # -- listing and validation -------------------------------------------------------------

    def _listing(self) -> dict[int, dict[str, int]]:
        """step -> {file name: size} for every canonical step prefix (junk keys ignored)."""
        out: dict[int, dict[str, int]] = {}
        for key, size in self.store.list(_SNAP):
            parts = key[len(_SNAP) :].split("/")
            if len(parts) != 2:
                continue
            step = layout.parse_committed(parts[0])
            if step is None or not parts[1]:
                continue
            out.setdefault(step, {})[parts[1]] = size
        return out

    def _read_manifest(self, step: int) -> tuple[Manifest, bytes]:
        try:
            raw = self.store.get_bytes(_snapshot_key(step, layout.MANIFEST_NAME))
        except ObjectNotFound as exc:
            raise SnapshotNotFound(f"no remote snapshot at step {step} in {self.url}") from exc
        manifest = Manifest.from_json(raw)
        if manifest.step != step:
            raise CorruptSnapshot(f"manifest says step {manifest.step}, prefix says {step}")
        return manifest, raw

    def read_manifest(self, step: int) -> Manifest:
        return self._read_manifest(step)[0]

    def list(self) -> builtins.list[SnapshotInfo]:
        """Remote snapshots with a manifest, oldest first; prefixes without one are invisible.

        Manifests are parsed (one small GET each) and file sizes compared with the listing; a
        snapshot whose manifest is unreadable or whose objects are missing or of the wrong size
        is listed with valid=False, otherwise valid=None (checksums not checked).
        """
        out = []
        for step, files in sorted(self._listing().items()):
            if layout.MANIFEST_NAME not in files:
                continue
            info = SnapshotInfo(
                step=step, path=self.path(step), tier=self.tier, manifest=None, valid=None
            )
            try:
                manifest, _ = self._read_manifest(step)
            except SnapshotNotFound:
                continue  # deleted between listing and reading
            except CorruptSnapshot as exc:
                newer = isinstance(exc, NewerSnapshotFormat)
                out.append(replace(info, valid=False, reason=str(exc), newer_format=newer))
                continue
            info = replace(info, manifest=manifest)
            reason = self._size_problem(manifest, files)
            out.append(replace(info, valid=False, reason=reason) if reason else info)
        return out

    @staticmethod
    def _size_problem(manifest: Manifest, files: Mapping[str, int]) -> str | None:
        for name, entry in sorted(manifest.files.items()):
            size = files.get(name)
            if size is None:
                return f"{name}: missing"
            if size != entry.size:
                return f"{name}: size {size} != manifest {entry.size}"
        return None

    def validate(self, step: int, *, verify_checksums: bool = True) -> SnapshotInfo:
        """Manifest, then each object's size (and, with `verify_checksums`, its checksum, streamed).

        With checksums (and :attr:`verify_content`, the default) a trainer snapshot's content
        digest is recomputed from the streamed bytes and compared with the manifest's.
        Network failures raise (`TransientStorageError`, ...): a snapshot is never declared
        invalid because the store was unreachable.
        """
        info = SnapshotInfo(
            step=step, path=self.path(step), tier=self.tier, manifest=None, valid=False
        )
        try:
            manifest, _ = self._read_manifest(step)
        except (CorruptSnapshot, SnapshotNotFound) as exc:
            return replace(info, reason=str(exc), newer_format=isinstance(exc, NewerSnapshotFormat))
        info = replace(info, manifest=manifest)
        content = verify_checksums and self.verify_content
        if content and is_sharded(manifest):
            try:
                self._validate_sharded(step, manifest)
            except CorruptSnapshot as exc:
                return replace(info, reason=str(exc))
            return replace(info, valid=True)
        plan: ContentPlan | None = None
        try:
            for name in _download_order(manifest.files) if content else sorted(manifest.files):
                entry = manifest.files[name]
                data = self._check_object(
                    step, name, entry, verify_checksums,
                    plan if name == layout.TENSORS_FILE else None, manifest.digest,
                )
                if content and name == layout.TREE_FILE and data is not None:
                    plan = self._plan(manifest, data)
        except CorruptSnapshot as exc:
            return replace(info, reason=str(exc))
        return replace(info, valid=True)

    def _validate_sharded(self, step: int, manifest: Manifest) -> None:
        """Every object of a sharded snapshot streamed through storage.sharded's validator."""

        def read_small(name: str) -> bytes:
            return self._get_tree(_snapshot_key(step, name), manifest.files[name], label=name)

        def stream(name: str, sink: Any) -> None:
            entry = manifest.files[name]
            self._check_object(step, name, entry, False)  # presence and size first
            try:
                self.store.get_into(_snapshot_key(step, name), sink, expected_size=entry.size)
            except ObjectNotFound as exc:
                raise CorruptSnapshot(f"{name}: missing") from exc

        validate_files(manifest, read_small, stream)

    @staticmethod
    def _plan(manifest: Manifest, tree_json: bytes) -> ContentPlan | None:
        tensors = manifest.files.get(layout.TENSORS_FILE)
        plan = plan_from_json(tree_json, tensors.size if tensors is not None else 0)
        if plan is not None and tensors is None:
            raise CorruptSnapshot(
                f"{layout.TREE_FILE} describes an arena but the manifest lists no "
                f"{layout.TENSORS_FILE}"
            )
        return plan

    def _check_object(
        self,
        step: int,
        name: str,
        entry: FileEntry,
        verify: bool,
        content: ContentPlan | None = None,
        digest: str = "",
    ) -> bytes | None:
        """Check one object; returns its bytes when it is the (verified) tree."""
        key = _snapshot_key(step, name)
        size = self.store.head(key)
        if size is None:
            raise CorruptSnapshot(f"{name}: missing")
        if size != entry.size:
            raise CorruptSnapshot(f"{name}: size {size} != manifest {entry.size}")
        if not verify:
            return None
        if name == layout.TREE_FILE:
            return self._get_tree(key, entry, label=name)
        sink = _HashSink(entry)
        writable: Any = sink if content is None else _ContentSink(sink, content.hasher())
        try:
            self.store.get_into(key, writable, expected_size=entry.size)
        except ObjectNotFound as exc:
            raise CorruptSnapshot(f"{name}: missing") from exc
        if sink.hash.hexdigest() != entry.checksum:
            raise CorruptSnapshot(f"{name}: checksum mismatch")
        if isinstance(writable, _ContentSink):
            check_digest(writable.hasher.finish(sink.hash), digest, name)
        return None

    def newest_valid(
        self, *, verify_checksums: bool = False, max_step: int | None = None
    ) -> SnapshotInfo | None:
        """The highest-step valid remote snapshot, skipping invalid ones with a logged reason."""
        for info in reversed(self.list()):
            if max_step is not None and info.step > max_step:
                continue
            if info.valid is False:
                log.warning("snapshot.invalid", step=info.step, reason=info.reason, tier=self.tier)
                continue
            checked = self.validate(info.step, verify_checksums=verify_checksums)
            if checked.valid:
                return checked
            log.warning("snapshot.invalid", step=info.step, reason=checked.reason, tier=self.tier)
        return None

    # -- upload -----------------------------------------------------------------------------

    def upload(
        self,
        local_store: LocalSnapshotStore,
        step: int,
        progress: TransferProgress | None = None,
        on_phase: Callable[[str], None] | None = None,
        pacing: Pacing | None = None,
    ) -> UploadResult:
        """Mirror the committed local snapshot at `step`: data objects first, manifest last.

        `on_phase(name)` is called at "mirror_after_part" (the first data part is stored) and
        "mirror_before_manifest" (all data stored, manifest not yet): fault-injection points.
        `pacing` (the mirror's) lowers the priority of the threads the upload starts and paces
        the bytes sent. Each local byte is SHA-256-hashed once, as it is read for sending, and
        must match the local manifest before the object is made visible.

        Idempotent: if the same snapshot (same digest and files) is already remote, nothing is
        uploaded (`skipped=True`). A different snapshot already committed at this step raises
        `SnapshotConflict`. Local bytes that no longer match the local manifest raise
        `CorruptSnapshot` and nothing becomes visible remotely.
        """
        started = time.monotonic()
        local_dir = local_store.path(step)
        manifest = local_store.read_manifest(step)
        try:
            with open(f"{local_dir}/{layout.MANIFEST_NAME}", "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise CorruptSnapshot(
                f"local manifest of step {step} unreadable: {exc.strerror}"
            ) from exc
        if Manifest.from_json(raw) != manifest:
            raise CorruptSnapshot(f"local manifest of step {step} changed while reading it")

        if self._already_there(step, manifest):
            return UploadResult(
                step=step, bytes=0, seconds=time.monotonic() - started, skipped=True
            )

        def fire(name: str) -> None:
            if on_phase is not None:
                on_phase(name)

        counter = _Counter(
            manifest.total_bytes, progress, on_first=lambda: fire("mirror_after_part")
        )
        # Largest first: the long transfer starts while the pool is fresh; order is irrelevant
        # for correctness because nothing is visible before the manifest.
        for name, entry in sorted(manifest.files.items(), key=lambda kv: -kv[1].size):
            self.store.put_file(
                _snapshot_key(step, name),
                f"{local_dir}/{name}",
                size=entry.size,
                expected=entry,
                progress=counter,
                pacing=pacing,
            )
        fire("mirror_before_manifest")
        if not self.store.put_bytes(
            _snapshot_key(step, layout.MANIFEST_NAME), raw, if_none_match=True
        ):
            # Someone committed this step between our check and our commit.
            if self._already_there(step, manifest):
                log.info("remote.upload_raced_same_snapshot", step=step)
                return UploadResult(
                    step=step, bytes=0, seconds=time.monotonic() - started, skipped=True
                )
            raise TransientStorageError(
                f"step {step}: the remote manifest existed at commit time but is gone now; retry"
            )
        seconds = time.monotonic() - started
        log.info(
            "remote.uploaded",
            step=step,
            bytes=manifest.total_bytes,
            seconds=round(seconds, 3),
            mb_per_s=round(manifest.total_bytes / 1e6 / max(seconds, 1e-9), 1),
        )
        return UploadResult(step=step, bytes=manifest.total_bytes, seconds=seconds, skipped=False)

    def _already_there(self, step: int, manifest: Manifest) -> bool:
        """True if this very snapshot is committed remotely; SnapshotConflict if another is."""
        try:
            remote, _ = self._read_manifest(step)
        except SnapshotNotFound:
            return False
        except CorruptSnapshot as exc:
            raise SnapshotConflict(
                f"step {step}: an unreadable manifest is already committed at {self.path(step)} "
                f"({exc}); delete it to mirror this step"
            ) from exc
        if remote.format_version != manifest.format_version and remote.run_id == manifest.run_id:
            # This run's own snapshot of the step in another format (saved before an upgrade or
            # a downgrade, then replayed): the digests follow other definitions, so they cannot
            # say whether the states are equal; the remote copy is valid and stays.
            log.info(
                "remote.kept_other_format",
                step=step,
                remote_format=remote.format_version,
                local_format=manifest.format_version,
            )
            return True
        if remote.digest != manifest.digest:
            raise SnapshotConflict(
                f"step {step}: a different snapshot is already committed at {self.path(step)} "
                f"(remote digest {remote.digest}, local {manifest.digest})"
            )
        if dict(remote.files) != dict(manifest.files):
            # Same training state, different bytes (e.g. another node's save of the same step).
            # If our data objects overwrote theirs, the remote copy no longer matches its
            # manifest; validation with checksums will say so.
            log.warning(
                "remote.same_digest_different_files",
                step=step,
                detail="the remote snapshot has the same digest but different files; verify it",
            )
        return True

    # -- download ---------------------------------------------------------------------------

    def download(
        self,
        step: int,
        local_store: LocalSnapshotStore,
        progress: TransferProgress | None = None,
    ) -> SnapshotInfo:
        """Download the remote snapshot at `step` into `local_store`, verified, then committed.

        `CorruptSnapshot` (nothing committed locally) if any object is missing, has the wrong
        size or checksum, or the manifest is unreadable.
        """
        started = time.monotonic()
        manifest, raw = self._read_manifest(step)
        counter = _Counter(manifest.total_bytes, progress)
        writer = local_store.begin(step)
        plan: ContentPlan | None = None
        try:
            for name in _download_order(manifest.files):
                entry = manifest.files[name]
                key = _snapshot_key(step, name)
                if name == layout.TREE_FILE:
                    # Small: held in memory to plan the content check of the arena that follows.
                    tree = self._get_tree(key, entry, label=f"step {step}: {layout.TREE_FILE}",
                                          missing="missing remotely")
                    writer.write_bytes(name, tree, algorithm=entry.algorithm)
                    counter(len(tree))
                    plan = self._plan(manifest, tree)
                    continue
                sink: ContentHasher | None = None
                with writer.open(name, algorithm=entry.algorithm) as f:
                    target: Any = f
                    if plan is not None and name == layout.TENSORS_FILE:
                        target = _ContentSink(f, plan.hasher())
                        sink = target.hasher
                    try:
                        self.store.get_into(key, target, expected_size=entry.size, progress=counter)
                    except ObjectNotFound as exc:
                        raise CorruptSnapshot(f"step {step}: {name}: missing remotely") from exc
                if sink is not None:
                    check_digest(sink.finish(f.hasher), arena_digest_expected(manifest),
                                 f"step {step}: {name}")
            writer.commit_manifest(manifest, raw=raw)
        except BaseException:
            writer.abort()
            raise
        seconds = time.monotonic() - started
        log.info(
            "remote.downloaded",
            step=step,
            bytes=manifest.total_bytes,
            seconds=round(seconds, 3),
            mb_per_s=round(manifest.total_bytes / 1e6 / max(seconds, 1e-9), 1),
        )
        return SnapshotInfo(
            step=step,
            path=local_store.path(step),
            tier=local_store.tier,
            manifest=manifest,
            valid=True,
        )

    def _get_tree(self, key: str, entry: FileEntry, *, label: str, missing: str = "missing") -> bytes:
        """``tree.json``'s bytes, verified against ``entry`` (it is small: fetched whole)."""
        try:
            data = self.store.get_bytes(key)
        except ObjectNotFound as exc:
            raise CorruptSnapshot(f"{label}: {missing}") from exc
        if len(data) != entry.size or checksum_of(data, entry.algorithm) != entry.checksum:
            raise CorruptSnapshot(f"{label}: checksum mismatch")
        return data

    # -- deletion ---------------------------------------------------------------------------

    def delete(self, step: int) -> None:
        """Delete the remote snapshot: manifest first (it disappears at once), then the data."""
        prefix = f"{_SNAP}{layout.snapshot_dirname(step)}/"
        keys = [k for k, _ in self.store.list(prefix)]
        manifest_key = prefix + layout.MANIFEST_NAME
        ordered = [manifest_key] + [k for k in keys if k != manifest_key]
        self.store.delete(ordered)

    # -- run state --------------------------------------------------------------------------

    def put_state(self, node_rank: int, doc: Mapping[str, Any]) -> None:
        """Store one node's run state under `run/node-<R>/state.json`."""
        data = (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
        self.store.put_bytes(f"{RUN_DIR}/node-{int(node_rank)}/state.json", data)

    def get_state(self) -> builtins.list[dict[str, Any]]:
        """Every node's mirrored run state, by node rank; unreadable documents are skipped."""
        out: builtins.list[tuple[int, dict[str, Any]]] = []
        for key, _ in self.store.list(f"{RUN_DIR}/node-"):
            m = _NODE_STATE.fullmatch(key)
            if m is None:
                continue
            with contextlib.suppress(ObjectNotFound):
                data = self.store.get_bytes(key)
                try:
                    doc = json.loads(data)
                except ValueError:
                    log.warning("remote.state_unreadable", key=key)
                    continue
                if isinstance(doc, dict):
                    out.append((int(m.group(1)), doc))
        return [doc for _, doc in sorted(out, key=lambda t: t[0])]


__all__ = ["RemoteSnapshotStore", "TransferProgress", "UploadResult"]

if TYPE_CHECKING:
    # mypy proves here that the store is what the mirror types against (storage.tier).
    _is_remote_tier: type[RemoteTier] = RemoteSnapshotStore
