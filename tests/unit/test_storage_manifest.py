"""Manifest: JSON round trip, and every malformation is a CorruptSnapshot (never another error)."""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import CorruptSnapshot, FileEntry, Manifest, StorageError

SHA = "ab" * 32


def _manifest(**over: Any) -> Manifest:
    kw: dict[str, Any] = {
        "run_id": "run-1",
        "step": 25,
        "epoch": 2,
        "world_size": 4,
        "files": {
            "tensors.bin": FileEntry(size=1024, checksum=SHA),
            "tree.json": FileEntry(size=0, checksum="0" * 64),
        },
        "digest": "sha256:" + "cd" * 32,
        "created_at": 1_700_000_000.25,
        "metadata": {"git_commit": "abc", "lr": 0.1, "metrics": {"loss": 1.5}, "hp": [1, None]},
    }
    kw.update(over)
    return Manifest(**kw)


def _doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_manifest().to_json())
    return doc


def _corrupt(data: bytes) -> None:
    with pytest.raises(CorruptSnapshot):
        Manifest.from_json(data)


def test_round_trip() -> None:
    m = _manifest()
    back = Manifest.from_json(m.to_json())
    assert back == m
    assert back.total_bytes == 1024
    assert back.to_json() == m.to_json()
    assert issubclass(CorruptSnapshot, StorageError)


def test_format_1_manifests_still_parse_with_their_plain_sha256() -> None:
    doc = _doc()
    doc["format_version"] = 1
    del doc["checksum_algorithm"]  # very old manifests did not name it
    m = Manifest.from_json(json.dumps(doc).encode())
    assert (m.format_version, m.checksum_algorithm) == (1, "sha256")
    assert {e.algorithm for e in m.files.values()} == {"sha256"}
    assert Manifest.from_json(m.to_json()) == m


def test_a_written_manifest_is_format_2_with_block_checksums() -> None:
    m = _manifest()
    assert (m.format_version, m.checksum_algorithm) == (2, "sha256-b64k")
    with pytest.raises(ValueError, match="does not belong"):
        _manifest(format_version=1)  # files hashed by blocks in a format-1 manifest
    with pytest.raises(ValueError, match="checksum by 'sha256'"):
        _manifest(files={"a": FileEntry(size=1, checksum=SHA, algorithm="sha256")})


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
safe_names = st.text(
    alphabet=st.characters(blacklist_characters="/\\\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=30,
).filter(lambda n: not n.startswith(".") and n != "manifest.json")


@settings(max_examples=150, deadline=None)
@given(
    run_id=st.text(max_size=20),
    step=st.integers(min_value=0, max_value=10**15),
    epoch=st.integers(min_value=0, max_value=10**6),
    world_size=st.integers(min_value=1, max_value=4096),
    files=st.dictionaries(
        safe_names,
        st.builds(
            FileEntry,
            size=st.integers(min_value=0, max_value=2**48),
            checksum=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
        ),
        min_size=1,
        max_size=5,
    ),
    created_at=st.floats(min_value=0, max_value=4e9),
    metadata=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
)
def test_round_trip_property(
    run_id: str,
    step: int,
    epoch: int,
    world_size: int,
    files: dict[str, FileEntry],
    created_at: float,
    metadata: dict[str, Any],
) -> None:
    m = Manifest(
        run_id=run_id,
        step=step,
        epoch=epoch,
        world_size=world_size,
        files=files,
        digest="sha256:" + "1" * 64,
        created_at=created_at,
        metadata=metadata,
    )
    assert Manifest.from_json(m.to_json()) == m


def _set(path: tuple[Any, ...], value: Any) -> bytes:
    doc = _doc()
    target = doc
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return json.dumps(doc).encode()


def _drop(path: tuple[Any, ...]) -> bytes:
    doc = _doc()
    target = doc
    for p in path[:-1]:
        target = target[p]
    del target[path[-1]]
    return json.dumps(doc).encode()


MALFORMED: dict[str, bytes] = {
    "empty": b"",
    "whitespace": b"  \n",
    "not json": b"hello",
    "null": b"null",
    "list": b"[]",
    "number": b"1",
    "string": b'"x"',
    "empty object": b"{}",
    "invalid utf8": b'{"run_id": "\xff\xfe"}',
    "binary": bytes(range(256)),
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep nesting in metadata": _set(("metadata",), 0).replace(
        b'"metadata": 0', b'"metadata": {"x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    ),
    "trailing garbage": _manifest().to_json() + b"}",
    "two documents": _manifest().to_json() * 2,
    # wrong types
    "files is a list": _set(("files",), []),
    "files empty": _set(("files",), {}),
    "file entry is a list": _set(("files", "tensors.bin"), [1, SHA]),
    "file entry is a string": _set(("files", "tensors.bin"), "x"),
    "file entry null": _set(("files", "tensors.bin"), None),
    "size is a string": _set(("files", "tensors.bin", "size"), "1024"),
    "size is a float": _set(("files", "tensors.bin", "size"), 1024.5),
    "size is a bool": _set(("files", "tensors.bin", "size"), True),
    "size is null": _set(("files", "tensors.bin", "size"), None),
    "size negative": _set(("files", "tensors.bin", "size"), -1),
    "checksum is an int": _set(("files", "tensors.bin", "checksum"), 5),
    "checksum null": _set(("files", "tensors.bin", "checksum"), None),
    "checksum short": _set(("files", "tensors.bin", "checksum"), "ab" * 31),
    "checksum long": _set(("files", "tensors.bin", "checksum"), "ab" * 33),
    "checksum uppercase": _set(("files", "tensors.bin", "checksum"), "AB" * 32),
    "checksum not hex": _set(("files", "tensors.bin", "checksum"), "zz" * 32),
    "checksum with prefix": _set(("files", "tensors.bin", "checksum"), "sha256:" + SHA),
    "step is a string": _set(("step",), "25"),
    "step is a float": _set(("step",), 25.0),
    "step is a bool": _set(("step",), True),
    "step negative": _set(("step",), -1),
    "step null": _set(("step",), None),
    "epoch is a string": _set(("epoch",), "2"),
    "epoch negative": _set(("epoch",), -3),
    "world_size zero": _set(("world_size",), 0),
    "world_size is a list": _set(("world_size",), [4]),
    "run_id is a number": _set(("run_id",), 5),
    "run_id null": _set(("run_id",), None),
    "digest no prefix": _set(("digest",), "cd" * 32),
    "digest is a number": _set(("digest",), 7),
    "created_at is a string": _set(("created_at",), "1700000000"),
    "created_at is a bool": _set(("created_at",), False),
    "created_at null": _set(("created_at",), None),
    "metadata is a list": _set(("metadata",), [1]),
    "metadata is a string": _set(("metadata",), "x"),
    "format_version 3": _set(("format_version",), 3),
    "format 2 with sha256": _set(("checksum_algorithm",), "sha256"),
    "format_version 0": _set(("format_version",), 0),
    "format_version string": _set(("format_version",), "1"),
    "format_version float": _set(("format_version",), 1.5),
    "format_version bool": _set(("format_version",), True),
    "checksum algorithm md5": _set(("checksum_algorithm",), "md5"),
    "checksum algorithm number": _set(("checksum_algorithm",), 256),
    # missing keys
    **{f"missing {k}": _drop((k,)) for k in _doc() if k not in ("metadata", "checksum_algorithm")},
    "missing size": _drop(("files", "tensors.bin", "size")),
    "missing checksum": _drop(("files", "tensors.bin", "checksum")),
    # unsafe names
    **{
        f"unsafe name {n!r}": json.dumps(
            {**_doc(), "files": {n: {"size": 1, "checksum": SHA}}}
        ).encode()
        for n in ["../x", "a/b", "/etc/passwd", "..", ".", "", ".hidden", "a\\b", "a\x00b",
                  "manifest.json"]
    },
    # non-finite numbers (Python's json accepts these tokens by default)
    "created_at NaN": _manifest().to_json().replace(b"1700000000.25", b"NaN"),
    "created_at Infinity": _manifest().to_json().replace(b"1700000000.25", b"Infinity"),
    "created_at -Infinity": _manifest().to_json().replace(b"1700000000.25", b"-Infinity"),
    "created_at overflow": _manifest().to_json().replace(b"1700000000.25", b"1e400"),
    "size Infinity": _manifest().to_json().replace(b'"size": 1024', b'"size": Infinity'),
    "size NaN": _manifest().to_json().replace(b'"size": 1024', b'"size": NaN'),
    "step Infinity": _manifest().to_json().replace(b'"step": 25', b'"step": Infinity'),
    "epoch NaN": _manifest().to_json().replace(b'"epoch": 2', b'"epoch": NaN'),
    "metadata lr NaN": _manifest().to_json().replace(b'"lr": 0.1', b'"lr": NaN'),
    "metrics Infinity": _manifest().to_json().replace(b'"loss": 1.5', b'"loss": Infinity'),
    "huge integer": _manifest().to_json().replace(b'"step": 25', b'"step": ' + b"9" * 5000),
}


def test_malformed_cases_really_differ_from_a_valid_manifest() -> None:
    valid = _manifest().to_json()
    for name, data in MALFORMED.items():
        assert data != valid, name


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_manifest_is_corrupt(name: str) -> None:
    _corrupt(MALFORMED[name])


def test_every_truncation_is_corrupt() -> None:
    data = _manifest().to_json().rstrip()
    for n in range(len(data)):
        _corrupt(data[:n])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_junk_bytes_never_raise_anything_but_corrupt(data: bytes) -> None:
    with contextlib.suppress(CorruptSnapshot):
        Manifest.from_json(data)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.extend(_paths(v, (*prefix, i)))
    return out


junk_values = (
    json_values
    | st.sampled_from([float("nan"), float("inf"), float("-inf"), 2**70, -(2**70), "../x"])
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_manifest_is_corrupt_or_consistent(data: st.DataObject) -> None:
    """Any mutation either raises CorruptSnapshot or yields a manifest that round-trips."""
    doc = _doc()
    for _ in range(data.draw(st.integers(min_value=1, max_value=3), label="n_mutations")):
        paths = _paths(doc)
        path = data.draw(st.sampled_from(paths), label="path")
        op = data.draw(st.sampled_from(["set", "drop", "rename"]), label="op")
        if not path:  # the root
            doc = data.draw(junk_values, label="root")
            continue
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        key = path[-1]
        if op == "set":
            parent[key] = data.draw(junk_values, label="value")
        elif op == "drop":
            del parent[key]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8), label="new_key")] = parent.pop(key)
        if not isinstance(doc, (dict, list)):
            break
    raw = json.dumps(copy.deepcopy(doc), allow_nan=True).encode()
    try:
        m = Manifest.from_json(raw)
    except CorruptSnapshot:
        return
    # Accepted: it must be a manifest we can write back out and read again unchanged.
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert all(isinstance(e.size, int) and not isinstance(e.size, bool) for e in m.files.values())
    assert isinstance(m.step, int) and not isinstance(m.step, bool)
    assert isinstance(m.run_id, str)
