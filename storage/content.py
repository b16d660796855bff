"""The content digest of a snapshot, checked from its files without torch.

A snapshot's manifest carries the content ``digest`` of the training state it holds: ``"sha256:"``
of the *canonical tree* (``tree.json``'s ``root`` without arena offsets and dict insertion
orders, as compact sorted JSON, tagged with the tree's format) followed by the tensors in tree
order (the encoder is :mod:`trainer.codec`, which takes the canonical form, the layout rule and
the tensor walk from here so the two can never drift apart). Two tree formats exist:

* ``trainer-tree-v1``: each tensor's raw bytes follow the tree. Checking it costs a second
  sha256 over every tensor byte beside the file checksum.
* ``trainer-tree-v2`` (written now): each tensor's 32-byte *tensor digest* follows the tree:
  the sha256 of the sha256 of each 64 KiB block of its bytes (:func:`storage.blockhash
  .tensor_digest`). A tensor of at least :data:`BLOCK_ALIGN_MIN_BYTES` starts on a block
  boundary of ``tensors.bin``, so its whole blocks *are* blocks of the file, whose
  ``sha256-b64k`` checksum (format-2 manifests) hashes them anyway: only its last partial block
  and the small tensors are hashed a second time (:class:`RegionSplit`). Writer and verifiers
  therefore hash every tensor byte about once, and the digest still depends on content only
  (not on offsets or padding: a tensor placed elsewhere is simply hashed as an extra).

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from storage.blockhash import BLOCK_BYTES, BlockHasher, FileHasher, tensor_digest
from storage.errors import CorruptSnapshot

FORMAT_V1 = "trainer-tree-v1"
FORMAT_V2 = "trainer-tree-v2"
#: The trainer's tree format (``tree.json``'s ``"format"``) written now; both are read.
FORMAT = FORMAT_V2
FORMATS = frozenset({FORMAT_V1, FORMAT_V2})
#: In a v2 arena, tensors of at least this many bytes start on a 64 KiB block boundary (at most
#: 64 KiB of padding each, under 6%, for not hashing them twice); smaller ones are 64-byte
#: aligned and hashed twice (they are few bytes in any real state).
BLOCK_ALIGN_MIN_BYTES = 1 << 20

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


def canonical_tree_bytes(root: JsonTree, fmt: str = FORMAT) -> bytes:
    """Serialise ``root`` without offsets and insertion orders: the tree part of the digest."""
    return canonical_json({"format": fmt, "root": _canonical(root)})


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
class RegionSplit:
    """How a v2 verifier gets one tensor's block hashes.

    ``nfull`` whole blocks come from the file's block hashes from block ``first_block`` on
    (the tensor starts on a block boundary); the rest, ``[extra_start, extra_start +
    extra_len)`` of the arena, is hashed on its own (a last partial block, or a whole tensor
    that is small or not block-aligned).
    """

    first_block: int
    nfull: int
    extra_start: int
    extra_len: int


def split_region(offset: int, nbytes: int) -> RegionSplit:
    """The :class:`RegionSplit` of the tensor at ``[offset, offset + nbytes)``."""
    if offset % BLOCK_BYTES == 0 and nbytes >= BLOCK_BYTES:
        nfull = nbytes // BLOCK_BYTES
        return RegionSplit(offset // BLOCK_BYTES, nfull, offset + nfull * BLOCK_BYTES,
                           nbytes - nfull * BLOCK_BYTES)
    return RegionSplit(0, 0, offset, nbytes)


def combine(canonical: bytes, tensor_digests: Sequence[bytes]) -> str:
    """A v2 digest: ``"sha256:"`` of the canonical tree followed by each tensor digest."""
    h = hashlib.sha256(canonical)
    for d in tensor_digests:
        h.update(d)
    return "sha256:" + h.hexdigest()


def extra_blocks(
    arena: memoryview, splits: Sequence[RegionSplit]
) -> list[list[bytes]]:
    """The block hashes of every split's extra bytes, from an arena held in memory."""
    out: list[list[bytes]] = []
    for sp in splits:
        h = BlockHasher()
        h.update(arena[sp.extra_start : sp.extra_start + sp.extra_len])
        out.append(h.blocks())
    return out


def tensor_digests(
    splits: Sequence[RegionSplit], file_blocks: Sequence[bytes], extras: Sequence[list[bytes]]
) -> list[bytes]:
    """Each tensor's digest from the file's block hashes and its extra bytes' block hashes."""
    out: list[bytes] = []
    for sp, extra in zip(splits, extras, strict=True):
        h = hashlib.sha256()
        if sp.nfull:
            if sp.first_block + sp.nfull > len(file_blocks):
                raise CorruptSnapshot("a tensor lies past the file's blocks")
            for block in file_blocks[sp.first_block : sp.first_block + sp.nfull]:
                h.update(block)
        for block in extra:
            h.update(block)
        out.append(h.digest())
    return out


@dataclass(frozen=True)
class ContentPlan:
    """What a tree says about its arena: the digest's tree part and the tensor regions."""

    canonical: bytes
    #: ``(offset, nbytes)`` per tensor, in arena order, non-overlapping.
    regions: tuple[tuple[int, int], ...]
    arena_nbytes: int
    #: The tree's format (:data:`FORMAT_V1` or :data:`FORMAT_V2`): how the digest is defined.
    fmt: str = FORMAT

    def hasher(self) -> ContentHasher:
        """A streaming hasher of this plan's digest (fed the arena in order)."""
        return ContentHasher(self)

    def digest_of(self, arena: bytes | bytearray | memoryview) -> str:
        """The content digest over a whole arena held in memory."""
        view = memoryview(arena).cast("B")
        if self.fmt == FORMAT_V1:
            h = hashlib.sha256(self.canonical)
            for offset, nbytes in self.regions:
                h.update(view[offset : offset + nbytes])
            return "sha256:" + h.hexdigest()
        return combine(
            self.canonical, [tensor_digest(view[offset : offset + n]) for offset, n in self.regions]
        )


def content_plan(tree: Mapping[str, Any], arena_nbytes: int) -> ContentPlan:
    """Check a parsed trainer tree against an arena of ``arena_nbytes``; its plan."""
    fmt = tree.get("format")
    if fmt not in FORMATS:
        raise CorruptSnapshot(f"tree.json: unknown format {fmt!r}"[:200])
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
        canonical = canonical_tree_bytes(root, str(fmt))
    except (ValueError, TypeError, RecursionError) as exc:
        # ValueError: a NaN the canonical JSON refuses; TypeError: a "v" that is not a list;
        # RecursionError: absurd nesting. None of it was written by the encoder.
        raise CorruptSnapshot(f"tree.json: malformed tree: {exc!r}"[:300]) from exc
    return ContentPlan(
        canonical=canonical, regions=tuple(regions), arena_nbytes=arena_nbytes, fmt=str(fmt)
    )


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
    """The content digest, fed the arena's bytes in order in chunks of any size.

    v1: every tensor byte goes into one sha256 after the canonical tree. v2: only each
    tensor's extra bytes (:class:`RegionSplit`) are hashed here; :meth:`finish` takes the rest
    from the block hashes of the file checksum that was fed the same bytes.
    """

    def __init__(self, plan: ContentPlan) -> None:
        self._plan = plan
        self._v1 = plan.fmt == FORMAT_V1
        if self._v1:
            self._ranges = list(plan.regions)
            self._splits: list[RegionSplit] = []
        else:
            self._splits = [split_region(o, n) for o, n in plan.regions]
            self._ranges = [(sp.extra_start, sp.extra_len) for sp in self._splits]
        self._extra = [BlockHasher() for _ in self._ranges] if not self._v1 else []
        self._next = 0  # index of the first range not yet complete
        self._pos = 0  # arena offset of the next byte fed
        self._hash = hashlib.sha256(plan.canonical)

    def update(self, chunk: memoryview) -> None:
        """Feed the next ``len(chunk)`` bytes of the arena (bytes outside the ranges skipped)."""
        start, end = self._pos, self._pos + len(chunk)
        ranges = self._ranges
        i = self._next
        while i < len(ranges):
            offset, nbytes = ranges[i]
            if offset >= end:
                break
            lo, hi = max(offset, start), min(offset + nbytes, end)
            if hi > lo:
                (self._hash if self._v1 else self._extra[i]).update(chunk[lo - start : hi - start])
            if offset + nbytes > end:
                break  # continues in the next chunk
            i += 1
        self._next = i
        self._pos = end

    def finish(self, file_hasher: FileHasher) -> str:
        """``"sha256:<hex>"`` once the whole arena was fed, here and to ``file_hasher``."""
        if self._v1:
            return "sha256:" + self._hash.hexdigest()
        if not isinstance(file_hasher, BlockHasher):
            raise CorruptSnapshot(
                "tree.json is of format 2 but tensors.bin's checksum is not by blocks"
            )
        blocks = file_hasher.blocks()
        return combine(
            self._plan.canonical,
            tensor_digests(self._splits, blocks, [h.blocks() for h in self._extra]),
        )

    @property
    def fed(self) -> int:
        return self._pos


def check_digest(computed: str, expected: str, what: str) -> None:
    """CorruptSnapshot unless the recomputed content digest is the manifest's."""
    if computed != expected:
        raise CorruptSnapshot(
            f"{what}: content digest {computed} differs from the manifest's {expected}"
        )
