"""Storage owns its interfaces: the tier protocols match both stores, old import paths still work."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Protocol

import pytest

import storage
import storage.local
import storage.objectstore
import storage.remote
import storage.tier
from storage.local import LocalSnapshotStore
from storage.remote import RemoteSnapshotStore
from storage.tier import LocalTier, RemoteTier, SnapshotTier


def _members(proto: type) -> set[str]:
    """Methods a protocol declares, its bases' included (object/Protocol/Generic machinery not)."""
    names: set[str] = set()
    for klass in proto.__mro__:
        if klass in (object, Protocol) or not getattr(klass, "_is_protocol", False):
            continue
        names.update(n for n, v in vars(klass).items() if inspect.isfunction(v) and not n.startswith("_"))
    return names


def _shape(fn: object) -> list[tuple[str, object, bool]]:
    """(name, kind, has default) of each parameter: what a caller through the protocol relies on."""
    params = list(inspect.signature(fn).parameters.values())  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default is not inspect.Parameter.empty) for p in params]


@pytest.mark.parametrize(
    ("proto", "impl"),
    [
        (SnapshotTier, LocalSnapshotStore),
        (LocalTier, LocalSnapshotStore),
        (SnapshotTier, RemoteSnapshotStore),
        (RemoteTier, RemoteSnapshotStore),
    ],
)
def test_store_implements_protocol(proto: type, impl: type) -> None:
    # mypy checks this statically (storage/local.py, storage/remote.py); this is the runtime twin.
    members = _members(proto)
    assert {"list", "validate", "delete"} <= members
    for name in sorted(members):
        declared = next(vars(k)[name] for k in proto.__mro__ if name in vars(k))
        assert _shape(getattr(impl, name)) == _shape(declared), f"{impl.__name__}.{name}"


def test_extensions_add_to_the_common_part() -> None:
    common = _members(SnapshotTier)
    assert _members(LocalTier) - common == {"cleanup_abandoned"}
    assert _members(RemoteTier) - common == {
        "upload", "download", "put_state", "get_state", "abort_incomplete_uploads", "preflight",
    }


def test_records_keep_their_old_import_paths() -> None:
    assert storage.local.SnapshotInfo is storage.tier.SnapshotInfo is storage.SnapshotInfo
    assert storage.remote.UploadResult is storage.tier.UploadResult is storage.UploadResult
    assert storage.remote.TransferProgress is storage.tier.TransferProgress
    result = storage.tier.UploadResult(step=3, bytes=10, seconds=0.5, skipped=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.step = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        storage.tier.UploadResult(3, 10, 0.5, False)  # type: ignore[misc]  # keyword-only


def test_split_modules_keep_their_old_import_paths() -> None:
    from storage.hashfile import DIRECT_ALIGN, HashingFile
    from storage.objectstore.fsspec_store import FsspecObjectStore
    from storage.objectstore.s3 import S3ObjectStore
    from storage.reading import MappedFile
    from storage.writer import PhaseHook, SnapshotWriter

    assert storage.local.HashingFile is HashingFile and storage.local.DIRECT_ALIGN == DIRECT_ALIGN
    assert storage.local.MappedFile is MappedFile
    assert storage.local.SnapshotWriter is SnapshotWriter and storage.local.PhaseHook is PhaseHook
    assert storage.objectstore.S3ObjectStore is S3ObjectStore
    assert storage.objectstore.FsspecObjectStore is FsspecObjectStore
    for name in ("ObjectStore", "Progress", "Writable", "open_object_store"):
        assert hasattr(storage.objectstore, name)


def test_one_translation_of_file_errors() -> None:
    # The OS-error helpers live once, in storage.errors; no module keeps a private copy.
    import storage.hashfile
    import storage.reading
    import storage.writer

    for mod in (storage.local, storage.reading, storage.writer, storage.hashfile):
        assert not hasattr(mod, "_file_errors") and not hasattr(mod, "_raise_storage")
