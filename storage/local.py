"""The local snapshot tier: atomic commit, validation and newest-valid selection on one disk.

A snapshot is written into a temporary directory, every file hashed while it is written (no
second read pass) and fsynced, the manifest written last and fsynced, the directory renamed into
place and the parent directory fsynced (:mod:`storage.writer`, which states the call order). A
crash at any point leaves either the previous state or the complete new snapshot, never a half
snapshot under a committed name. Reads verify sizes and checksums against the manifest before a
single byte is handed to the caller (:mod:`storage.reading`). This module is the store that ties
them together: listing, validation, selection, deletion; it re-exports the names that used to
live here.

Containment: a snapshot is only what lies inside its directory. Every name a manifest lists is a
plain file name (:func:`storage.layout.is_safe_filename`, checked when the manifest is parsed),
and each file must be a regular file of that directory: a symlink (wherever it points), a fifo,
socket, device or directory under a listed name makes the snapshot invalid with a reason, and
no read follows a link (:func:`storage.reading.open_snapshot_file`).

Validation with checksums also checks the content digest of a trainer snapshot (``tree.json``
with a ``"format"`` and ``tensors.bin``, see :mod:`storage.content`), in the same read of
``tensors.bin``: checksums agreeing with a manifest whose ``digest`` the files do not decode to
(an encoder bug, a tampered tree) are not a valid snapshot.
"""

from __future__ import annotations

import builtins
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import structlog

from contract.atomic import fsync_dir
from storage import layout
from storage.content import ContentPlan, plan_from_json
from storage.errors import (
    CorruptSnapshot,
    NewerSnapshotFormat,
    SnapshotNotFound,
    file_errors,
    os_error,
)
from storage.hashfile import DIRECT_ALIGN, HashingFile
from storage.manifest import FileEntry, Manifest
from storage.reading import MappedFile, open_snapshot_file, read_verified
from storage.settings import StorageSettings
from storage.sharded import is_sharded, validate_local
from storage.tier import LocalTier, SnapshotInfo
from storage.writer import PhaseHook, SnapshotWriter

log = structlog.get_logger("storage.local")


class LocalSnapshotStore:
    """Snapshots under `<checkpoint_dir>/snapshots` on a local (node-attached) disk."""

    tier = "local"

    def __init__(
        self,
        checkpoint_dir: str,
        *,
        settings: StorageSettings | None = None,
        verify_content: bool = True,
    ) -> None:
        self.checkpoint_dir = os.path.abspath(checkpoint_dir)
        #: Whether validation with checksums also checks a trainer snapshot's content digest
        #: (False: file checksums only, what ``snapshots --verify`` reports).
        self.verify_content = verify_content
        self.root = layout.snapshots_root(self.checkpoint_dir)
        self._settings = settings or StorageSettings.from_env()
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, f"creating {self.root}") from exc

    # -- writing ---------------------------------------------------------------------------

    def begin(self, step: int, *, on_phase: PhaseHook | None = None) -> SnapshotWriter:
        """Start writing the snapshot at `step`; commit or abort the returned writer."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        return SnapshotWriter(root=self.root, step=step, settings=self._settings, on_phase=on_phase)

    # -- listing and validation ------------------------------------------------------------

    def path(self, step: int) -> str:
        return os.path.join(self.root, layout.snapshot_dirname(step))

    def _committed_steps(self) -> Iterator[tuple[int, str]]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for e in entries:
            step = layout.parse_committed(e.name)
            if step is not None and e.is_dir(follow_symlinks=False):
                yield step, e.path

    def list(self) -> list[SnapshotInfo]:
        """Committed snapshots, oldest first by step. Junk names are ignored.

        Manifests are parsed (cheap) but files are not checked: `valid` is None, or False when
        the manifest is missing or unreadable.
        """
        out = []
        for step, path in sorted(self._committed_steps()):
            try:
                manifest = self._load_manifest(step, path)
                out.append(
                    SnapshotInfo(step=step, path=path, tier=self.tier, manifest=manifest, valid=None)
                )
            except CorruptSnapshot as exc:
                out.append(
                    SnapshotInfo(
                        step=step, path=path, tier=self.tier, manifest=None, valid=False,
                        reason=str(exc), newer_format=isinstance(exc, NewerSnapshotFormat),
                    )
                )
        return out

    def _load_manifest(self, step: int, path: str) -> Manifest:
        try:
            with open_snapshot_file(os.path.join(path, layout.MANIFEST_NAME), layout.MANIFEST_NAME) as f:
                data = f.read()
        except FileNotFoundError as exc:
            raise CorruptSnapshot("manifest missing") from exc
        except OSError as exc:
            raise CorruptSnapshot(f"manifest unreadable: {exc.strerror}") from exc
        manifest = Manifest.from_json(data)
        if manifest.step != step:
            raise CorruptSnapshot(f"manifest says step {manifest.step}, directory says {step}")
        return manifest

    def read_manifest(self, step: int) -> Manifest:
        path = self.path(step)
        if not layout.is_real_dir(path):  # what list() would show: symlinks and files are junk
            raise SnapshotNotFound(f"no committed snapshot at step {step} in {self.root}")
        return self._load_manifest(step, path)

    def validate(self, step: int, *, verify_checksums: bool = True) -> SnapshotInfo:
        """Check the snapshot at `step`: manifest, then each file's size (and checksum).

        With checksums (and :attr:`verify_content`, the default) a trainer snapshot's content
        digest is recomputed in the same read of its files and compared with the manifest's.
        """
        path = self.path(step)
        info = SnapshotInfo(step=step, path=path, tier=self.tier, manifest=None, valid=False)
        try:
            manifest = self.read_manifest(step)
        except (CorruptSnapshot, SnapshotNotFound) as exc:
            return replace(info, reason=str(exc), newer_format=isinstance(exc, NewerSnapshotFormat))
        info = replace(info, manifest=manifest)
        content = verify_checksums and self.verify_content
        if content and is_sharded(manifest):
            # Every shard file, the index and the sharding-independent digest (storage.sharded).
            try:
                validate_local(path, manifest, self._settings.read_chunk_bytes)
            except CorruptSnapshot as exc:
                return replace(info, reason=str(exc))
            return replace(info, valid=True)
        try:
            plan, done = self._content_plan(path, manifest) if content else (None, frozenset())
            for name, entry in manifest.files.items():
                if name in done:
                    continue
                if plan is not None and name == layout.TENSORS_FILE:
                    self._check_file(path, name, entry, True, plan, manifest.digest)
                else:
                    self._check_file(path, name, entry, verify_checksums)
        except CorruptSnapshot as exc:
            return replace(info, reason=str(exc))
        return replace(info, valid=True)

    def _content_plan(
        self, path: str, manifest: Manifest
    ) -> tuple[ContentPlan | None, frozenset[str]]:
        """The content plan of a trainer snapshot (None for another kind) and the files read."""
        tree_entry = manifest.files.get(layout.TREE_FILE)
        if tree_entry is None:
            return None, frozenset()
        self._check_file(path, layout.TREE_FILE, tree_entry, False)
        buf = bytearray(tree_entry.size)
        fpath = os.path.join(path, layout.TREE_FILE)
        read_verified(
            fpath, layout.TREE_FILE, tree_entry, memoryview(buf), self._settings.read_chunk_bytes
        )
        tensors = manifest.files.get(layout.TENSORS_FILE)
        plan = plan_from_json(bytes(buf), tensors.size if tensors is not None else 0)
        if plan is not None and tensors is None:
            raise CorruptSnapshot(
                f"{layout.TREE_FILE} describes an arena but the manifest lists no "
                f"{layout.TENSORS_FILE}"
            )
        return plan, frozenset({layout.TREE_FILE})

    def _check_file(
        self,
        path: str,
        name: str,
        entry: FileEntry,
        verify: bool,
        content: ContentPlan | None = None,
        digest: str | None = None,
    ) -> None:
        fpath = os.path.join(path, name)
        with file_errors(name, "checking", fpath):
            st = os.lstat(fpath)  # the name itself: a symlink is never followed
        if stat.S_ISLNK(st.st_mode):
            raise CorruptSnapshot(f"{name}: a symlink, not a file of the snapshot")
        if not stat.S_ISREG(st.st_mode):
            raise CorruptSnapshot(f"{name}: not a regular file")
        size = st.st_size
        if size != entry.size:
            raise CorruptSnapshot(f"{name}: size {size} != manifest {entry.size}")
        if verify:
            read_verified(
                fpath, name, entry, None, self._settings.read_chunk_bytes,
                content=content, expected_digest=digest,
            )

    def newest_valid(
        self,
        *,
        verify_checksums: bool = True,
        cleanup: bool = False,
        max_step: int | None = None,
    ) -> SnapshotInfo | None:
        """The highest-step valid snapshot, skipping (and optionally deleting) invalid ones."""
        for info in reversed(self.list()):
            if max_step is not None and info.step > max_step:
                continue
            checked = self.validate(info.step, verify_checksums=verify_checksums)
            if checked.valid:
                return checked
            log.warning("snapshot.invalid", step=info.step, reason=checked.reason, tier=self.tier)
            if cleanup and not checked.newer_format:
                self.delete(info.step)
                log.info("snapshot.removed_invalid", step=info.step, reason=checked.reason)
        return None

    # -- reading ---------------------------------------------------------------------------

    def read_into(self, step: int, name: str, buffer: memoryview | bytearray) -> Manifest:
        """Stream file `name` of the snapshot into `buffer` (exactly its size), verifying it."""
        manifest = self.read_manifest(step)
        entry = manifest.files.get(name)
        if entry is None:
            raise CorruptSnapshot(f"step {step}: manifest lists no file {name!r}")
        view = memoryview(buffer).cast("B")
        if len(view) != entry.size:
            raise ValueError(f"buffer is {len(view)} bytes, {name} is {entry.size}")
        read_verified(
            os.path.join(self.path(step), name), name, entry, view, self._settings.read_chunk_bytes
        )
        return manifest

    def map_verifying(
        self,
        step: int,
        name: str,
        manifest: Manifest | None = None,
        *,
        content: ContentPlan | None = None,
    ) -> MappedFile:
        """Map file `name` of the snapshot and start verifying it (see :class:`MappedFile`).

        Its size is checked at once; its checksum (and, given the `content` plan of the tree
        whose arena it is, the manifest's content digest) by :meth:`MappedFile.verified`, which
        the caller must pass before trusting anything decoded from the mapping.
        """
        manifest = manifest if manifest is not None else self.read_manifest(step)
        entry = manifest.files.get(name)
        if entry is None:
            raise CorruptSnapshot(f"step {step}: manifest lists no file {name!r}")
        return MappedFile(
            os.path.join(self.path(step), name),
            name,
            entry,
            self._settings.read_chunk_bytes,
            content=content,
            expected_digest=manifest.digest,
        )

    def open_verified(self, step: int, name: str, manifest: Manifest | None = None) -> bytes:
        """The whole content of file `name`, checksum-verified (against `manifest` if given)."""
        manifest = manifest if manifest is not None else self.read_manifest(step)
        entry = manifest.files.get(name)
        if entry is None:
            raise CorruptSnapshot(f"step {step}: manifest lists no file {name!r}")
        buf = bytearray(entry.size)
        read_verified(
            os.path.join(self.path(step), name),
            name,
            entry,
            memoryview(buf),
            self._settings.read_chunk_bytes,
        )
        return bytes(buf)

    # -- deletion --------------------------------------------------------------------------

    def delete(self, step: int) -> None:
        """Remove a committed snapshot; it disappears atomically (rename first), then is freed."""
        path = self.path(step)
        if not layout.is_real_dir(path):
            # Nothing committed there. A file or symlink under the name is junk: never deleted.
            return
        doomed = os.path.join(self.root, layout.temp_dirname(step) + "-deleted")
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return
        fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def cleanup_abandoned(self) -> builtins.list[str]:
        """Remove temporary snapshot dirs left by dead writers. Call only when no writer runs."""
        removed: builtins.list[str] = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        for e in entries:
            # Only directories: a file or symlink under a temporary name is not ours.
            if layout.parse_temp(e.name) is not None and e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
                removed.append(e.path)
                log.info("snapshot.removed_abandoned", path=e.path)
        return removed


__all__ = [
    "DIRECT_ALIGN",
    "HashingFile",
    "LocalSnapshotStore",
    "MappedFile",
    "PhaseHook",
    "SnapshotInfo",
    "SnapshotWriter",
]

if TYPE_CHECKING:
    # mypy proves here that the store is what its consumers type against (storage.tier).
    _is_local_tier: type[LocalTier] = LocalSnapshotStore
