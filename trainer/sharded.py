"""Sharded snapshots of FSDP2 / DTensor training states: every rank writes its own shards.

When the registered model has DTensor parameters (``fully_shard``), :class:`Checkpointer`
hands its snapshots, resumes and live digests to :class:`ShardedSnapshots`. A snapshot takes the
model and optimizer state from ``torch.distributed.checkpoint.state_dict.get_state_dict``
(FQN-keyed, DTensors in the current sharding); every rank copies *its own* local shards into a
reused CPU staging buffer on the training thread (the only stall), and its background writer
thread writes them as ``shard-<rank>.bin`` into the snapshot's temporary directory, hashed while
written, and hashes them on the global block grid of :mod:`storage.sharded`. Global rank 0 also
writes the rest of the state with the codec (``tree.json`` + ``tensors.bin``: scheduler, scaler,
extras, progress, every rank's RNGs and loader position, and every non-tensor leaf of the model
and optimizer state) and the shard index. The writer threads report over a dedicated gloo group
(created once, as DCP's ``async_save`` does) in a fixed order (the writers' temporary directories,
the exchange between nodes, then every rank's report), and rank 0 commits the manifest only after every rank reported its
file, size, checksum and digest contributions (barrier-then-commit over shards).

On several nodes every node holds a complete copy, as DDP's node copies do (:mod:`trainer.placement`):
each node's local rank 0 commits the same manifest in its own checkpoint dir, its node's ranks
write their shard files there, and every shard file is also sent, in the background, to one
carrier rank on each other node, which writes it into its node's copy, hashed while received
(rank 0 checks each copy's checksums against the owners' before committing). A lost node then
loses no snapshot. ``--no-node-copies``: only rank 0's node holds a copy, other nodes' shards
are carried to it.

Resume reads the index as DCP ``Metadata`` (:class:`ShardReader`, a DCP ``StorageReader`` over
our files), loads into scratch tensors in the *current* sharding with ``dcp.load`` (DCP's planner
reshards), verifies every file before use and the sharding-independent digest of what was loaded
on all ranks, and only then applies it with ``set_state_dict``. Only tensors go through DCP:
non-tensor leaves come from our JSON tree, so nothing is ever unpickled from storage.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.state_dict import (
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.storage import StorageReader
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.futures import Future

from storage.blockhash import BlockHasher, checksum_of
from storage.content import BLOCK_ALIGN_MIN_BYTES, check_digest, content_plan
from storage.errors import CorruptSnapshot
from storage.hashfile import HashingFile
from storage.layout import TENSORS_FILE, TREE_FILE
from storage.manifest import CHECKSUM_ALGORITHM, FileEntry, Manifest
from storage.settings import StorageSettings
from storage.sharded import (
    BLOCK_BYTES,
    SHARD_INDEX_FILE,
    SHARDED_FORMAT,
    SHARDED_TAG,
    BlockReuse,
    Chunk,
    ChunkDigest,
    ChunkHasher,
    IndexEntry,
    arena_digest_expected,
    file_blocks_of,
    fill_from_file,
    hash_whole,
    index_bytes,
    is_sharded,
    parse_index,
    records,
    shard_file_name,
    shared_digests,
    shared_node,
    tensor_digest,
)
from trainer import codec
from trainer.distributed import is_initialized
from trainer.errors import CodecError, SnapshotError, StateMismatch, UsageError
from trainer.placement import CopyPlan
from trainer.resume import apply_state, parse_snapshot_tree

if TYPE_CHECKING:
    from trainer.checkpoint import Checkpointer
    from trainer.resume import Resumer

log = structlog.get_logger("trainer.sharded")

#: Where the model's and optimizer's state sit in a snapshot object: every tensor under these
#: goes through the shards (a plain tensor, e.g. Adam's ``step``, as one chunk written by rank 0).
_ROUTED = ("$[shared][model][", "$[shared][optimizer][", "$[shared][ema][")
_ALIGN = 64
#: Shard files travel to the other nodes' copies in pieces of this size (memory per incoming
#: file on a carrier; a multiple of the O_DIRECT alignment).
_EXCHANGE_PIECE = 32 << 20


def uses_dtensors(model: torch.nn.Module) -> bool:
    """True when the model has DTensor parameters (FSDP2 ``fully_shard``, tensor parallel)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


# -- encoding ---------------------------------------------------------------------------------


class _Encoder(codec._Encoder):
    """The codec's encoder, but DTensors (and plain tensors of the model/optimizer state) become
    ``sharded`` nodes keyed by their tree path, with no bytes in the arena."""

    def __init__(self) -> None:
        super().__init__()
        self.sharded: list[tuple[str, torch.Tensor]] = []

    def _tensor(self, t: torch.Tensor, path: str) -> Any:
        if isinstance(t, DTensor) or path.startswith(_ROUTED):
            self.sharded.append((path, t))
            return {
                "t": SHARDED_TAG,
                "key": path,
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
            }
        return super()._tensor(t, path)


@dataclass
class _LocalChunk:
    """One chunk this rank holds: where it goes in the tensor and in this rank's shard file."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    start: int
    nbytes: int
    total: int
    file_offset: int
    source: torch.Tensor  # the local data, contiguous rows of the full tensor

    def chunk(self, file: str) -> Chunk:
        return Chunk(file=file, file_offset=self.file_offset, start=self.start, nbytes=self.nbytes,
                     offsets=self.offsets, sizes=self.sizes)


@dataclass
class _Encoded:
    """A state encoded for a sharded snapshot or digest."""

    encoded: codec.EncodedState
    chunks: list[_LocalChunk]
    file_nbytes: int
    #: Every sharded node's key and tensor, in encoding order (the live ones: load targets).
    tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _local_part(key: str, t: torch.Tensor, *, rank: int, world_size: int) -> tuple[
    tuple[int, ...], tuple[int, ...], torch.Tensor] | None:
    """``(offsets, sizes, local data)`` of the part of ``t`` this rank writes, or None.

    A DTensor sharded on dim 0 over a 1-D mesh of every rank (FSDP2) is a run of whole rows, so
    its local shard is a contiguous byte range of the full tensor; a replicated one and a plain
    tensor are written whole by one rank. Other placements are refused for now.
    """
    shape = tuple(t.shape)
    if not isinstance(t, DTensor):
        if rank != 0:
            return None
        return (0,) * len(shape), shape, t.detach()
    mesh, placements = t.device_mesh, t.placements
    if mesh.ndim != 1 or mesh.size() != world_size:
        raise UsageError(
            f"{key}: sharded snapshots support DTensors on a 1-D mesh of all {world_size} ranks "
            f"(FSDP2 fully_shard); this one has a mesh of shape {tuple(mesh.shape)}"
        )
    placement = placements[0]
    local = t.to_local().detach()
    if isinstance(placement, Replicate):
        return None if mesh.get_local_rank() != 0 else ((0,) * len(shape), shape, local)
    if not (isinstance(placement, Shard) and placement.dim == 0):
        raise UsageError(
            f"{key}: sharded snapshots support Shard(0) and Replicate placements (FSDP2), "
            f"not {placement}"
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    local_shape, offset = tuple(local_shape), tuple(offset)
    if math.prod(local_shape) == 0:
        return None
    if tuple(local.shape) != local_shape:
        # FSDP2 may hold padded local storage; the DTensor's own shard is its first rows.
        local = local.narrow(0, 0, local_shape[0])
    return offset, local_shape, local


def encode(obj: Any, *, rank: int, world_size: int) -> _Encoded:
    """Encode a snapshot (or shared-only) object; lay out this rank's chunks in its shard file."""
    enc = _Encoder()
    root = enc.encode(obj, "$")
    encoded = codec.EncodedState(root=root, sources=enc.sources, slots=enc.slots, arena_nbytes=enc.pos)
    chunks: list[_LocalChunk] = []
    pos = 0
    for key, t in enc.sharded:
        part = _local_part(key, t, rank=rank, world_size=world_size)
        if part is None:
            continue
        offsets, sizes, local = part
        itemsize = _itemsize(t.dtype)
        shape = tuple(t.shape)
        row = math.prod(shape[1:]) * itemsize if shape else itemsize
        total = math.prod(shape) * itemsize
        nbytes = sizes[0] * row if shape else itemsize
        start = offsets[0] * row if shape else 0
        if nbytes >= BLOCK_ALIGN_MIN_BYTES:
            # At a file offset congruent to its tensor offset modulo the 64 KiB grid: its whole
            # grid blocks are then blocks of the file's checksum, hashed once for both.
            pos += (start - pos) % BLOCK_BYTES
        else:
            pos = (pos + _ALIGN - 1) // _ALIGN * _ALIGN
        chunks.append(_LocalChunk(
            key=key, dtype=str(t.dtype).removeprefix("torch."), shape=shape, offsets=offsets,
            sizes=sizes, start=start, nbytes=nbytes, total=total, file_offset=pos, source=local,
        ))
        pos += nbytes
    return _Encoded(encoded=encoded, chunks=chunks, file_nbytes=pos, tensors=enc.sharded)


# -- staging ----------------------------------------------------------------------------------


class ShardStaging:
    """A reused, page-aligned CPU buffer holding this rank's shard file image."""

    def __init__(self, *, pin_memory: bool = False) -> None:
        self.pin_memory = pin_memory
        self._buffer: torch.Tensor | None = None
        self._layout: tuple[tuple[int, int], ...] | None = None
        self.allocations = 0

    def stage(self, enc: _Encoded) -> torch.Tensor:
        size = enc.file_nbytes
        layout = tuple((c.file_offset, c.nbytes) for c in enc.chunks)
        if self._buffer is None or self._buffer.numel() != size:
            self._buffer = codec.page_aligned_empty(size, pin_memory=self.pin_memory)
            self.allocations += 1
            self._layout = None
        buf = self._buffer
        if layout != self._layout:
            buf.zero_()  # the padding between chunks: the file depends only on content and layout
            self._layout = layout
        needs_sync = False
        for c in enc.chunks:
            src = c.source
            dst = buf[c.file_offset : c.file_offset + c.nbytes].view(src.dtype).view(c.sizes)
            needs_sync |= src.device.type != "cpu"
            dst.copy_(src, non_blocking=self.pin_memory and src.device.type != "cpu")
        if needs_sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        for c in enc.chunks:
            c.source = torch.empty(0)  # drop references to live tensors
        return buf


def _chunk_digests(
    buf: torch.Tensor, chunks: list[_LocalChunk], file_blocks: list[bytes]
) -> list[tuple[str, ChunkDigest]]:
    """Each chunk's contribution to its tensor's digest: its whole grid blocks from the shard
    file's block hashes (``file_blocks``), the rest (edge pieces, short blocks) from the staged
    bytes."""
    view = buf.numpy().data if buf.numel() else memoryview(b"")
    out = []
    for c in chunks:
        reuse = (file_blocks_of(c.start, c.nbytes, c.total, c.file_offset) if file_blocks
                 else BlockReuse(range(0), 0))
        h = ChunkHasher(c.start, c.nbytes, c.total, skip=reuse.grid)
        h.update(view[c.file_offset : c.file_offset + c.nbytes])
        digest = h.finish()
        fill_from_file(digest, reuse, file_blocks)
        out.append((c.key, digest))
    return out


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data


def _live_chunk_digests(enc: _Encoded) -> list[tuple[str, ChunkDigest]]:
    """Chunk digests straight from the (live or scratch) local tensors, no staging."""
    out = []
    for c in enc.chunks:
        h = ChunkHasher(c.start, c.nbytes, c.total)
        h.update(_tensor_bytes(c.source))
        out.append((c.key, h.finish()))
    return out


def _assemble(
    root: Any, arena: memoryview, totals: dict[str, int], parts: dict[str, list[ChunkDigest]]
) -> tuple[str, dict[str, str]]:
    """The sharding-independent digest of ``root``'s shared part and its shared components."""

    def digest_of(record: dict[str, Any]) -> bytes:
        if record.get("t") == SHARDED_TAG:
            key = record["key"]
            return tensor_digest(totals[key], parts.get(key, []))
        offset, nbytes = int(record["offset"]), int(record["nbytes"])
        return hash_whole(arena[offset : offset + nbytes])

    return shared_digests(shared_node(root), digest_of)


def _hash_buffer(buf: torch.Tensor) -> tuple[FileEntry, list[bytes]]:
    """The entry a shard file of exactly ``buf`` would have (for a rank writing no copy)."""
    h = BlockHasher()
    view = buf.numpy().data if buf.numel() else memoryview(b"")
    h.update(view)
    return FileEntry(size=len(view), checksum=h.hexdigest(), algorithm=CHECKSUM_ALGORITHM), h.blocks()


def _check_copies(plan: CopyPlan, reports: list[Any]) -> None:
    """Every copy holds every rank's shard file, each equal to its owner's (size, checksum).

    A rank's own file sits in its home directory; a carried one was hashed by its carrier
    while received, so a file torn or altered on the way fails here, before any commit."""
    owners = {rep[1]: rep[2] for rep in reports if rep[1] is not None}
    for w in plan.writers:
        held: dict[str, FileEntry] = {}
        for r, rep in enumerate(reports):
            if plan.homes[r] != w:
                continue
            if rep[1] is not None:
                held[rep[1]] = rep[2]
            for fname, entry in rep[5]:
                held[fname] = entry
        missing = sorted(set(owners) - set(held))
        if missing:
            raise SnapshotError(f"the copy of writer {w} lacks {missing}")
        for fname, entry in held.items():
            want = owners.get(fname)
            if want is None or (entry.size, entry.checksum, entry.algorithm) != (
                want.size, want.checksum, want.algorithm
            ):
                raise SnapshotError(f"the copy of writer {w}: {fname} differs from its owner's file")


# -- the snapshot host --------------------------------------------------------------------------


class ShardedSnapshots:
    """Sharded snapshots, resumes and live digests for one :class:`Checkpointer`."""

    def __init__(self, ckpt: Checkpointer) -> None:
        self.ckpt = ckpt
        self.staging = ShardStaging(pin_memory=torch.cuda.is_available())
        self._group: Any = None
        self._plan: CopyPlan | None = None
        storage = StorageSettings.from_env()
        self._chunk_bytes, self._hash_threads = storage.write_chunk_bytes, storage.hash_threads

    def _placement(self) -> CopyPlan:
        """Where this group's copies go (collective the first time, on the training thread).

        One node: every rank writes into rank 0's directory. Several nodes: every writer
        (each node's local rank 0 with node copies, else global rank 0) commits a complete copy
        on its own node, its node's ranks writing their shard files there and carriers
        receiving the other nodes' files (:mod:`trainer.placement`).
        """
        ckpt = self.ckpt
        if self._plan is None:
            writers = ckpt._settle_writers()
            self._plan = CopyPlan.make(writers, ckpt.homes, ckpt.local_ranks)
            if ckpt.rank == 0 and self._plan.transfers:
                log.info("snapshot.sharded_copies", writers=list(writers),
                         transfers=len(self._plan.transfers))
        return self._plan

    # -- state dicts --

    def _shared(self) -> dict[str, Any]:
        state = self.ckpt.state
        msd, osd = get_state_dict(state.model, state.optimizer)
        shared = state.shared_state_dict()
        shared["model"], shared["optimizer"] = msd, osd
        return shared

    def _obj(self, shared: dict[str, Any], ranks: list[dict[str, Any]] | None) -> dict[str, Any]:
        if ranks is None:
            return {"shared": shared}
        return {"shared": shared, "ranks": dict(enumerate(ranks)), "world_size": len(ranks)}

    # -- snapshot --

    def _gloo(self) -> Any:
        if self._group is None and is_initialized():
            # Created once, on the training thread (new_group is a collective of every rank).
            self._group = dist.new_group(
                backend="gloo", timeout=timedelta(seconds=self.ckpt.settings.pg_timeout_s)
            )
        return self._group

    def snapshot(self) -> None:
        """Take a sharded snapshot of the current step (collective: every rank calls it)."""
        ckpt = self.ckpt
        step = ckpt.state.step
        started = time.perf_counter()
        ckpt._settle_staging()
        group = self._gloo()
        plan = self._placement()
        rank_states = ckpt._gather_rank_states()
        shared = self._shared()
        ckpt.last_snapshot_step = step
        if ckpt.rank == 0:
            if rank_states is None:
                raise SnapshotError("rank 0 received no per-rank states")
            steps = [int(g["step"]) for g in rank_states]
            if any(s != step for s in steps):
                raise SnapshotError(f"ranks reached different steps at snapshot time: {steps}")
        enc = encode(
            self._obj(shared, rank_states if ckpt.rank == 0 else None),
            rank=ckpt.rank, world_size=ckpt.world_size,
        )
        gathered_at = time.perf_counter()
        if ckpt._snapshot_job is not None:
            ckpt._snapshot_job.wait()  # both buffers are reused: the previous write must be done
        ckpt.writer.raise_if_failed()
        waited = time.perf_counter() - gathered_at
        buf = self.staging.stage(enc)
        arena: torch.Tensor | None = None
        if ckpt.rank == 0:
            arena = ckpt.arena.stage(enc.encoded)
        enc.encoded.sources, enc.tensors = [], []  # the writer needs only the staged bytes
        stall = time.perf_counter() - started
        ckpt.last_stall_s = stall
        log.info("snapshot.sharded_staged", step=step, stall_s=round(stall, 6),
                 wait_s=round(waited, 6), bytes=enc.file_nbytes)
        ckpt.faults.point("after_staging", step)
        metadata = ckpt.provenance.manifest_metadata(
            ckpt.state, ckpt._last_metrics, attempt=ckpt.settings.attempt
        ) if ckpt.rank == 0 else {}
        epoch = ckpt.state.epoch

        def job() -> None:
            self._write(step, epoch, enc, buf, arena, metadata, group, plan)

        ckpt._snapshot_job = ckpt.writer.submit(job, label=f"sharded-snapshot@{step}")

    def _write(
        self,
        step: int,
        epoch: int,
        enc: _Encoded,
        buf: torch.Tensor,
        arena: torch.Tensor | None,
        metadata: dict[str, Any],
        group: Any,
        plan: CopyPlan,
    ) -> None:
        """Writer thread of every rank: the same collectives in the same order on each.

        1. every writer opens its temporary directory; all ranks learn every directory and
           every rank's file size; 2. each rank writes its own shard file into its home
           directory; 3. shard files are exchanged with the carriers of the other copies;
        4. every rank's report reaches rank 0, which checks that each copy holds every file
           with the owner's checksum and commits its own copy; 5. the other writers commit the
           same manifest over their files; 6. every rank learns every copy's outcome.
        """
        ckpt = self.ckpt
        started = time.perf_counter()
        rank, world = ckpt.rank, ckpt.world_size
        distributed = is_initialized() and world > 1
        writer: Any = None
        error: BaseException | None = None
        # 1. Heads: every writer's temporary directory (or why it has none) and every file size.
        head: Any = None
        if rank in plan.writers:
            try:
                writer = ckpt.store.begin(step, on_phase=lambda phase: ckpt.faults.point(phase, step))
                head = ("ok", writer.tmp_path)
            except BaseException as exc:
                error = exc
                head = ("error", f"{type(exc).__name__}: {exc}")
        heads: list[Any] = [None] * world
        if distributed:
            dist.all_gather_object(heads, (head, enc.file_nbytes), group=group)
        else:
            heads = [(head, enc.file_nbytes)]
        home = plan.homes[rank]
        home_dir: str | None = None
        if home is not None and heads[home][0] is not None and heads[home][0][0] == "ok":
            home_dir = str(heads[home][0][1])
        name = shard_file_name(rank)
        entry: FileEntry | None = None
        file_blocks: list[bytes] = []
        carried: list[tuple[str, FileEntry]] = []
        report: Any = None
        # 2. This rank's own shard file, into its home directory.
        try:
            if home is not None and home_dir is None:
                raise SnapshotError(f"writer {home} could not start snapshot {step}: {heads[home][0]}")
            if enc.chunks:
                if home_dir is not None:
                    entry, file_blocks = self._write_file(writer if home == rank else None,
                                                          home_dir, name, buf)
                else:  # no copy on this node: only the checksum, for the manifest
                    entry, file_blocks = _hash_buffer(buf)
        except BaseException as exc:
            error = error or exc
            report = ("error", f"{type(exc).__name__}: {exc}")
        # 3. The exchange: every transfer of the plan, whatever happened above (the peers wait).
        try:
            carried = self._exchange(plan, buf, [int(h[1]) for h in heads], home_dir, group)
        except BaseException as exc:
            error = error or exc
            report = report or ("error", f"{type(exc).__name__}: {exc}")
        if report is None:
            try:
                # The digest contributions: whole grid blocks from the file checksum's blocks
                # (one hashing pass per byte), only edge pieces and short blocks hashed again.
                digests = _chunk_digests(buf, enc.chunks, file_blocks)
                report = ("ok", name if entry else None, entry, [
                    (c.key, c.chunk(name), d.to_wire()) for c, (_k, d) in
                    zip(enc.chunks, digests, strict=True)
                ], [(c.key, c.dtype, c.shape) for c in enc.chunks], carried)
            except BaseException as exc:
                error = error or exc
                report = ("error", f"{type(exc).__name__}: {exc}")
        # 4. Every rank's report reaches rank 0, which commits its copy.
        reports: list[Any] | None = [None] * world if rank == 0 else None
        if distributed:
            dist.gather_object(report, reports, dst=0, group=group)
        else:
            reports = [report]
        payload: list[Any] = [None]
        if rank == 0:
            try:
                if error is not None:
                    raise error
                if writer is None or reports is None:
                    raise SnapshotError("rank 0 has no snapshot writer")
                for r, rep in enumerate(reports):
                    if rep is None or rep[0] != "ok":
                        raise SnapshotError(f"rank {r} failed writing its shards of step {step}: "
                                            f"{'no report' if rep is None else rep[1]}")
                _check_copies(plan, reports)
                digest, manifest, small = self._commit(step, epoch, enc, arena, metadata, writer,
                                                       reports, plan)
                payload[0] = ("ok", digest, manifest.to_json(), small)
                seconds = time.perf_counter() - started
                ckpt.last_write_s = seconds
                log.info("snapshot.sharded_committed", step=step, bytes=manifest.total_bytes,
                         seconds=round(seconds, 4), digest=digest, files=len(manifest.files),
                         copies=len(plan.writers))
            except BaseException as exc:
                if writer is not None:
                    writer.abort()
                error = error or exc
                payload[0] = ("error", f"{type(exc).__name__}: {exc}")
        if distributed:
            dist.broadcast_object_list(payload, src=0, group=group)
        # 5. The other writers commit the same manifest over their copy's files.
        mine: Any = None
        if rank != 0 and writer is not None:
            if payload[0][0] == "ok":
                try:
                    self._commit_copy(writer, name if entry else None, payload[0][2], payload[0][3])
                    mine = ("ok", None)
                except BaseException as exc:
                    error = error or exc
                    mine = ("error", f"{type(exc).__name__}: {exc}")
            else:
                writer.abort()
        # 6. Every rank learns every copy's outcome before any returns (a preempted rank exits
        # only once each node's copy is committed or known lost).
        outcomes: list[Any] = [None] * world
        if distributed and len(plan.writers) > 1:
            dist.all_gather_object(outcomes, mine, group=group)
        if payload[0][0] == "ok":
            ckpt.last_digest = payload[0][1]
            failed = {r: o[1] for r, o in enumerate(outcomes) if o is not None and o[0] != "ok"}
            if failed and rank == 0:
                log.warning("snapshot.node_copy_failed", step=step, writers=failed)
        if error is not None:
            raise error
        if payload[0][0] != "ok" and rank != 0:
            log.warning("snapshot.sharded_failed_on_rank0", step=step, error=payload[0][1])
        if rank == 0:
            ckpt.faults.point("after_commit", step)

    def _write_file(
        self, writer: Any, directory: str, name: str, buf: torch.Tensor
    ) -> tuple[FileEntry, list[bytes]]:
        """Write this rank's staged shard file; a writer's through its writer, others beside it.

        Returns its entry and its checksum's 64 KiB block hashes."""
        view = buf.numpy().data
        if writer is not None:
            with writer.open(name, direct=True) as f:
                f.write(view)
            hf: HashingFile = f
        else:
            hf = HashingFile(os.path.join(directory, name), self._chunk_bytes, direct=True,
                             hash_threads=self._hash_threads)
            try:
                hf.write(view)
            except BaseException:
                hf.discard()
                raise
        entry: FileEntry = hf.close()
        hasher = hf.hasher
        return entry, hasher.blocks() if isinstance(hasher, BlockHasher) else []

    def _exchange(
        self, plan: CopyPlan, buf: torch.Tensor, sizes: list[int], home_dir: str | None, group: Any
    ) -> list[tuple[str, FileEntry]]:
        """Send this rank's shard file to its carriers and write the files it carries.

        Point-to-point over the writers' gloo group in pieces of ``_EXCHANGE_PIECE`` bytes: each
        round posts every send and receive of this rank for that piece and waits for them, so
        memory stays one piece per incoming file and no pair can deadlock. A file that cannot
        be written (disk full) is still received to the end, so that its sender is not left
        waiting, and the error is raised after the last piece."""
        rank = self.ckpt.rank
        sends = [c for s, c in plan.transfers if s == rank and sizes[s]]
        recvs = [s for s, c in plan.transfers if c == rank and sizes[s]]
        if not sends and not recvs:
            return []
        if recvs and home_dir is None:
            # The plan only makes ranks of a copy's node carriers; without its directory every
            # received byte is dropped and the copy fails at rank 0's check.
            log.warning("snapshot.carrier_without_directory", rank=rank)
        files: dict[int, HashingFile | None] = {}
        error: BaseException | None = None
        for s in recvs:
            if home_dir is None:
                files[s] = None
                continue
            try:
                files[s] = HashingFile(os.path.join(home_dir, shard_file_name(s)), self._chunk_bytes,
                                       direct=True, hash_threads=self._hash_threads)
            except BaseException as exc:
                error = error or exc
                files[s] = None
        pieces = {s: codec.page_aligned_empty(min(_EXCHANGE_PIECE, sizes[s])) for s in recvs}
        longest = max(sizes[s] for s in (*recvs, rank) if sizes[s])
        try:
            for lo in range(0, longest, _EXCHANGE_PIECE):
                ops = []
                if lo < sizes[rank]:
                    piece = buf[lo : min(lo + _EXCHANGE_PIECE, sizes[rank])]
                    ops += [dist.isend(piece, dst=c, group=group) for c in sends]
                incoming = [s for s in recvs if lo < sizes[s]]
                for s in incoming:
                    n = min(_EXCHANGE_PIECE, sizes[s] - lo)
                    ops.append(dist.irecv(pieces[s][:n], src=s, group=group))
                for op in ops:
                    if op is not None:  # None only for a rank outside the group
                        op.wait()
                for s in incoming:
                    f = files[s]
                    if f is None:
                        continue
                    n = min(_EXCHANGE_PIECE, sizes[s] - lo)
                    try:
                        f.write(pieces[s][:n].numpy().data)
                    except BaseException as exc:
                        error = error or exc
                        f.discard()
                        files[s] = None
            carried = []
            for s, f in files.items():
                if f is not None:
                    carried.append((shard_file_name(s), f.close()))
        except BaseException:
            for f in files.values():
                if f is not None:
                    f.discard()
            raise
        if error is not None:
            raise error
        return carried

    def _commit(
        self,
        step: int,
        epoch: int,
        enc: _Encoded,
        arena: torch.Tensor | None,
        metadata: dict[str, Any],
        writer: Any,
        reports: list[Any],
        plan: CopyPlan,
    ) -> tuple[str, Manifest, dict[str, bytes]]:
        """Rank 0: adopt the shard files of its copy, write the rest and the index, digest,
        commit. Returns the digest, the manifest and the small files every other copy needs."""
        ckpt = self.ckpt
        by_key: dict[str, list[Chunk]] = {}
        parts: dict[str, list[ChunkDigest]] = {}
        meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        for r, (_ok, name, entry, chunks, shapes, _carried) in enumerate(reports):
            if name is not None and entry is not None and r != 0:
                # Written into this temporary directory by rank r, or by the carrier of rank r's
                # file (checked equal by _check_copies): its size is checked here, its checksum
                # (computed while written) is taken from the report.
                writer.adopt(name, entry)
            for key, chunk, wire in chunks:
                by_key.setdefault(key, []).append(chunk)
                parts.setdefault(key, []).append(ChunkDigest.from_wire(wire))
            for key, dtype, shape in shapes:
                meta[key] = (dtype, tuple(shape))
        records_by_key = {r["key"]: r for r in records(enc.encoded.root) if r.get("t") == SHARDED_TAG}
        entries: list[IndexEntry] = []
        totals: dict[str, int] = {}
        for key, record in records_by_key.items():
            shape = tuple(int(d) for d in record["shape"])
            dtype = str(record["dtype"])
            saved = meta.get(key)
            if saved is not None and saved != (dtype, shape):
                raise SnapshotError(f"{key}: ranks disagree on dtype/shape {saved} vs {(dtype, shape)}")
            entry = IndexEntry(key=key, dtype=dtype, shape=shape, chunks=tuple(by_key.get(key, [])))
            entries.append(entry)
            totals[key] = entry.nbytes
        size = enc.encoded.arena_nbytes
        view = arena.numpy().data if arena is not None and size else memoryview(b"")
        tree = enc.encoded.canonical_tree_bytes()
        rest_digest, components = codec.arena_digests(
            tree, view, enc.encoded.slots, codec.component_plan(enc.encoded.root)
        )
        digest, shared_components = _assemble(enc.encoded.root, view, totals, parts)
        components.update(shared_components)
        small = {TREE_FILE: enc.encoded.tree_bytes(), SHARD_INDEX_FILE: index_bytes(entries)}
        with writer.open(TENSORS_FILE, direct=True) as f:
            f.write(view)
        for fname, data in small.items():
            writer.write_bytes(fname, data)
        metadata = dict(metadata)
        metadata["sharded"] = {
            "format": SHARDED_FORMAT, "block_bytes": BLOCK_BYTES, "rest_digest": rest_digest,
            "copies": len(plan.writers),
        }
        manifest = writer.commit(
            run_id=ckpt.run_id, epoch=epoch, world_size=ckpt.world_size, digest=digest,
            metadata=metadata, components=components,
        )
        ckpt.last_components = components
        ckpt.last_components_step = step
        if len(plan.writers) > 1:
            small[TENSORS_FILE] = bytes(view)
        return digest, manifest, small

    def _commit_copy(self, writer: Any, own: str | None, raw: bytes, small: dict[str, bytes]) -> None:
        """A writer other than rank 0: rank 0's manifest over this node's copy of every file.

        The shard files were written here by this node's ranks and carriers (their sizes are
        checked on adoption, their checksums were checked equal to their owners' by rank 0);
        the small files are written from rank 0's bytes and checked by the commit."""
        manifest = Manifest.from_json(raw)
        for fname, data in small.items():
            if fname == TENSORS_FILE:
                with writer.open(fname, direct=True) as f:
                    f.write(data)
            else:
                writer.write_bytes(fname, data)
        for fname, entry in sorted(manifest.files.items()):
            if fname not in small and fname != own:
                writer.adopt(fname, entry)
        writer.commit_manifest(manifest, raw=raw)

    # -- live digest --

    def live_digest(self) -> str | None:
        """The digest a sharded snapshot taken now would record (collective; rank 0's value,
        None elsewhere). Equal for the same state under any sharding or world size."""
        ckpt = self.ckpt
        enc = encode(self._obj(self._shared(), None), rank=ckpt.rank, world_size=ckpt.world_size)
        return self._collective_digest(enc, enc.encoded.root, None)

    def _collective_digest(
        self, enc: _Encoded, root: Any, arena: memoryview | None
    ) -> str | None:
        """Gather every rank's chunk digests (or its error) to rank 0 and assemble the digest
        of ``root`` (an encoded object whose sharded keys are ``enc``'s); arena records are
        hashed from ``arena`` or, when None, from ``enc``'s own sources on rank 0."""
        ckpt = self.ckpt
        mine: Any
        try:
            mine = ("ok", [(k, d.to_wire()) for k, d in _live_chunk_digests(enc)])
        except Exception as exc:  # every rank must still join the gather
            mine = ("error", f"{type(exc).__name__}: {exc}")
        if is_initialized() and ckpt.world_size > 1:
            got: list[Any] | None = [None] * ckpt.world_size if ckpt.rank == 0 else None
            dist.gather_object(mine, got, dst=0)
        else:
            got = [mine]
        if ckpt.rank != 0 or got is None:
            if mine[0] != "ok":
                raise SnapshotError(mine[1])
            return None
        parts: dict[str, list[ChunkDigest]] = {}
        for r, rep in enumerate(got):
            if rep is None or rep[0] != "ok":
                raise SnapshotError(f"rank {r} failed hashing its shards: {rep and rep[1]}")
            for key, wire in rep[1]:
                parts.setdefault(key, []).append(ChunkDigest.from_wire(wire))
        totals = {
            r["key"]: math.prod(r["shape"]) * _itemsize(codec._torch_dtype(r["dtype"]))
            for r in records(root) if r.get("t") == SHARDED_TAG
        }
        if arena is None:
            staged = codec.StagingArena().stage(enc.encoded) if enc.encoded.arena_nbytes else None
            arena = staged.numpy().data if staged is not None else memoryview(b"")
        digest, _components = _assemble(root, arena, totals, parts)
        return digest

    # -- resume --

    def load(self, resumer: Resumer, step: int, source: int | None) -> str:
        """Restore the sharded snapshot ``step`` (collective); return its manifest digest.

        ``source`` None: every rank reads the files it needs from its node's disk; else rank
        ``source`` reads every file and broadcasts it, and each rank checks the checksums. Every
        file a rank needs is read and verified *before* the DCP load, and all ranks agree on the
        outcome first (resumer._agree), so a damaged file is a ``CorruptSnapshot`` on the rank
        that found it (``PeerFailure`` elsewhere), which the supervisor answers with a fallback,
        never an error wrapped by DCP nor a rank left alone in a collective.
        """
        ckpt = self.ckpt
        started = time.perf_counter()
        error: Exception | None = None
        prepared: _Prepared | None = None
        try:
            prepared = self._prepare(resumer, step, source)
        except Exception as exc:  # every rank learns it before the DCP load's collectives
            error = exc
        resumer._agree(error, f"reading sharded snapshot step {step}")
        if prepared is None:
            raise SnapshotError(f"step {step}: nothing prepared")  # unreachable: _agree raised
        manifest, files, tree, obj, live, scratch, index, arena_np = prepared
        from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

        reader = ShardReader(index, files)
        dcp_load(scratch, storage_reader=reader, no_dist=not (is_initialized() and ckpt.world_size > 1))
        # The digest of what was loaded, over every rank's scratch shards, before applying.
        loaded = _swap_sources(live, scratch)
        verdict: list[Any] = [None]
        try:
            digest = self._collective_digest(loaded, tree["root"], memoryview(arena_np.data))
            verdict[0] = ("ok", digest)
        except Exception as exc:  # rank 0's assembly (a missing chunk): every rank must hear it
            verdict[0] = ("error", f"{type(exc).__name__}: {exc}")
        if is_initialized() and ckpt.world_size > 1:
            dist.broadcast_object_list(verdict, src=0)
        if verdict[0][0] != "ok":
            raise CorruptSnapshot(f"step {step}: digest of the loaded state: {verdict[0][1]}")
        check_digest(str(verdict[0][1]), manifest.digest, f"step {step}: loaded sharded state")
        self._apply(step, manifest, obj, scratch)
        log.info("resume.sharded_loaded", step=step, files_read=sorted(files.read),
                 seconds=round(time.perf_counter() - started, 4), saved_world_size=manifest.world_size)
        return manifest.digest

    def _prepare(self, resumer: Resumer, step: int, source: int | None) -> _Prepared:
        """Manifest, tree, index and every file this rank will read, verified; the targets."""
        ckpt = self.ckpt
        files: _Files
        if source is None:
            manifest = ckpt.store.read_manifest(step)
            resumer._check_manifest(step, manifest)
            if not is_sharded(manifest):
                raise StateMismatch(
                    f"step {step} is not a sharded snapshot but the model has DTensor parameters "
                    "(FSDP2): resume it with the model it was written with"
                )
            files = _LocalFiles(ckpt, step, manifest)
        else:
            manifest, files = _broadcast_files(ckpt, step, source)
            resumer._check_manifest(step, manifest)
            if not is_sharded(manifest):
                raise StateMismatch(f"step {step} is not a sharded snapshot")
        tree_bytes = files.get(TREE_FILE)
        index = parse_index(bytes(files.get(SHARD_INDEX_FILE)))
        arena_bytes = files.get(TENSORS_FILE)
        tree = parse_snapshot_tree(step, bytes(tree_bytes))
        plan = content_plan(tree, len(arena_bytes))
        check_digest(plan.digest_of(arena_bytes), arena_digest_expected(manifest), TENSORS_FILE)
        arena_np = np.frombuffer(arena_bytes, dtype=np.uint8) if len(arena_bytes) else np.zeros(0, np.uint8)
        try:
            obj = _Decoder(arena_np).decode(tree["root"])
        except CodecError as exc:
            raise CorruptSnapshot(f"step {step}: {exc}") from exc
        if not isinstance(obj, dict) or not {"shared", "ranks", "world_size"} <= obj.keys():
            raise CorruptSnapshot(f"step {step}: tree.json does not hold a training state")
        # Targets: the live state's tensors in the current sharding, as scratch copies.
        live = encode(self._obj(self._shared(), None), rank=ckpt.rank, world_size=ckpt.world_size)
        live_by_key = dict(live.tensors)
        saved_keys = {r["key"] for r in records(tree["root"]) if r.get("t") == SHARDED_TAG}
        if saved_keys != set(index):
            raise CorruptSnapshot(f"step {step}: {TREE_FILE} and {SHARD_INDEX_FILE} disagree")
        if saved_keys != set(live_by_key):
            raise StateMismatch(
                f"step {step}: the snapshot's sharded tensors differ from this model's and optimizer's: "
                f"missing {sorted(set(live_by_key) - saved_keys)[:5]}, "
                f"extra {sorted(saved_keys - set(live_by_key))[:5]}"
            )
        scratch: dict[str, torch.Tensor] = {}
        for key, entry in index.items():
            target = live_by_key[key]
            if tuple(target.shape) != entry.shape or str(target.dtype).removeprefix("torch.") != entry.dtype:
                raise StateMismatch(
                    f"{key}: snapshot holds {entry.dtype}{list(entry.shape)}, this state "
                    f"{target.dtype}{list(target.shape)}"
                )
            scratch[key] = torch.empty_like(target.detach())
            # Read (and sha256-verify) now every file holding rows this rank will load.
            lo, hi = _rows_needed(target)
            for chunk in entry.chunks:
                rows = (chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]) if entry.shape else (0, 1)
                if chunk.nbytes and rows[0] < hi and lo < rows[1]:
                    files.get(chunk.file)
        return manifest, files, tree, obj, live, scratch, index, arena_np

    def _apply(self, step: int, manifest: Manifest, obj: dict[str, Any], scratch: dict[str, torch.Tensor]) -> None:
        ckpt = self.ckpt
        state = ckpt.state
        shared = _fill(obj["shared"], scratch)

        def model_and_optimizer(model: Any, optimizer: Any) -> None:
            set_state_dict(state.model, state.optimizer, model_state_dict=model,
                           optim_state_dict=optimizer)

        apply_state(ckpt, step, manifest, {**obj, "shared": shared},
                    model_and_optimizer=model_and_optimizer)


def _swap_sources(live: _Encoded, scratch: dict[str, torch.Tensor]) -> _Encoded:
    """``live``'s chunks re-pointed at the scratch tensors' local data (same sharding)."""
    chunks = []
    for c in live.chunks:
        t = scratch[c.key]
        local = t.to_local().detach() if isinstance(t, DTensor) else t.detach()
        if math.prod(c.sizes) and tuple(local.shape) != c.sizes:
            local = local.narrow(0, 0, c.sizes[0])
        chunks.append(_LocalChunk(**{**c.__dict__, "source": local}))
    return _Encoded(encoded=live.encoded, chunks=chunks, file_nbytes=live.file_nbytes, tensors=live.tensors)


_Prepared = tuple[Manifest, "_Files", dict[str, Any], dict[str, Any], _Encoded, dict[str, torch.Tensor],
                  dict[str, IndexEntry], np.ndarray]


def _rows_needed(t: torch.Tensor) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of the full tensor a load target on this rank receives."""
    shape = tuple(t.shape)
    if not shape:
        return 0, 1
    if isinstance(t, DTensor) and isinstance(t.placements[0], Shard):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return int(offset[0]), int(offset[0]) + int(local_shape[0])
    return 0, shape[0]


class _Placeholder:
    def __init__(self, key: str) -> None:
        self.key = key


class _Decoder(codec._Decoder):
    """The codec's decoder; a ``sharded`` node becomes a placeholder filled after the DCP load."""

    def __init__(self, arena: np.ndarray) -> None:
        super().__init__(arena, copy=True)

    def decode(self, node: Any) -> Any:
        if isinstance(node, dict) and node.get("t") == SHARDED_TAG:
            return _Placeholder(str(node.get("key")))
        return super().decode(node)


def _fill(node: Any, scratch: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, _Placeholder):
        return scratch[node.key]
    if isinstance(node, dict):
        out = type(node)() if type(node) is not dict else {}
        for k, v in node.items():
            out[k] = _fill(v, scratch)
        return out
    if isinstance(node, list):
        return [_fill(v, scratch) for v in node]
    if isinstance(node, tuple):
        return tuple(_fill(v, scratch) for v in node)
    return node


# -- files and the DCP reader ---------------------------------------------------------------------


class _Files:
    """The snapshot's files as verified bytes, read on first use."""

    def __init__(self) -> None:
        self._cache: dict[str, memoryview] = {}
        self.read: set[str] = set()

    def get(self, name: str) -> memoryview:
        if name not in self._cache:
            self._cache[name] = self._load(name)
            self.read.add(name)
        return self._cache[name]

    def _load(self, name: str) -> memoryview:
        raise NotImplementedError


class _LocalFiles(_Files):
    def __init__(self, ckpt: Checkpointer, step: int, manifest: Manifest) -> None:
        super().__init__()
        self._ckpt, self._step, self._manifest = ckpt, step, manifest

    def _load(self, name: str) -> memoryview:
        entry = self._manifest.files.get(name)
        if entry is None:
            raise CorruptSnapshot(f"step {self._step}: manifest lists no {name}")
        buf = bytearray(entry.size)
        if entry.size:
            # read_into verifies the size and sha256 against the manifest before returning.
            self._ckpt.store.read_into(self._step, name, memoryview(buf))
        return memoryview(buf)


class _MemoryFiles(_Files):
    def __init__(self, data: dict[str, memoryview]) -> None:
        super().__init__()
        self._data = data

    def _load(self, name: str) -> memoryview:
        if name not in self._data:
            raise CorruptSnapshot(f"{name}: not received")
        return self._data[name]


def _broadcast_files(ckpt: Checkpointer, step: int, source: int) -> tuple[Manifest, _Files]:
    """Rank ``source`` reads every file verified and broadcasts them; receivers check sha256."""
    from trainer.resume import _broadcast_bytes

    header: list[Any] = [None]
    local: dict[str, memoryview] = {}
    if ckpt.rank == source:
        try:
            manifest = ckpt.store.read_manifest(step)
            files = _LocalFiles(ckpt, step, manifest)
            local = {name: files.get(name) for name in sorted(manifest.files)}
            header[0] = ("ok", manifest.to_json())
        except Exception as exc:
            header[0] = ("error", f"{type(exc).__name__}: {exc}")
            dist.broadcast_object_list(header, src=source)
            raise
    dist.broadcast_object_list(header, src=source)
    if header[0][0] != "ok":
        raise SnapshotError(f"rank {source} failed reading step {step}: {header[0][1]}")
    manifest = Manifest.from_json(header[0][1])
    received: dict[str, memoryview] = {}
    damaged: list[str] = []
    for name in sorted(manifest.files):
        entry = manifest.files[name]
        buf = np.empty(entry.size, dtype=np.uint8)
        if ckpt.rank == source:
            buf[:] = np.frombuffer(local[name], dtype=np.uint8)
        if entry.size:
            _broadcast_bytes(buf, source)
        # Checked after every broadcast of the loop: a receiver that stopped early would leave
        # the source alone in the next one.
        if ckpt.rank != source and checksum_of(buf.data, entry.algorithm) != entry.checksum:
            damaged.append(name)
        received[name] = memoryview(buf.data)
    if damaged:
        raise CorruptSnapshot(f"step {step}: checksum mismatch after the broadcast: {damaged}")
    return manifest, _MemoryFiles(received)


def _torch_dtype(name: str) -> torch.dtype:
    return codec._torch_dtype(name)


class ShardReader(StorageReader):
    """A DCP ``StorageReader`` over a sharded snapshot's verified files.

    ``read_metadata`` turns the shard index into DCP ``Metadata`` (one ``TensorStorageMetadata``
    per tensor, one ``ChunkStorageMetadata`` per chunk); ``read_data`` serves each read item
    from the chunk's bytes in its file, read and sha256-verified on first use.
    """

    def __init__(self, index: dict[str, IndexEntry], files: _Files) -> None:
        super().__init__()
        self.index = index
        self.files = files
        self._storage: dict[MetadataIndex, Chunk] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        state: dict[str, Any] = {}
        storage: dict[MetadataIndex, Chunk] = {}
        for key, entry in self.index.items():
            chunks = [
                ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes))
                for c in entry.chunks
            ]
            state[key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=_torch_dtype(entry.dtype)),
                size=torch.Size(entry.shape),
                chunks=chunks,
            )
            for c in entry.chunks:
                storage[MetadataIndex(key, torch.Size(c.offsets))] = c
        self._storage = storage
        return Metadata(state_dict_metadata=state, storage_data=storage)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._storage = dict(metadata.storage_data or {})

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for item in plan.items:
            self._read_item(item, planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_item(self, item: ReadItem, planner: LoadPlanner) -> None:
        chunk = self._storage.get(item.storage_index)
        if chunk is None:
            chunk = self._storage.get(MetadataIndex(item.storage_index.fqn, item.storage_index.offset))
        if chunk is None:
            raise CorruptSnapshot(f"{item.storage_index.fqn}: no stored chunk at {item.storage_index.offset}")
        entry = self.index[item.storage_index.fqn]
        data = self.files.get(chunk.file)
        if chunk.file_offset + chunk.nbytes > len(data):
            raise CorruptSnapshot(f"{chunk.file}: chunk of {entry.key} lies outside the file")
        raw = torch.frombuffer(data, dtype=torch.uint8, count=chunk.nbytes, offset=chunk.file_offset) \
            if chunk.nbytes else torch.empty(0, dtype=torch.uint8)
        src = raw.view(_torch_dtype(entry.dtype)).view(chunk.sizes)
        for dim, (offset, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
            src = src.narrow(dim, offset, length)
        target = planner.resolve_tensor(item).detach()
        if target.size() != src.size():
            raise CorruptSnapshot(f"{entry.key}: read of {list(src.size())} into {list(target.size())}")
        target.copy_(src)
        planner.commit_tensor(item, target)


__all__ = ["ShardReader", "ShardedSnapshots", "uses_dtensors"]
