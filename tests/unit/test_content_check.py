"""End-to-end content check and containment of snapshot files.

A snapshot whose files were rewritten together with the manifest's checksums (tests.support.tamper)
must never be applied: the ranks' verified load and checksum validation both recompute the
content digest (storage.content, without torch) and refuse it with CorruptSnapshot. The decoder
checks every tensor record against the region it reads. Every file a snapshot names is a regular
file inside it: symlinks, fifos and names that leave the directory make it invalid, locally and
when downloaded from the mirror.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import LocalSnapshotStore, Manifest, StorageSettings, content, layout
from storage.blockhash import BlockHasher
from storage.errors import CorruptSnapshot
from storage.manifest import FileEntry
from storage.reading import open_snapshot_file, read_verified
from storage.remote import RemoteSnapshotStore
from tests.support.tamper import retype_tensor, rewrite_manifest_entry
from tests.unit.test_trainer_checkpoint import Job
from trainer import codec
from trainer.errors import CodecError

REPO = Path(__file__).resolve().parents[2]


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "shared": {
            "model": OrderedDict(w=torch.randn(5, 3), b=torch.zeros(3, dtype=torch.float64)),
            "empty": torch.zeros(0, 4),
            "np": np.arange(7, dtype=np.int16),
            "half": torch.ones(3, dtype=torch.bfloat16),
            "flag": torch.tensor([True, False]),
        },
        "ranks": {0: {"step": 3, "rng": torch.arange(9, dtype=torch.uint8)}},
        "world_size": 1,
    }


def _files(obj: Any) -> tuple[dict[str, Any], bytes, str]:
    tree_json, arena, digest = codec.encode_to_bytes(obj)
    return json.loads(tree_json), arena, digest


def _tensor_records(tree: dict[str, Any]) -> list[dict[str, Any]]:
    return list(content.tensor_records(tree["root"]))


# -- the digest without torch ----------------------------------------------------------------


def test_storage_digest_is_the_codec_digest() -> None:
    obj = _state()
    tree, arena, digest = _files(obj)
    plan = content.content_plan(tree, len(arena))
    assert plan.digest_of(arena) == digest == codec.state_digest(obj)
    assert codec.snapshot_digests(json.dumps(tree).encode(), arena)[0] == digest


@settings(max_examples=60, deadline=None)
@given(chunk=st.integers(min_value=1, max_value=300))
def test_streamed_digest_does_not_depend_on_chunking(chunk: int) -> None:
    tree, arena, digest = _files(_state())
    hasher = content.content_plan(tree, len(arena)).hasher()
    file_hasher = BlockHasher()
    view = memoryview(arena)
    for start in range(0, len(arena), chunk):
        hasher.update(view[start : start + chunk])
        file_hasher.update(view[start : start + chunk])
    assert hasher.finish(file_hasher) == digest


def test_storage_content_never_imports_torch() -> None:
    code = (
        "import sys, storage, storage.content, storage.local, storage.reading\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'trainer')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=REPO)


def test_a_retyped_tensor_changes_the_digest() -> None:
    tree, arena, digest = _files(_state())
    record = next(r for r in _tensor_records(tree) if r["dtype"] == "float32")
    record["dtype"] = "int32"
    assert content.content_plan(tree, len(arena)).digest_of(arena) != digest


# -- the decoder checks every record against its region ---------------------------------------


def _mutated(mutate: Any) -> tuple[dict[str, Any], bytes]:
    tree, arena, _ = _files(_state())
    mutate(next(r for r in _tensor_records(tree) if r["dtype"] == "float32" and r["nbytes"]))
    return tree, arena


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r: r.update(nbytes=r["nbytes"] + 4), "nbytes|outside"),  # more than its shape
        (lambda r: r.update(nbytes=10**9), "outside the arena"),  # more than the arena
        (lambda r: r.update(shape=[5, 4]), "nbytes does not match"),  # shape*itemsize != nbytes
        (lambda r: r.update(dtype="float64"), "nbytes does not match"),
        (lambda r: r.update(shape=[-5, -3]), "bad shape"),  # product right, dims negative
        (lambda r: r.update(shape=["5", 3]), "bad shape"),  # never coerced
        (lambda r: r.update(shape=[True, 15]), "bad shape"),
        (lambda r: r.update(offset=r["offset"] + 1), "aligned|overlap|outside"),
        (lambda r: r.update(offset=-64), "bad tensor record"),
        (lambda r: r.update(dtype="Tensor"), "unknown torch dtype"),
        (lambda r: r.update(dtype=["float32"]), "unknown torch dtype"),
        (lambda r: r.update(dtype="qint8"), "unsupported torch dtype"),
        (lambda r: r.pop("shape"), "bad shape"),
    ],
)
def test_decoder_refuses_records_that_do_not_fit_their_region(mutate: Any, match: str) -> None:
    tree, arena = _mutated(mutate)
    with pytest.raises(CodecError, match=match):
        codec.decode_tree(tree, bytearray(arena))


def test_decoder_refuses_overlapping_regions() -> None:
    tree, arena, _ = _files(_state())
    first, second = [r for r in _tensor_records(tree) if r["nbytes"]][:2]
    second["offset"] = first["offset"]
    with pytest.raises(CodecError, match="overlap"):
        codec.decode_tree(tree, bytearray(arena))
    with pytest.raises(CorruptSnapshot, match="overlap"):
        content.content_plan(tree, len(arena))


def test_decoder_refuses_a_tensor_the_digest_does_not_cover() -> None:
    tree, arena, _ = _files(_state())
    record = copy.deepcopy(next(r for r in _tensor_records(tree) if r["nbytes"]))
    model = tree["root"]["v"][tree["root"]["k"].index("shared")]
    model["k"].append(record)  # a tensor as a dict key: decoded, but no digest covers it
    model["v"].append(1)
    with pytest.raises(CodecError):
        codec.decode_tree(tree, bytearray(arena))


def _junk_trees() -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=8),
        st.sampled_from(["tensor", "ndarray", "dict", "tuple", "float", "npscalar", "dtype",
                         "device", "bytes", "float32", "<f4", "|b1", "nan", "cpu", "AAAA"]),
    )
    return st.recursive(
        leaves,
        lambda kids: st.one_of(
            st.lists(kids, max_size=4),
            st.dictionaries(st.sampled_from(["t", "k", "v", "dtype", "shape", "offset", "nbytes",
                                             "order", "cls", "meta"]), kids, max_size=6),
        ),
        max_leaves=25,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(root=_junk_trees())
def test_junk_trees_are_codec_errors_never_crashes(root: Any) -> None:
    arena = bytearray(256)
    tree = {"format": codec.FORMAT, "arena_nbytes": len(arena), "root": root}
    with contextlib.suppress(CodecError):
        codec.decode_tree(tree, arena)
    with contextlib.suppress(CorruptSnapshot):
        content.content_plan(tree, len(arena))


@settings(max_examples=200, deadline=None)
@given(
    field=st.sampled_from(["dtype", "shape", "offset", "nbytes", "t"]),
    value=st.one_of(st.integers(-100, 10**6), st.text(max_size=6), st.none(),
                    st.lists(st.integers(-3, 40), max_size=3), st.booleans()),
    which=st.integers(0, 20),
)
def test_mutated_records_decode_exactly_or_fail_typed(field: str, value: Any, which: int) -> None:
    """Any single-field change: a CodecError, or a state whose regions the digest covers."""
    tree, arena, _ = _files(_state())
    records = _tensor_records(tree)
    records[which % len(records)][field] = value
    try:
        _, digest = codec.decode_tree(tree, bytearray(arena))
    except CodecError:
        return
    assert digest == content.content_plan(tree, len(arena)).digest_of(arena)


# -- the verified load applies nothing whose content digest differs ---------------------------


def _snapshot(root: Path, step: int) -> Path:
    return root / "snapshots" / layout.snapshot_dirname(step)


@pytest.mark.timeout(120)
def test_resume_refuses_a_snapshot_whose_checksums_agree_but_content_does_not(tmp_path: Path) -> None:
    Job(tmp_path).train(10, finish=False)
    snap = _snapshot(tmp_path, 10)
    assert retype_tensor(snap) == "int32"
    store = LocalSnapshotStore(str(tmp_path))
    files_only = LocalSnapshotStore(str(tmp_path), verify_content=False)
    assert files_only.validate(10, verify_checksums=True).valid  # the files agree
    job = Job(tmp_path, resume="10")
    with pytest.raises(CorruptSnapshot, match="content digest"):
        job.ckpt.resume()
    info = store.validate(10)  # with checksums, content too: what the supervisor runs
    assert info.valid is False and info.reason is not None and "content digest" in info.reason
    assert Job(tmp_path).ckpt.resume() == 5  # auto mode falls back to the previous one


@pytest.mark.timeout(120)
def test_resume_refuses_a_tree_that_does_not_fit_its_arena(tmp_path: Path) -> None:
    """Checksums rewritten over a tree that claims more bytes than its region: CorruptSnapshot."""
    Job(tmp_path).train(5, finish=False)
    snap = _snapshot(tmp_path, 5)
    tree = json.loads((snap / "tree.json").read_text())
    record = max(_tensor_records(tree), key=lambda r: r["nbytes"])
    record["shape"] = [record["shape"][0] + 1, *record["shape"][1:]]
    (snap / "tree.json").write_text(json.dumps(tree))
    rewrite_manifest_entry(snap, "tree.json")
    with pytest.raises(CorruptSnapshot):
        Job(tmp_path, resume="5").ckpt.resume()


# -- containment -----------------------------------------------------------------------------


def _commit(store: LocalSnapshotStore, step: int) -> Manifest:
    tree_json, arena, digest = codec.encode_to_bytes(_state())
    w = store.begin(step)
    w.write_bytes("tree.json", tree_json)
    w.write_bytes("tensors.bin", arena)
    return w.commit(run_id="r", epoch=0, world_size=1, digest=digest)


@pytest.fixture
def store(tmp_path: Path) -> LocalSnapshotStore:
    s = LocalSnapshotStore(str(tmp_path / "ck"))
    _commit(s, 1)
    _commit(s, 2)
    return s


@pytest.mark.parametrize("name", ["tensors.bin", "tree.json"])
def test_a_symlink_to_an_identical_file_outside_is_invalid(
    store: LocalSnapshotStore, tmp_path: Path, name: str
) -> None:
    """Even pointing at the very same bytes: what lies outside the snapshot is not read."""
    path = Path(store.path(2), name)
    outside = tmp_path / "outside"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(outside)
    for verify in (False, True):
        info = store.validate(2, verify_checksums=verify)
        assert info.valid is False and info.reason == f"{name}: a symlink, not a file of the snapshot"
    with pytest.raises(CorruptSnapshot, match="symlink"):
        store.open_verified(2, name)
    with pytest.raises(CorruptSnapshot, match="symlink"):
        store.map_verifying(2, name)
    newest = store.newest_valid()
    assert newest is not None and newest.step == 1


def test_a_symlinked_manifest_is_invalid(store: LocalSnapshotStore, tmp_path: Path) -> None:
    path = Path(store.path(2), "manifest.json")
    outside = tmp_path / "manifest.json"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(outside)
    info = store.validate(2)
    assert info.valid is False and info.reason is not None and "symlink" in info.reason
    assert [i.valid for i in store.list()] == [None, False]


@pytest.mark.timeout(30)
def test_a_fifo_is_invalid_and_never_blocks(store: LocalSnapshotStore) -> None:
    path = Path(store.path(2), "tensors.bin")
    path.unlink()
    os.mkfifo(path)
    info = store.validate(2)
    assert info.valid is False and info.reason == "tensors.bin: not a regular file"
    with pytest.raises(CorruptSnapshot, match="not a regular file \\(a fifo\\)"):
        open_snapshot_file(str(path), "tensors.bin")


def test_a_symlink_to_a_device_is_refused_at_open(tmp_path: Path) -> None:
    link = tmp_path / "tensors.bin"
    link.symlink_to("/dev/zero")
    with pytest.raises(CorruptSnapshot, match="symlink"):
        read_verified(str(link), "tensors.bin", FileEntry(size=4, checksum="0" * 64), None, 4)
    with pytest.raises(CorruptSnapshot, match="a character device"):
        open_snapshot_file("/dev/zero", "tensors.bin")


@pytest.mark.parametrize(
    "name", ["../x", "/etc/passwd", "a/b", "..", ".", "a\\b", "a\x00b", "", ".hidden", "manifest.json"]
)
def test_manifest_naming_a_path_outside_is_unreadable(name: str) -> None:
    doc = json.loads(
        Manifest(run_id="r", step=1, epoch=0, world_size=1, digest="sha256:" + "0" * 64,
                 created_at=1.0, files={"a": FileEntry(size=0, checksum="0" * 64)}).to_json()
    )
    doc["files"] = {name: {"size": 0, "checksum": "0" * 64}}
    with pytest.raises(CorruptSnapshot, match="unsafe file name"):
        Manifest.from_json(json.dumps(doc).encode())


@settings(max_examples=200, deadline=None)
@given(name=st.text(max_size=12))
def test_safe_names_stay_inside_the_snapshot(name: str) -> None:
    if layout.is_safe_filename(name):
        base = "/snap/step-000000000001"
        assert os.path.dirname(os.path.normpath(os.path.join(base, name))) == base
        assert name != layout.MANIFEST_NAME


# -- the mirror ------------------------------------------------------------------------------


def _remote(tmp_path: Path) -> RemoteSnapshotStore:
    return RemoteSnapshotStore((tmp_path / "mirror").as_uri(), settings=StorageSettings.from_env())


@pytest.mark.parametrize("name", ["../escaped", "/tmp/escaped-abs", "sub/escaped"])
def test_remote_manifest_with_a_bad_name_is_refused(
    store: LocalSnapshotStore, tmp_path: Path, name: str
) -> None:
    remote = _remote(tmp_path)
    remote.upload(store, 2)
    key = f"snapshots/{layout.snapshot_dirname(2)}/manifest.json"
    doc = json.loads(remote.store.get_bytes(key))
    doc["files"][name] = {"size": 3, "checksum": "0" * 64}
    remote.store.delete([key])
    remote.store.put_bytes(key, json.dumps(doc).encode())
    dst = LocalSnapshotStore(str(tmp_path / "dst"))
    with pytest.raises(CorruptSnapshot, match="unsafe file name"):
        remote.download(2, dst)
    assert remote.validate(2).valid is False
    assert dst.list() == [] and dst.cleanup_abandoned() == []
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped-abs").exists()
    assert not (tmp_path / "dst" / "escaped").exists()


def test_remote_deep_validation_and_download_check_content(
    store: LocalSnapshotStore, tmp_path: Path
) -> None:
    retype_tensor(Path(store.path(2)))
    remote = _remote(tmp_path)
    remote.upload(store, 2)
    files_only = RemoteSnapshotStore(remote.url, store=remote.store, verify_content=False)
    assert files_only.validate(2, verify_checksums=True).valid
    info = remote.validate(2)
    assert info.valid is False and info.reason is not None and "content digest" in info.reason
    dst = LocalSnapshotStore(str(tmp_path / "dst"))
    with pytest.raises(CorruptSnapshot, match="content digest"):
        remote.download(2, dst)
    assert dst.list() == []
    remote.upload(store, 1)
    assert remote.download(1, dst).valid and dst.validate(1).valid


# -- the CLI ---------------------------------------------------------------------------------


@pytest.fixture
def _reset_structlog() -> Any:
    yield
    # cli.main() configures structlog onto this test's captured output, which pytest closes.
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.mark.usefixtures("_reset_structlog")
def test_snapshots_verify_deep_reports_content_mismatch(
    store: LocalSnapshotStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator import cli

    retype_tensor(Path(store.path(2)))
    ck = str(tmp_path / "ck")

    def records(*flags: str) -> list[dict[str, Any]]:
        assert cli.main(["snapshots", "--checkpoint-dir", ck, "--json", *flags]) == 0
        out: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
        return out

    files = records("--verify")
    assert [r["valid"] for r in files] == [True, True] and not files[0]["verified_content"]
    assert records("--verify=files") == files
    deep = records("--verify=deep")
    assert [r["valid"] for r in deep] == [True, False]
    assert "content digest" in deep[1]["reason"] and deep[1]["verified_content"]
    assert records("--verify", "deep") == deep
    assert cli.main(["snapshots", "--checkpoint-dir", ck, "--verify=deep"]) == 0
    table = capsys.readouterr().out
    assert "content digest" in table and "checksums and content digests verified" in table


def test_base64_in_trees_is_part_of_the_digest() -> None:
    """Non-tensor leaves are in the canonical tree: changing one changes the digest."""
    obj = {"b": b"abc", "x": 1}
    tree, arena, digest = _files(obj)
    tree["root"]["v"][0]["v"] = base64.b64encode(b"abd").decode()
    assert content.content_plan(tree, len(arena)).digest_of(arena) != digest
