"""The content digest of a snapshot, checked from its files without torch.

A snapshot's manifest carries the content ``digest`` of the training state it holds: ``"sha256:"``
of the *canonical tree* (``tree.json``'s ``root`` without arena offsets and dict insertion
orders, as compact sorted JSON) followed by every tensor's bytes from ``tensors.bin`` in tree
order, without the alignment padding (the encoder is :mod:`trainer.codec`, which takes the
canonical form and the tensor walk from here so the two can never drift apart).

File checksums only say that the files are the ones the writer wrote. A tree whose records were
changed together with the checksums (an encoder or decoder bug, a tampered file) still passes
them; only the content digest ties what is decoded to what was saved. :func:`content_plan`
reads a tree's tensor records once, checking each against the arena (in order, inside it, no
overlap, byte length equal to shape times item size where the dtype is known), and a
:class:`ContentHasher` fed the arena's bytes in order, in any chunks, yields the digest. The
verifying readers (:mod:`storage.reading`) feed it beside the file checksum, so checking content
costs one more sha256 over the tensor bytes and no second read.

A ``tree.json`` without a ``"format"`` key is not a trainer tree (other writers of this store
put what they like there): it has no content to check. One that names another format is
corrupt. Every malformation is :class:`CorruptSnapshot`, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from storage.errors import CorruptSnapshot

#: The trainer's tree format (``tree.json``'s ``"format"``).
FORMAT = "trainer-tree-v1"

JsonTree = Any

#: Item sizes of the torch dtypes the trainer writes, by the name it records
#: (``str(dtype)`` without ``torch.``). A name not listed here is still accepted: its byte
#: length is checked by the decoder, which has torch, and covered by the digest either way.
TORCH_ITEMSIZE: Mapping[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "uint16": 2,
    "int16": 2,
    "float16": 2,
    "bfloat16": 2,
    "uint32": 4,
    "int32": 4,
    "float32": 4,
    "complex32": 4,
    "uint64": 8,
    "int64": 8,
    "float64": 8,
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
}
# numpy's dtype.str for the kinds the encoder accepts (bool, ints, floats, complex).
_NUMPY_DTYPE = re.compile(r"[<>|=][biufc]([0-9]{1,2})")


def canonical_json(obj: JsonTree) -> bytes:
    """The one JSON spelling of the digest: compact, sorted keys, ASCII, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _canonical(node: JsonTree) -> JsonTree:
    if isinstance(node, list):
        return [_canonical(x) for x in node]
    if isinstance(node, dict):
        return {k: _canonical(v) for k, v in node.items() if k not in ("offset", "order")}
    return node


def canonical_tree_bytes(root: JsonTree) -> bytes:
    """Serialise ``root`` without offsets and insertion orders: the tree part of the digest."""
    return canonical_json({"format": FORMAT, "root": _canonical(root)})


def tensor_records(node: JsonTree) -> Iterator[dict[str, Any]]:
    """The tensor and ndarray records under ``node``, in arena (encoding and decoding) order."""
    if isinstance(node, list):
        for item in node:
            yield from tensor_records(item)
    elif isinstance(node, dict):
        tag = node.get("t")
        if tag in ("tensor", "ndarray"):
            yield node
        elif tag == "dict":
            # Keys are plain values (never tensors); the values, then an OrderedDict's _metadata.
            yield from tensor_records(node.get("v", []))
            if "meta" in node:
                yield from tensor_records(node["meta"])
        elif tag == "tuple":
            yield from tensor_records(node.get("v", []))


def _nonneg_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def itemsize(tag: object, dtype: object) -> int | None:
    """Bytes per element of a tensor (``tag`` ``"tensor"``) or ndarray record; None if unknown."""
    if not isinstance(dtype, str):
        return None
    if tag == "ndarray":
        m = _NUMPY_DTYPE.fullmatch(dtype)
        return int(m.group(1)) if m else None
    return TORCH_ITEMSIZE.get(dtype)


def check_record(record: Mapping[str, Any], arena_nbytes: int, floor: int) -> tuple[int, int]:
    """``(offset, nbytes)`` of one tensor record after checking it against the arena.

    The region must start at or after ``floor`` (the previous region's end: the encoder lays
    tensors out in order and never overlaps them) and end inside the arena; the shape must be a
    list of non-negative integers whose product times the item size is ``nbytes``.
    """
    offset, nbytes, shape = record.get("offset"), record.get("nbytes"), record.get("shape")
    where = f"tensor record {_brief(record)}"
    if not (
        isinstance(offset, int) and isinstance(nbytes, int)
        and _nonneg_int(offset) and _nonneg_int(nbytes)
    ):
        raise CorruptSnapshot(f"{where}: offset and nbytes must be non-negative integers")
    if not (isinstance(shape, list) and all(_nonneg_int(d) for d in shape)):
        raise CorruptSnapshot(f"{where}: shape must be a list of non-negative integers")
    if not isinstance(record.get("dtype"), str):
        raise CorruptSnapshot(f"{where}: dtype must be a name")
    if offset < floor:
        raise CorruptSnapshot(f"{where}: overlaps or precedes the previous tensor (ends at {floor})")
    if offset + nbytes > arena_nbytes:
        raise CorruptSnapshot(f"{where}: lies outside the arena ({arena_nbytes} bytes)")
    size = itemsize(record.get("t"), record.get("dtype"))
    if size is not None and math.prod(shape) * size != nbytes:
        raise CorruptSnapshot(
            f"{where}: {nbytes} bytes, but shape {shape} of {record.get('dtype')} needs "
            f"{math.prod(shape) * size}"
        )
    return offset, nbytes


def _brief(record: Mapping[str, Any]) -> str:
    return repr({k: record.get(k) for k in ("t", "dtype", "shape", "offset", "nbytes")})[:200]


@dataclass(frozen=True)
class ContentPlan:
    """What a tree says about its arena: the digest's tree part and the tensor regions."""

    canonical: bytes
    #: ``(offset, nbytes)`` per tensor, in arena order, non-overlapping.
    regions: tuple[tuple[int, int], ...]
    arena_nbytes: int

    def hasher(self) -> ContentHasher:
        return ContentHasher(self)

    def digest_of(self, arena: bytes | bytearray | memoryview) -> str:
        """The content digest over a whole arena held in memory."""
        h = self.hasher()
        h.update(memoryview(arena).cast("B"))
        return h.hexdigest()


def content_plan(tree: Mapping[str, Any], arena_nbytes: int) -> ContentPlan:
    """Check a parsed trainer tree against an arena of ``arena_nbytes``; its plan."""
    if tree.get("format") != FORMAT:
        raise CorruptSnapshot(f"tree.json: unknown format {tree.get('format')!r}"[:200])
    if tree.get("arena_nbytes") != arena_nbytes:
        raise CorruptSnapshot(
            f"tree.json declares an arena of {tree.get('arena_nbytes')!r} bytes, "
            f"tensors.bin has {arena_nbytes}"[:200]
        )
    if "root" not in tree:
        raise CorruptSnapshot("tree.json has no root")
    root = tree["root"]
    regions: list[tuple[int, int]] = []
    floor = 0
    try:
        for record in tensor_records(root):
            offset, nbytes = check_record(record, arena_nbytes, floor)
            regions.append((offset, nbytes))
            floor = offset + nbytes
        canonical = canonical_tree_bytes(root)
    except (ValueError, TypeError, RecursionError) as exc:
        # ValueError: a NaN the canonical JSON refuses; TypeError: a "v" that is not a list;
        # RecursionError: absurd nesting. None of it was written by the encoder.
        raise CorruptSnapshot(f"tree.json: malformed tree: {exc!r}"[:300]) from exc
    return ContentPlan(canonical=canonical, regions=tuple(regions), arena_nbytes=arena_nbytes)


def parse_tree_json(tree_json: bytes) -> dict[str, Any] | None:
    """``tree.json`` parsed; None when it is not a trainer tree (no ``"format"``)."""
    try:
        tree = json.loads(tree_json)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CorruptSnapshot(f"tree.json: not valid JSON: {exc!r}"[:300]) from exc
    if not isinstance(tree, dict):
        raise CorruptSnapshot("tree.json: not a JSON object")
    return tree if "format" in tree else None


def plan_from_json(tree_json: bytes, arena_nbytes: int) -> ContentPlan | None:
    """The plan of a ``tree.json``'s bytes; None when it is not a trainer tree."""
    tree = parse_tree_json(tree_json)
    return None if tree is None else content_plan(tree, arena_nbytes)


class ContentHasher:
    """The content digest, fed the arena's bytes in order in chunks of any size."""

    def __init__(self, plan: ContentPlan) -> None:
        self._regions = plan.regions
        self._next = 0  # index of the first region not yet complete
        self._pos = 0  # arena offset of the next byte fed
        self._hash = hashlib.sha256(plan.canonical)

    def update(self, chunk: memoryview) -> None:
        """Feed the next ``len(chunk)`` bytes of the arena (bytes of padding are skipped)."""
        start, end = self._pos, self._pos + len(chunk)
        regions = self._regions
        i = self._next
        while i < len(regions):
            offset, nbytes = regions[i]
            if offset >= end:
                break
            lo, hi = max(offset, start), min(offset + nbytes, end)
            if hi > lo:
                self._hash.update(chunk[lo - start : hi - start])
            if offset + nbytes > end:
                break  # continues in the next chunk
            i += 1
        self._next = i
        self._pos = end

    def hexdigest(self) -> str:
        """``"sha256:<hex>"``; only meaningful once the whole arena was fed."""
        return "sha256:" + self._hash.hexdigest()

    @property
    def fed(self) -> int:
        return self._pos


def check_digest(computed: str, expected: str, what: str) -> None:
    """CorruptSnapshot unless the recomputed content digest is the manifest's."""
    if computed != expected:
        raise CorruptSnapshot(
            f"{what}: content digest {computed} differs from the manifest's {expected}"
        )
