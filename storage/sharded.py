"""Sharded snapshots (FSDP2 / DTensor) without torch: the shard index, the digest, validation.

A *sharded* snapshot is written by every rank: each rank's local shards of the model and
optimizer tensors go into its own file (``shard-<rank>.bin``), while global rank 0 writes the
rest of the state with the ordinary codec (``tree.json`` + ``tensors.bin``, in which every
sharded tensor is a ``{"t": "sharded", "key", "dtype", "shape"}`` node holding no bytes) and the
shard index (``shards.json``): for each sharded tensor its global shape, dtype and chunks (the
file, the byte offset there, the chunk's global offsets and sizes, and the byte range it covers
in the tensor's flattened full bytes). A snapshot is sharded when its manifest lists
``shards.json`` and carries ``metadata["sharded"]`` (format, block size, and the codec digest of
``tree.json`` + ``tensors.bin``, called ``rest_digest``).

**The digest does not depend on the sharding.** Each tensor's full bytes (row-major, flattened)
are cut into a fixed global grid of :data:`BLOCK_BYTES` blocks; the tensor digest is the sha256
of the concatenated sha256 of every block. A rank whose shard is a contiguous byte range of the
full tensor (``Shard(0)`` on a 1-D mesh, or a whole tensor) hashes the blocks that lie fully in
its range and sends the bytes of the at most two partial edge blocks; the blocks are reassembled
without ever gathering the tensors. The state digest is the sha256 of the canonical JSON of the
*sharding-independent* state (the ``shared`` part: model and optimizer state as
``get_state_dict`` gives them, FQN-keyed, scheduler, scaler, EMA, extras, progress; every tensor
reduced to dtype and global shape, without offsets, insertion orders and dict classes) followed
by each tensor digest in tree order. Per-rank state (RNGs, loader positions) depends on the world
size by nature: it is excluded from that digest but covered by the checksums of ``tree.json``
and ``tensors.bin``, by ``rest_digest`` and by per-rank component digests. The same function on
the gathered (full) state of one rank gives the same value (:class:`ChunkHasher` over each whole
tensor).

:class:`ShardedValidator` recomputes all of it from the files, fed in any order and any chunk
size (push based, so the local tier streams files and the remote tier streams objects into it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from storage.blockhash import BLOCK_BYTES as FILE_BLOCK_BYTES
from storage.blockhash import BlockHasher, FileHasher
from storage.content import (
    TORCH_ITEMSIZE,
    ContentPlan,
    canonical_json,
    check_digest,
    content_plan,
    parse_tree_json,
)
from storage.errors import CorruptSnapshot, file_errors
from storage.layout import TENSORS_FILE, TREE_FILE, is_safe_filename
from storage.manifest import FileEntry, Manifest
from storage.reading import open_snapshot_file, read_verified

#: The shard index file of a sharded snapshot; its presence in the manifest marks one.
SHARD_INDEX_FILE = "shards.json"
#: ``metadata["sharded"]["format"]`` and ``shards.json``'s ``"format"``.
SHARDED_FORMAT = "trainer-sharded-v1"
#: The format tag hashed into the canonical tree of the sharding-independent digest.
DIGEST_FORMAT = "trainer-sharded-digest-v1"
#: The global block grid of the tensor digests (64 KiB): small enough that the edge pieces a
#: rank sends with its report (at most two partial blocks per chunk) stay far below its shard,
#: large enough that the block hashes (32 bytes each, 0.05%) cost nothing. The same size as the
#: file checksums' blocks (``storage.blockhash``), so a chunk placed at a file offset congruent
#: to its tensor offset gets its whole grid blocks' hashes from its file's checksum.
BLOCK_BYTES = FILE_BLOCK_BYTES
#: Tag of a sharded tensor node in ``tree.json`` (no bytes in ``tensors.bin``).
SHARDED_TAG = "sharded"
#: Keys that never enter the canonical form: layout (offsets, sizes in the arena, index keys),
#: insertion orders and representation (dict classes, OrderedDict metadata).
_LAYOUT_KEYS = frozenset({"offset", "order", "nbytes", "key", "cls", "meta"})


def shard_file_name(rank: int) -> str:
    """The file rank ``rank`` writes its shards to."""
    return f"shard-{rank:05d}.bin"


def is_sharded(manifest: Manifest) -> bool:
    """True for a manifest of a sharded snapshot (it lists the shard index)."""
    return SHARD_INDEX_FILE in manifest.files


def arena_digest_expected(manifest: Manifest) -> str:
    """The codec digest ``tree.json`` + ``tensors.bin`` must have: ``rest_digest`` for a sharded
    snapshot (its manifest ``digest`` is the sharding-independent one), else the manifest's."""
    if not is_sharded(manifest):
        return manifest.digest
    return str(_sharded_meta(manifest)["rest_digest"])


def _sharded_meta(manifest: Manifest) -> dict[str, Any]:
    meta = manifest.metadata.get("sharded")
    if (
        not isinstance(meta, dict)
        or meta.get("format") != SHARDED_FORMAT
        or meta.get("block_bytes") != BLOCK_BYTES
        or not isinstance(meta.get("rest_digest"), str)
    ):
        raise CorruptSnapshot(f"manifest lists {SHARD_INDEX_FILE} but no valid metadata.sharded")
    return meta


# -- the canonical tree ---------------------------------------------------------------------


def _is_record(node: Any) -> bool:
    return isinstance(node, dict) and node.get("t") in ("tensor", "ndarray", SHARDED_TAG)


def _canonical(node: Any) -> Any:
    if isinstance(node, list):
        return [_canonical(x) for x in node]
    if isinstance(node, dict):
        if _is_record(node):
            # A tensor is its dtype and global shape, wherever its bytes are.
            tag = "ndarray" if node.get("t") == "ndarray" else "tensor"
            return {"t": tag, "dtype": node.get("dtype"), "shape": node.get("shape")}
        return {k: _canonical(v) for k, v in node.items() if k not in _LAYOUT_KEYS}
    return node


def canonical_bytes(root: Any) -> bytes:
    """The tree part of the sharding-independent digest of ``root`` (an encoded tree)."""
    return canonical_json({"format": DIGEST_FORMAT, "root": _canonical(root)})


def records(node: Any) -> Iterator[dict[str, Any]]:
    """Tensor, ndarray and sharded records under ``node`` in digest order (dict values in the
    encoder's sorted key order; an OrderedDict's metadata is not content and is skipped)."""
    if isinstance(node, list):
        for item in node:
            yield from records(item)
    elif isinstance(node, dict):
        if _is_record(node):
            yield node
        elif node.get("t") in ("dict", "tuple"):
            yield from records(node.get("v", []))


def state_digest(canonical: bytes, tensor_digests: list[bytes]) -> str:
    """``"sha256:"`` of the canonical tree followed by each tensor digest (32 bytes each)."""
    h = hashlib.sha256(canonical)
    for d in tensor_digests:
        h.update(d)
    return "sha256:" + h.hexdigest()


# -- block hashing --------------------------------------------------------------------------


@dataclass
class ChunkDigest:
    """What one contiguous byte range of a tensor contributes to its digest.

    ``blocks``: sha256 of every grid block lying fully inside the range; ``pieces``: the bytes
    of the (at most two) blocks it covers only partly, by their global byte offset.
    """

    start: int
    nbytes: int
    blocks: dict[int, bytes] = field(default_factory=dict)
    pieces: dict[int, bytes] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"start": self.start, "nbytes": self.nbytes, "blocks": self.blocks, "pieces": self.pieces}

    @classmethod
    def from_wire(cls, doc: Mapping[str, Any]) -> ChunkDigest:
        return cls(int(doc["start"]), int(doc["nbytes"]), dict(doc["blocks"]), dict(doc["pieces"]))


class ChunkHasher:
    """Hashes the bytes ``[start, start + nbytes)`` of a tensor of ``total`` bytes on the grid.

    Fed in order, in chunks of any size (:meth:`update`); :meth:`finish` returns its
    :class:`ChunkDigest`. A whole tensor is the chunk ``(0, total)``.
    """

    def __init__(
        self,
        start: int,
        nbytes: int,
        total: int,
        *,
        block: int = BLOCK_BYTES,
        skip: Container[int] = frozenset(),
    ) -> None:
        if start < 0 or nbytes < 0 or start + nbytes > total:
            raise ValueError(f"chunk [{start}, {start + nbytes}) outside a tensor of {total} bytes")
        self._start, self._end, self._total, self._block = start, start + nbytes, total, block
        #: Whole blocks not hashed here: their hashes come from the file's checksum
        #: (:func:`file_block_of`, :meth:`ChunkDigest.fill_from_file`).
        self._skip = skip
        self._pos = start
        self._digest = ChunkDigest(start, nbytes)
        self._open_block: int | None = None
        self._hash: Any = None
        self._skipping = False
        self._piece = bytearray()

    def _block_span(self, index: int) -> tuple[int, int]:
        lo = index * self._block
        return lo, min(lo + self._block, self._total)

    def update(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        if self._pos + len(view) > self._end:
            raise ValueError("fed past the end of the chunk")
        at = 0
        while at < len(view):
            index = self._pos // self._block
            lo, hi = self._block_span(index)
            take = min(len(view) - at, hi - self._pos)
            part = view[at : at + take]
            if self._open_block != index:
                self._close_block()
                self._open_block = index
                whole = lo >= self._start and hi <= self._end
                self._skipping = whole and index in self._skip
                self._hash = hashlib.sha256() if whole and not self._skipping else None
                self._piece = bytearray()
            if self._hash is not None:
                self._hash.update(part)
            elif not self._skipping:
                self._piece += part
            self._pos += take
            at += take
            if self._pos == hi:
                self._close_block()

    def _close_block(self) -> None:
        index = self._open_block
        if index is None:
            return
        if self._skipping:
            pass  # filled from the file's block hashes
        elif self._hash is not None:
            self._digest.blocks[index] = self._hash.digest()
        else:
            lo, _hi = self._block_span(index)
            self._digest.pieces[max(lo, self._start)] = bytes(self._piece)
        self._open_block, self._hash, self._piece = None, None, bytearray()
        self._skipping = False

    def finish(self) -> ChunkDigest:
        if self._pos != self._end:
            raise ValueError(f"chunk fed {self._pos - self._start} of {self._end - self._start} bytes")
        self._close_block()
        return self._digest


@dataclass(frozen=True)
class BlockReuse:
    """The chunk's whole grid blocks that *are* blocks of its file: grid block ``k`` in
    :attr:`grid` is file block ``k + shift``."""

    grid: range
    shift: int


def file_blocks_of(start: int, nbytes: int, total: int, file_offset: int) -> BlockReuse:
    """Which of a chunk's grid blocks come from its file's checksum blocks.

    Grid block ``k`` (of full length, inside the chunk) lies at file position ``file_offset +
    k * BLOCK_BYTES - start``, which is block-aligned for every ``k`` or for none: when the
    chunk's file offset is congruent to its tensor offset modulo the block (the writer's layout
    for large chunks). Otherwise nothing is reused and every block is hashed on its own. O(1):
    a forged index claiming a huge chunk costs nothing here.
    """
    if (file_offset - start) % BLOCK_BYTES:
        return BlockReuse(range(0), 0)
    first = -(-start // BLOCK_BYTES)
    stop = min((start + nbytes) // BLOCK_BYTES, total // BLOCK_BYTES)
    return BlockReuse(range(first, max(first, stop)), (file_offset - start) // BLOCK_BYTES)


def fill_from_file(digest: ChunkDigest, reuse: BlockReuse, file_blocks: list[bytes]) -> None:
    """Put the file's block hashes into ``digest`` for the grid blocks ``reuse`` names."""
    if reuse.grid and reuse.grid[-1] + reuse.shift >= len(file_blocks):
        raise CorruptSnapshot("a chunk lies past its file's blocks")
    for index in reuse.grid:
        digest.blocks[index] = file_blocks[index + reuse.shift]


def hash_whole(data: memoryview | bytes, *, block: int = BLOCK_BYTES) -> bytes:
    """The tensor digest of a whole tensor's bytes held in memory."""
    view = memoryview(data).cast("B")
    h = ChunkHasher(0, len(view), len(view), block=block)
    h.update(view)
    return tensor_digest(len(view), [h.finish()], block=block)


def tensor_digest(total: int, parts: list[ChunkDigest], *, block: int = BLOCK_BYTES) -> bytes:
    """The digest of a tensor of ``total`` bytes from the contributions of its chunks.

    The chunks must tile ``[0, total)`` exactly (no gap, no overlap); anything else is
    :class:`CorruptSnapshot` (a missing or duplicated shard).
    """
    spans = sorted((p.start, p.start + p.nbytes) for p in parts if p.nbytes)
    pos = 0
    for lo, hi in spans:
        if lo != pos:
            raise CorruptSnapshot(f"tensor chunks leave a gap or overlap at byte {min(lo, pos)}")
        pos = hi
    if pos != total:
        raise CorruptSnapshot(f"tensor chunks cover {pos} of {total} bytes")
    blocks: dict[int, bytes] = {}
    pieces: dict[int, list[tuple[int, bytes]]] = {}
    for part in parts:
        for index, digest in part.blocks.items():
            if index in blocks:
                raise CorruptSnapshot(f"block {index} reported twice")
            blocks[index] = digest
        for offset, data in part.pieces.items():
            pieces.setdefault(offset // block, []).append((offset, data))
    for index, found in pieces.items():
        if index in blocks:
            raise CorruptSnapshot(f"block {index} reported whole and in pieces")
        lo, hi = index * block, min((index + 1) * block, total)
        found.sort()
        joined = bytearray()
        for offset, data in found:
            if offset != lo + len(joined):
                raise CorruptSnapshot(f"pieces of block {index} do not join")
            joined += data
        if len(joined) != hi - lo:
            raise CorruptSnapshot(f"pieces of block {index} hold {len(joined)} of {hi - lo} bytes")
        blocks[index] = hashlib.sha256(joined).digest()
    count = -(-total // block)
    if sorted(blocks) != list(range(count)):
        raise CorruptSnapshot(f"tensor digest: {len(blocks)} blocks of {count}")
    h = hashlib.sha256()
    for index in range(count):
        h.update(blocks[index])
    return h.digest()


# -- the shard index ------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One chunk of a sharded tensor in a shard file."""

    file: str
    file_offset: int
    #: Byte range in the tensor's flattened full bytes.
    start: int
    nbytes: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file, "file_offset": self.file_offset, "start": self.start,
            "nbytes": self.nbytes, "offsets": list(self.offsets), "sizes": list(self.sizes),
        }


@dataclass(frozen=True)
class IndexEntry:
    """A sharded tensor: its key (``tree.json``'s node), dtype name, global shape and chunks."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * TORCH_ITEMSIZE.get(self.dtype, 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key, "dtype": self.dtype, "shape": list(self.shape),
            "chunks": [c.to_json() for c in self.chunks],
        }


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CorruptSnapshot(f"{SHARD_INDEX_FILE}: {what} is not a non-negative integer")
    return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise CorruptSnapshot(f"{SHARD_INDEX_FILE}: {what} is not a list")
    return tuple(_int(v, what) for v in value)


def index_bytes(entries: list[IndexEntry]) -> bytes:
    """``shards.json``'s content."""
    return canonical_json({
        "format": SHARDED_FORMAT,
        "block_bytes": BLOCK_BYTES,
        "tensors": [e.to_json() for e in entries],
    })


def parse_index(data: bytes) -> dict[str, IndexEntry]:
    """Parse and check ``shards.json`` (CorruptSnapshot when malformed): entries by key.

    Each tensor's chunks must tile its bytes exactly and agree with their offsets and sizes
    (a chunk is a run of whole rows: dim-0 sharding, or the whole tensor).
    """
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CorruptSnapshot(f"{SHARD_INDEX_FILE}: not valid JSON: {exc!r}"[:300]) from exc
    if not isinstance(doc, dict) or doc.get("format") != SHARDED_FORMAT:
        raise CorruptSnapshot(f"{SHARD_INDEX_FILE}: not a shard index of {SHARDED_FORMAT}")
    if doc.get("block_bytes") != BLOCK_BYTES:
        raise CorruptSnapshot(f"{SHARD_INDEX_FILE}: block size {doc.get('block_bytes')!r}")
    tensors = doc.get("tensors")
    if not isinstance(tensors, list):
        raise CorruptSnapshot(f"{SHARD_INDEX_FILE}: no tensor list")
    out: dict[str, IndexEntry] = {}
    for t in tensors:
        if not isinstance(t, dict) or not isinstance(t.get("key"), str) or not isinstance(t.get("dtype"), str):
            raise CorruptSnapshot(f"{SHARD_INDEX_FILE}: malformed tensor entry")
        key, dtype = t["key"], t["dtype"]
        if key in out:
            raise CorruptSnapshot(f"{SHARD_INDEX_FILE}: tensor {key!r} listed twice")
        itemsize = TORCH_ITEMSIZE.get(dtype)
        if itemsize is None:
            raise CorruptSnapshot(f"{SHARD_INDEX_FILE}: {key}: unsupported dtype {dtype!r}")
        shape = _ints(t.get("shape"), "shape")
        chunks_doc = t.get("chunks")
        if not isinstance(chunks_doc, list):
            raise CorruptSnapshot(f"{SHARD_INDEX_FILE}: {key}: no chunk list")
        chunks: list[Chunk] = []
        row = math.prod(shape[1:]) * itemsize if shape else itemsize
        for c in chunks_doc:
            if not isinstance(c, dict) or not isinstance(c.get("file"), str) or not is_safe_filename(c["file"]):
                raise CorruptSnapshot(f"{SHARD_INDEX_FILE}: {key}: malformed chunk")
            chunk = Chunk(
                file=c["file"], file_offset=_int(c.get("file_offset"), "file_offset"),
                start=_int(c.get("start"), "start"), nbytes=_int(c.get("nbytes"), "nbytes"),
                offsets=_ints(c.get("offsets"), "offsets"), sizes=_ints(c.get("sizes"), "sizes"),
            )
            if len(chunk.offsets) != len(shape) or len(chunk.sizes) != len(shape):
                raise CorruptSnapshot(f"{SHARD_INDEX_FILE}: {key}: chunk rank differs from shape")
            if shape and (
                any(o != 0 for o in chunk.offsets[1:]) or chunk.sizes[1:] != shape[1:]
                or chunk.offsets[0] + chunk.sizes[0] > shape[0]
                or chunk.start != chunk.offsets[0] * row or chunk.nbytes != chunk.sizes[0] * row
            ):
                raise CorruptSnapshot(f"{SHARD_INDEX_FILE}: {key}: chunk is not a run of rows")
            if not shape and (chunk.start, chunk.nbytes) != (0, itemsize):
                raise CorruptSnapshot(f"{SHARD_INDEX_FILE}: {key}: bad chunk of a scalar")
            chunks.append(chunk)
        entry = IndexEntry(key=key, dtype=dtype, shape=shape, chunks=tuple(chunks))
        _check_tiling(entry)
        out[key] = entry
    return out


def _check_tiling(entry: IndexEntry) -> None:
    pos = 0
    for lo, hi in sorted((c.start, c.start + c.nbytes) for c in entry.chunks if c.nbytes):
        if lo != pos:
            raise CorruptSnapshot(f"{SHARD_INDEX_FILE}: {entry.key}: chunks leave a gap or overlap")
        pos = hi
    if pos != entry.nbytes:
        raise CorruptSnapshot(f"{SHARD_INDEX_FILE}: {entry.key}: chunks cover {pos} of {entry.nbytes} bytes")


# -- validation -----------------------------------------------------------------------------


class _FileSink:
    """Receives one shard file's bytes in order: its sha256 and its chunks' block hashes."""

    def __init__(self, name: str, entry: FileEntry, chunks: list[tuple[Chunk, IndexEntry]]) -> None:
        self.name, self.entry = name, entry
        self.hash = entry.hasher()
        self.pos = 0
        self._chunks = sorted(chunks, key=lambda ce: ce[0].file_offset)
        floor = 0
        for chunk, _e in self._chunks:
            if chunk.file_offset < floor or chunk.file_offset + chunk.nbytes > entry.size:
                raise CorruptSnapshot(f"{name}: chunks overlap or lie outside the file")
            floor = chunk.file_offset + chunk.nbytes
        # With block checksums (format 2) a chunk's aligned whole blocks are the file's.
        by_blocks = isinstance(self.hash, BlockHasher)
        self._reuse = [
            file_blocks_of(c.start, c.nbytes, e.nbytes, c.file_offset)
            if by_blocks else BlockReuse(range(0), 0)
            for c, e in self._chunks
        ]
        self._hashers = [
            ChunkHasher(c.start, c.nbytes, e.nbytes, skip=reuse.grid)
            for (c, e), reuse in zip(self._chunks, self._reuse, strict=True)
        ]
        self.digests: list[tuple[str, ChunkDigest]] = []

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        lo, hi = self.pos, self.pos + len(view)
        for (chunk, _e), hasher in zip(self._chunks, self._hashers, strict=True):
            a, b = max(lo, chunk.file_offset), min(hi, chunk.file_offset + chunk.nbytes)
            if b > a:
                hasher.update(view[a - lo : b - lo])
        self.pos = hi
        return len(view)

    def finish(self) -> None:
        if self.pos != self.entry.size:
            raise CorruptSnapshot(f"{self.name}: read {self.pos} bytes, manifest says {self.entry.size}")
        if self.hash.hexdigest() != self.entry.checksum:
            raise CorruptSnapshot(f"{self.name}: checksum mismatch")
        blocks = self.hash.blocks() if isinstance(self.hash, BlockHasher) else []
        self.digests = []
        for (_c, e), h, reuse in zip(self._chunks, self._hashers, self._reuse, strict=True):
            digest = h.finish()
            fill_from_file(digest, reuse, blocks)
            self.digests.append((e.key, digest))


class ShardedValidator:
    """Recomputes a sharded snapshot's digests from its files, torch-free (push based).

    Made from the manifest, the verified ``tree.json`` and ``shards.json`` bytes; then every
    other file's bytes are pushed through :meth:`sink` (``write`` in order, then the caller
    calls :meth:`finish_file`), in any file order. :meth:`finish` checks every listed file was
    fed, the codec digest of ``tree.json`` + ``tensors.bin`` (``rest_digest``), the
    sharding-independent ``digest`` and the shared parts' component digests.
    """

    def __init__(self, manifest: Manifest, tree_json: bytes, index_json: bytes) -> None:
        self.manifest = manifest
        self._meta = _sharded_meta(manifest)
        tree = parse_tree_json(tree_json)
        if tree is None:
            raise CorruptSnapshot(f"{TREE_FILE}: not a trainer tree")
        tensors = manifest.files.get(TENSORS_FILE)
        self._plan: ContentPlan = content_plan(tree, tensors.size if tensors is not None else 0)
        if tensors is None:
            raise CorruptSnapshot(f"manifest lists no {TENSORS_FILE}")
        self._root = tree["root"]
        self.index = parse_index(index_json)
        self._arena = bytearray()
        self._arena_hash = self._plan.hasher()
        self._arena_file_hash: FileHasher | None = None
        self._files_fed: set[str] = {TREE_FILE, SHARD_INDEX_FILE}
        self._chunk_digests: dict[str, list[ChunkDigest]] = {k: [] for k in self.index}
        by_file: dict[str, list[tuple[Chunk, IndexEntry]]] = {}
        for entry in self.index.values():
            for chunk in entry.chunks:
                if chunk.file not in manifest.files:
                    raise CorruptSnapshot(f"{SHARD_INDEX_FILE}: {entry.key}: file {chunk.file} not in the manifest")
                by_file.setdefault(chunk.file, []).append((chunk, entry))
        self._by_file = by_file
        self._shared = shared_node(self._root)
        self._check_tree_against_index()

    def _check_tree_against_index(self) -> None:
        seen: set[str] = set()
        for record in records(self._root):
            if record.get("t") != SHARDED_TAG:
                continue
            key = record.get("key")
            entry = self.index.get(key) if isinstance(key, str) else None
            if entry is None or key in seen:
                raise CorruptSnapshot(f"{TREE_FILE}: sharded tensor {key!r} not (once) in {SHARD_INDEX_FILE}")
            seen.add(str(key))
            if record.get("dtype") != entry.dtype or record.get("shape") != list(entry.shape):
                raise CorruptSnapshot(f"{TREE_FILE}: sharded tensor {key!r} differs from its index entry")
        if seen != set(self.index):
            raise CorruptSnapshot(f"{SHARD_INDEX_FILE} lists tensors the tree does not hold")

    def sink(self, name: str) -> Any:
        """A writable for file ``name``'s bytes (``write(data)``); pass it to :meth:`finish_file`."""
        entry = self.manifest.files[name]
        if name == TENSORS_FILE:
            return _ArenaSink(self, entry)
        return _FileSink(name, entry, self._by_file.get(name, []))

    def finish_file(self, sink: Any) -> None:
        sink.finish()
        self._files_fed.add(sink.name)
        if isinstance(sink, _FileSink):
            for key, digest in sink.digests:
                self._chunk_digests[key].append(digest)

    def finish(self) -> None:
        missing = sorted(set(self.manifest.files) - self._files_fed)
        if missing:
            raise CorruptSnapshot(f"files not checked: {missing}")
        if self._arena_file_hash is None:
            raise CorruptSnapshot(f"{TENSORS_FILE} was not checked")
        rest = self._arena_hash.finish(self._arena_file_hash)
        check_digest(rest, self._meta["rest_digest"], TENSORS_FILE)
        regions = self._plan.regions
        region_of = {id(r): i for i, r in enumerate(r for r in records(self._root) if r.get("t") != SHARDED_TAG)}

        def digest_of(record: dict[str, Any]) -> bytes:
            if record.get("t") == SHARDED_TAG:
                entry = self.index[record["key"]]
                return tensor_digest(entry.nbytes, self._chunk_digests[entry.key])
            offset, nbytes = regions[region_of[id(record)]]
            return hash_whole(memoryview(self._arena)[offset : offset + nbytes])

        digest, components = shared_digests(self._shared, digest_of)
        check_digest(digest, self.manifest.digest, "sharded state")
        for name, value in components.items():
            recorded = self.manifest.components.get(name)
            if recorded is not None and recorded != value:
                raise CorruptSnapshot(f"component {name}: digest {value} differs from the manifest's")


class _ArenaSink:
    """``tensors.bin``: its checksum, the codec digest, and its bytes kept (the non-sharded part
    of the state is small: RNGs, loader positions, scheduler) for the plain tensors' digests."""

    def __init__(self, validator: ShardedValidator, entry: FileEntry) -> None:
        self.name, self.entry, self._v = TENSORS_FILE, entry, validator
        self.hash = entry.hasher()
        validator._arena_file_hash = self.hash

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        self._v._arena_hash.update(view)
        self._v._arena += view
        return len(view)

    def finish(self) -> None:
        if len(self._v._arena) != self.entry.size:
            raise CorruptSnapshot(f"{self.name}: read {len(self._v._arena)} bytes, manifest says {self.entry.size}")
        if self.hash.hexdigest() != self.entry.checksum:
            raise CorruptSnapshot(f"{self.name}: checksum mismatch")


def shared_node(root: Any) -> Any:
    """The ``shared`` part of an encoded snapshot object (CorruptSnapshot when absent)."""
    if isinstance(root, dict) and root.get("t") == "dict":
        for key, value in zip(root.get("k", []), root.get("v", []), strict=False):
            if key == "shared":
                return value
    raise CorruptSnapshot(f"{TREE_FILE}: no shared state")


def shared_digests(shared: Any, digest_of: Any) -> tuple[str, dict[str, str]]:
    """The sharding-independent digest of an encoded ``shared`` node and its parts' digests.

    ``digest_of(record)`` gives each record's tensor digest. Component names follow
    ``trainer.codec.component_plan``: ``model``, ``optimizer``, ..., ``extras/<name>``.
    """
    if not (isinstance(shared, dict) and shared.get("t") == "dict"):
        raise CorruptSnapshot(f"{TREE_FILE}: shared state is not a dict")
    memo: dict[int, bytes] = {}

    def digest(record: dict[str, Any]) -> bytes:
        if id(record) not in memo:
            memo[id(record)] = digest_of(record)
        return memo[id(record)]

    components: dict[str, str] = {}
    for key, value in zip(shared.get("k", []), shared.get("v", []), strict=True):
        if value is None or not isinstance(key, str):
            continue
        parts = [(key, value)]
        if key == "extras" and isinstance(value, dict) and value.get("t") == "dict":
            parts = [(f"extras/{k}", v) for k, v in zip(value.get("k", []), value.get("v", []), strict=True)
                     if v is not None]
        for name, node in parts:
            components[name] = state_digest(canonical_bytes(node), [digest(r) for r in records(node)])
    whole = state_digest(canonical_bytes(shared), [digest(r) for r in records(shared)])
    return whole, components


def validate_files(
    manifest: Manifest,
    read_small: Callable[[str], bytes],
    stream: Callable[[str, Any], None],
) -> None:
    """Check every file of a sharded snapshot and recompute its digests (CorruptSnapshot).

    ``read_small(name)`` returns a small file's bytes *verified* against the manifest (the tree
    and the index); ``stream(name, sink)`` writes a file's bytes into ``sink`` in order (the
    sink checks size and checksum). Used by the local and the remote tier alike.
    """
    validator = ShardedValidator(manifest, read_small(TREE_FILE), read_small(SHARD_INDEX_FILE))
    for name in sorted(manifest.files):
        if name in (TREE_FILE, SHARD_INDEX_FILE):
            continue
        sink = validator.sink(name)
        stream(name, sink)
        validator.finish_file(sink)
    validator.finish()


def validate_local(path: str, manifest: Manifest, chunk: int) -> None:
    """:func:`validate_files` over a committed local snapshot directory ``path``."""

    def read_small(name: str) -> bytes:
        entry = manifest.files[name]
        buf = bytearray(entry.size)
        read_verified(os.path.join(path, name), name, entry, memoryview(buf), chunk)
        return bytes(buf)

    def stream(name: str, sink: Any) -> None:
        fpath = os.path.join(path, name)
        buf = memoryview(bytearray(chunk))
        with file_errors(name, "reading", fpath), open_snapshot_file(fpath, name) as f:
            while n := f.readinto(buf):
                sink.write(buf[:n])

    validate_files(manifest, read_small, stream)
