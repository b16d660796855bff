"""Safe tensor format of a training state: a JSON tree plus one aligned byte arena.

A nested state (dicts, lists, tuples, scalars, strings, bytes, ``torch.Tensor``, numpy arrays,
``torch.dtype``/``torch.device``) is flattened into a JSON-able *tree* where every tensor is a
``{"t": "tensor", "dtype", "shape", "offset", "nbytes"}`` record, and into an *arena*: one
contiguous ``uint8`` buffer that holds every tensor's raw bytes, each at a 64-byte aligned
offset. Nothing is ever pickled, so loading a snapshot cannot execute code.

Dict items are laid out in sorted key order (``int`` keys before ``str`` keys) so that the
layout and the digest depend only on content; the original insertion order is kept in the tree
(``"order"``) so that the decoded object has the same structure. Floats round-trip exactly
(JSON ``repr`` floats; NaN/inf are tagged), and tensors of any dtype are copied as raw bytes.

The content **digest** is ``"sha256:" + hex`` of the *canonical tree* (the tree without
arena offsets and without insertion orders, serialised as compact JSON with sorted keys)
followed by every tensor's 32-byte digest (the sha256 of its 64 KiB block hashes) in canonical
order (format ``trainer-tree-v2``; :mod:`storage.content` defines it and still reads v1, whose
digest hashed the raw tensor bytes). It therefore depends only on the state's content, never on
file layout, paths, time or attempt; :func:`state_digest` computes it from a live state object.
Tensors of at least a MiB start on a 64 KiB boundary of the arena, so that the snapshot writer
takes their block hashes from the file checksum it computes anyway (every byte hashed once).

**Component digests** name the parts of a snapshot object (``TrainingState.snapshot_object``)
and give each the digest it would have as a state of its own: ``components["model"] ==
state_digest(shared["model"])``. :func:`component_plan` names them (see there); since a digest
is made of tensor digests, every component's costs only a hash of its canonical tree and of its
tensors' 32-byte digests (:func:`digests_of`); :func:`component_digests` computes the same map
from a live state, :func:`snapshot_digests` from a snapshot's files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# The canonical form and the tensor walk are storage's, so that validating a snapshot without
# torch (storage.content) computes exactly the digest written here.
from storage.blockhash import BLOCK_BYTES, tensor_digest
from storage.content import BLOCK_ALIGN_MIN_BYTES, FORMAT_V1, FORMATS, combine
from storage.content import FORMAT as FORMAT
from storage.content import canonical_json as _dumps
from storage.content import canonical_tree_bytes as canonical_tree_bytes
from storage.content import tensor_records as _tensor_records
from storage.layout import TENSORS_FILE as TENSORS_FILE
from storage.layout import TREE_FILE as TREE_FILE
from trainer.errors import CodecError

ALIGN = 64

JsonTree = Any


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in the arena."""

    offset: int
    nbytes: int


@dataclass
class EncodedState:
    """A flattened state: the JSON tree, the source tensors in arena order and their slots.

    The sources are references to the live tensors (no copy); :class:`StagingArena` copies them.
    """

    root: JsonTree
    sources: list[torch.Tensor | np.ndarray[Any, Any]]
    slots: list[TensorSlot]
    arena_nbytes: int

    def layout_key(self) -> tuple[tuple[int, int], ...]:
        """A value equal for two states whose arenas have the same layout."""
        return tuple((s.offset, s.nbytes) for s in self.slots)

    def tree_bytes(self) -> bytes:
        """The ``tree.json`` content: the full tree with offsets and insertion orders."""
        return _dumps({"format": FORMAT, "arena_nbytes": self.arena_nbytes, "root": self.root})

    def canonical_tree_bytes(self) -> bytes:
        """The tree part of the digest input (no offsets, no insertion orders)."""
        return canonical_tree_bytes(self.root)


def _align(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def _key_sort(encoded_key: JsonTree) -> tuple[int, Any]:
    if isinstance(encoded_key, bool):
        return (0, int(encoded_key))
    if isinstance(encoded_key, int):
        return (1, encoded_key)
    if isinstance(encoded_key, str):
        return (3, encoded_key)
    return (4, _dumps(encoded_key).decode())


class _Encoder:
    def __init__(self) -> None:
        self.sources: list[torch.Tensor | np.ndarray[Any, Any]] = []
        self.slots: list[TensorSlot] = []
        self.pos = 0

    def _slot(self, nbytes: int) -> TensorSlot:
        # Large tensors on a block boundary: their block hashes are the file checksum's.
        offset = _align(self.pos, BLOCK_BYTES if nbytes >= BLOCK_ALIGN_MIN_BYTES else ALIGN)
        self.pos = offset + nbytes
        slot = TensorSlot(offset=offset, nbytes=nbytes)
        self.slots.append(slot)
        return slot

    def encode(self, obj: Any, path: str) -> JsonTree:
        # Order matters: bool is an int, and torch/numpy types are checked before containers.
        if obj is None or isinstance(obj, bool | str):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            value = float(obj)
            if math.isfinite(value):
                return value
            return {"t": "float", "v": repr(value)}
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path)
        if isinstance(obj, np.ndarray):
            return self._ndarray(obj, path)
        if isinstance(obj, np.generic):
            if obj.dtype.hasobject or obj.dtype.kind not in "biufc":
                raise CodecError(f"{path}: unsupported numpy scalar dtype {obj.dtype}")
            return {
                "t": "npscalar",
                "dtype": obj.dtype.str,
                "v": base64.b64encode(obj.tobytes()).decode("ascii"),
            }
        if isinstance(obj, torch.dtype):
            return {"t": "dtype", "v": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.device):
            return {"t": "device", "v": str(obj)}
        if isinstance(obj, bytes | bytearray):
            kind = "bytes" if isinstance(obj, bytes) else "bytearray"
            return {"t": kind, "v": base64.b64encode(bytes(obj)).decode("ascii")}
        if isinstance(obj, dict):
            return self._dict(obj, path)
        if isinstance(obj, tuple):
            if hasattr(obj, "_fields"):
                raise CodecError(f"{path}: named tuples are not supported ({type(obj).__name__})")
            return {"t": "tuple", "v": [self.encode(x, f"{path}[{i}]") for i, x in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(x, f"{path}[{i}]") for i, x in enumerate(obj)]
        raise CodecError(f"{path}: cannot encode object of type {type(obj).__qualname__}")

    def _dict(self, obj: dict[Any, Any], path: str) -> JsonTree:
        encoded_keys: list[JsonTree] = []
        for key in obj:
            if not _is_plain_key(key):
                raise CodecError(f"{path}: unsupported dict key {key!r} ({type(key).__qualname__})")
            encoded_keys.append(self.encode(key, f"{path}<key>"))
        by_sorted = sorted(range(len(encoded_keys)), key=lambda i: _key_sort(encoded_keys[i]))
        sorted_keys = [encoded_keys[i] for i in by_sorted]
        if len({_dumps(k) for k in sorted_keys}) != len(sorted_keys):
            raise CodecError(f"{path}: dict keys collide once encoded")
        values = list(obj.values())
        node: dict[str, JsonTree] = {
            "t": "dict",
            "k": sorted_keys,
            "v": [self.encode(values[i], f"{path}[{_key_label(encoded_keys[i])}]") for i in by_sorted],
        }
        # order[j] = position in the sorted lists of the j-th key in insertion order.
        position = {orig: pos for pos, orig in enumerate(by_sorted)}
        order = [position[j] for j in range(len(by_sorted))]
        if order != list(range(len(order))):
            node["order"] = order
        if isinstance(obj, OrderedDict):
            node["cls"] = "odict"
            metadata = getattr(obj, "_metadata", None)
            if isinstance(metadata, dict):
                node["meta"] = self.encode(metadata, f"{path}._metadata")
        elif type(obj) is not dict:
            node["cls"] = "odict" if isinstance(obj, OrderedDict) else "dict"
        return node

    def _tensor(self, t: torch.Tensor, path: str) -> JsonTree:
        if t.layout != torch.strided:
            raise CodecError(f"{path}: only dense tensors are supported, got layout {t.layout}")
        if t.is_quantized or t.device.type == "meta":
            raise CodecError(f"{path}: quantized and meta tensors are not supported")
        nbytes = t.numel() * t.element_size()
        slot = self._slot(nbytes)
        self.sources.append(t)
        return {
            "t": "tensor",
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "offset": slot.offset,
            "nbytes": nbytes,
        }

    def _ndarray(self, a: np.ndarray[Any, Any], path: str) -> JsonTree:
        if a.dtype.hasobject or a.dtype.kind not in "biufc" or a.dtype.fields is not None:
            raise CodecError(f"{path}: unsupported numpy dtype {a.dtype}")
        slot = self._slot(a.nbytes)
        self.sources.append(a)
        return {
            "t": "ndarray",
            "dtype": a.dtype.str,
            "shape": list(a.shape),
            "offset": slot.offset,
            "nbytes": a.nbytes,
        }


def _is_plain_key(key: Any) -> bool:
    if key is None or isinstance(key, bool | int | float | str):
        return True
    return isinstance(key, tuple) and not hasattr(key, "_fields") and all(_is_plain_key(k) for k in key)


def _key_label(encoded_key: JsonTree) -> str:
    return encoded_key if isinstance(encoded_key, str) else _dumps(encoded_key).decode()


def encode(obj: Any) -> EncodedState:
    """Flatten ``obj`` into a tree and the list of its tensors (referenced, not copied)."""
    enc = _Encoder()
    root = enc.encode(obj, "$")
    return EncodedState(root=root, sources=enc.sources, slots=enc.slots, arena_nbytes=enc.pos)


def _byte_view(src: torch.Tensor | np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Raw bytes of a source as a 1-D uint8 numpy array (copies only when needed)."""
    if isinstance(src, np.ndarray):
        return np.frombuffer(np.ascontiguousarray(src).tobytes(), dtype=np.uint8)
    t = src.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.numel() == 0:
        return np.zeros(0, dtype=np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


def state_digest(obj: Any) -> str:
    """Content digest of a live state object; equal to the digest of its snapshot."""
    encoded = encode(obj)
    return combine(
        encoded.canonical_tree_bytes(), [tensor_digest(_byte_view(s).data) for s in encoded.sources]
    )


_PAGE = 4096


def page_aligned_empty(size: int, *, pin_memory: bool = False) -> torch.Tensor:
    """An uninitialised ``uint8`` buffer of ``size`` bytes starting on a page boundary, so the
    writer can hand it to O_DIRECT without a bounce buffer."""
    raw = torch.empty(size + _PAGE, dtype=torch.uint8, pin_memory=pin_memory)
    start = -raw.data_ptr() % _PAGE
    return raw[start : start + size]


class StagingArena:
    """A reusable staging buffer: copies a state's tensors into one aligned uint8 arena.

    The buffer is allocated once and reused while the layout is unchanged (pinned memory when
    ``pin_memory``), so taking a snapshot costs only the copy. Callers must not stage again
    while a previous arena is still being written out.
    """

    def __init__(self, *, pin_memory: bool = False) -> None:
        self.pin_memory = pin_memory
        self._buffer: torch.Tensor | None = None
        self._layout: tuple[tuple[int, int], ...] | None = None
        self.allocations = 0

    def reserve(self, encoded: EncodedState) -> None:
        """Allocate (and lay out) the buffer for ``encoded`` ahead of the first :meth:`stage`.

        Allocating gigabytes of pinned memory takes seconds; calling this from a background
        thread keeps that out of the first snapshot's stall.
        """
        self._prepare(encoded)

    def _prepare(self, encoded: EncodedState) -> torch.Tensor:
        layout = encoded.layout_key()
        size = encoded.arena_nbytes
        if self._buffer is None or self._buffer.numel() != size:
            # empty, not zeros: only the padding needs zeroing, done below.
            self._buffer = page_aligned_empty(size, pin_memory=self.pin_memory)
            self.allocations += 1
            self._layout = None
        if layout != self._layout:
            # Zero the padding so that tensors.bin depends only on content and layout.
            for start, end, is_tensor in iter_regions(size, encoded.slots, size or 1):
                if not is_tensor:
                    self._buffer[start:end].zero_()
            self._layout = layout
        return self._buffer

    def stage(self, encoded: EncodedState, *, skip: frozenset[int] = frozenset()) -> torch.Tensor:
        """Copy every source tensor (except the slot indices in ``skip``) into the arena.

        Returns the arena (uint8, CPU). Skipped slots are filled later by :meth:`copy_slot`.
        """
        arena = self._prepare(encoded)
        needs_sync = False
        for index in range(len(encoded.slots)):
            if index not in skip:
                needs_sync |= self.copy_slot(encoded, index)
        if needs_sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        return arena

    def copy_slot(self, encoded: EncodedState, index: int) -> bool:
        """Copy source ``index`` into its slot; True when it was an asynchronous device copy."""
        src, slot = encoded.sources[index], encoded.slots[index]
        if slot.nbytes == 0:
            return False
        arena = self._buffer
        if arena is None or arena.numel() != encoded.arena_nbytes:
            raise RuntimeError("copy_slot before stage(): the arena is not laid out for this state")
        if isinstance(src, np.ndarray):
            dst_np = arena.numpy()[slot.offset : slot.offset + slot.nbytes]
            dst_np.view(src.dtype).reshape(src.shape)[...] = src
            return False
        t = src.detach()
        dst = arena[slot.offset : slot.offset + slot.nbytes].view(t.dtype).view(t.shape)
        if t.device.type != "cpu":
            dst.copy_(t, non_blocking=self.pin_memory)
            return True
        dst.copy_(t)
        return False


def iter_regions(arena_nbytes: int, slots: list[TensorSlot], chunk: int) -> Iterator[tuple[int, int, bool]]:
    """Walk the arena as ``(start, end, is_tensor)`` pieces of at most ``chunk`` bytes.

    Padding pieces have ``is_tensor`` False; concatenating the tensor pieces gives the arena
    part of the digest input.
    """
    pos = 0
    for slot in slots:
        if slot.offset > pos:
            yield pos, slot.offset, False
        start, end = slot.offset, slot.offset + slot.nbytes
        while start < end:
            stop = min(end, start + chunk)
            yield start, stop, True
            start = stop
        pos = max(pos, end)
    if arena_nbytes > pos:
        yield pos, arena_nbytes, False


def slot_digests(arena: memoryview, slots: list[TensorSlot]) -> list[bytes]:
    """Each slot's tensor digest, from an arena held in memory."""
    for slot in slots:
        if slot.offset + slot.nbytes > len(arena):
            raise CodecError(f"slot {slot} lies outside the arena ({len(arena)} bytes)")
    return [tensor_digest(arena[s.offset : s.offset + s.nbytes]) for s in slots]


def arena_digest(canonical_tree: bytes, arena: memoryview, slots: list[TensorSlot]) -> str:
    """Digest from a staged arena."""
    return combine(canonical_tree, slot_digests(arena, slots))


# -- component digests ----------------------------------------------------------------------

#: The section of a snapshot object holding state identical on every rank (stored once).
SHARED = "shared"
#: The section holding each rank's own state, keyed by rank.
RANKS = "ranks"
#: A shared part split one level further: one component per registered extra.
_SPLIT_SHARED = "extras"
#: Per-rank parts split one level further: one component per RNG, per ``per_rank`` object.
_SPLIT_RANK = frozenset({"rng", "per_rank"})


@dataclass(frozen=True)
class Component:
    """One named part of a state: its canonical tree bytes and its slots ``[first, stop)``."""

    name: str
    canonical: bytes
    first: int
    stop: int


def _items(node: JsonTree) -> list[tuple[JsonTree, JsonTree, int, int]] | None:
    """A dict node's ``(encoded key, value, first slot, tensor count)``; None if not a dict node."""
    if not (isinstance(node, dict) and node.get("t") == "dict"):
        return None
    out: list[tuple[JsonTree, JsonTree, int, int]] = []
    first = 0
    for key, value in zip(node.get("k", []), node.get("v", []), strict=True):
        count = sum(1 for _ in _tensor_records(value))
        out.append((key, value, first, count))
        first += count
    return out


def _segment(encoded_key: JsonTree) -> str:
    """A key as one readable piece of a component name (never a control character)."""
    label = _key_label(encoded_key)
    if label.isprintable():
        return label
    return json.dumps(label)[1:-1]


def component_plan(root: JsonTree, fmt: str = FORMAT) -> list[Component]:
    """Name the components of an encoded snapshot object and find their slots.

    ``root`` is an encoded tree (:attr:`EncodedState.root`, or ``tree.json``'s ``"root"``). The
    names, for a ``TrainingState.snapshot_object``:

    * ``shared`` part ``K`` -> ``K`` (``model``, ``optimizer``, ``scheduler``, ``scaler``,
      ``ema``, ``progress``, and any part added later), except ``extras``: one component
      ``extras/<name>`` per extra;
    * rank ``R``'s part ``K`` -> ``K/rank<R>`` (``loader/rank1``, ``step/rank0``, and any part
      added later), except ``rng``: one component ``rng/<generator>/rank<R>`` per generator
      (``python``, ``numpy``, ``torch``, ``cuda``), and ``per_rank``: one component
      ``per_rank/<name>/rank<R>`` per object registered with ``TrainingState(per_rank=...)``;
    * any other top-level key ``K`` -> ``K`` (``world_size``).

    A part whose value is None (no scheduler registered, no loader) has no component. Every
    tensor of a snapshot object belongs to exactly one component. A root that is not a dict has
    no components.
    """
    plan: list[Component] = []
    names: set[str] = set()

    def add(name: str, node: JsonTree, first: int, count: int) -> None:
        if node is None:
            return
        if name in names:
            raise CodecError(f"two parts of the state have the component name {name!r}")
        names.add(name)
        plan.append(Component(name, canonical_tree_bytes(node, fmt), first, first + count))

    def split(node: JsonTree, first: int, count: int, prefix: str, suffix: str, name: str) -> None:
        parts = _items(node)
        if parts is None:
            add(name, node, first, count)
            return
        for key, value, at, n in parts:
            add(f"{prefix}{_segment(key)}{suffix}", value, first + at, n)

    for key, node, first, count in _items(root) or []:
        if key == SHARED and (shared := _items(node)) is not None:
            for part, value, at, n in shared:
                label = _segment(part)
                if part == _SPLIT_SHARED:
                    split(value, first + at, n, f"{label}/", "", label)
                else:
                    add(label, value, first + at, n)
        elif key == RANKS and (ranks := _items(node)) is not None:
            for rank, rank_node, rank_at, rank_n in ranks:
                suffix = f"/rank{_segment(rank)}"
                rank_parts = _items(rank_node)
                if rank_parts is None:
                    add(f"{RANKS}{suffix}", rank_node, first + rank_at, rank_n)
                    continue
                for part, value, at, n in rank_parts:
                    label = _segment(part)
                    base = first + rank_at + at
                    if part in _SPLIT_RANK:
                        split(value, base, n, f"{label}/", suffix, label + suffix)
                    else:
                        add(label + suffix, value, base, n)
        else:
            add(_segment(key), node, first, count)
    return plan


def digests_of(
    canonical_tree: bytes, components: list[Component], tensor_digests: list[bytes]
) -> tuple[str, dict[str, str]]:
    """The whole-state digest and every component's, from the tensor digests in slot order."""
    out: dict[str, str] = {}
    for comp in components:
        if not 0 <= comp.first <= comp.stop <= len(tensor_digests):
            raise CodecError(f"component {comp.name!r} lies outside the {len(tensor_digests)} slots")
        out[comp.name] = combine(comp.canonical, tensor_digests[comp.first : comp.stop])
    return combine(canonical_tree, tensor_digests), out


def arena_digests(
    canonical_tree: bytes,
    arena: memoryview,
    slots: list[TensorSlot],
    components: list[Component],
) -> tuple[str, dict[str, str]]:
    """The whole-state digest (exactly :func:`arena_digest`'s) and every component's digest,
    from an arena held in memory: one hashing pass over the tensor bytes."""
    return digests_of(canonical_tree, components, slot_digests(arena, slots))


def state_digests(obj: Any) -> tuple[str, dict[str, str]]:
    """A live state's digest and component digests: what a snapshot of it records."""
    encoded = encode(obj)
    tensor_digests = [tensor_digest(_byte_view(src).data) for src in encoded.sources]
    return digests_of(encoded.canonical_tree_bytes(), component_plan(encoded.root), tensor_digests)


def component_digests(obj: Any) -> dict[str, str]:
    """The component digests of a live state object (name -> ``"sha256:<hex>"``).

    Equal to the ``components`` a snapshot of ``obj`` records in its manifest, e.g.
    ``component_digests(state.snapshot_object(gathered))`` on rank 0.
    """
    return state_digests(obj)[1]


def _digests_v1(
    root: JsonTree, arena: memoryview, slots: list[TensorSlot]
) -> tuple[str, dict[str, str]]:
    """A format-1 snapshot's digests: the canonical tree followed by the raw tensor bytes."""
    whole = hashlib.sha256(canonical_tree_bytes(root, FORMAT_V1))
    for slot in slots:
        whole.update(arena[slot.offset : slot.offset + slot.nbytes])
    out: dict[str, str] = {}
    for comp in component_plan(root, FORMAT_V1):
        h = hashlib.sha256(comp.canonical)
        for slot in slots[comp.first : comp.stop]:
            h.update(arena[slot.offset : slot.offset + slot.nbytes])
        out[comp.name] = "sha256:" + h.hexdigest()
    return "sha256:" + whole.hexdigest(), out


def snapshot_digests(
    tree_json: bytes, arena: bytes | bytearray | memoryview | np.ndarray[Any, Any]
) -> tuple[str, dict[str, str]]:
    """The digest and component digests of a snapshot's files (``tree.json``, ``tensors.bin``).

    Reads offsets from the tree, so it agrees with :func:`state_digests` whatever the layout;
    a format-1 tree gets its own (raw-bytes) digests.
    """
    tree = parse_tree(tree_json)
    fmt = tree.get("format")
    if fmt not in FORMATS:
        raise CodecError(f"unknown tree format {fmt!r}; expected one of {sorted(FORMATS)}")
    root = tree.get("root")
    flat = (np.frombuffer(arena, dtype=np.uint8) if not isinstance(arena, np.ndarray)
            else arena.view(np.uint8).reshape(-1))
    slots: list[TensorSlot] = []
    for record in _tensor_records(root):
        offset, nbytes = record.get("offset"), record.get("nbytes")
        if not (isinstance(offset, int) and isinstance(nbytes, int)) or offset < 0 or nbytes < 0:
            raise CodecError(f"bad tensor record {record!r}")
        slots.append(TensorSlot(offset=offset, nbytes=nbytes))
    if fmt == FORMAT_V1:
        for slot in slots:
            if slot.offset + slot.nbytes > flat.size:
                raise CodecError(f"slot {slot} lies outside the arena ({flat.size} bytes)")
        return _digests_v1(root, flat.data, slots)
    return arena_digests(canonical_tree_bytes(root), flat.data, slots, component_plan(root))


def _torch_dtype(name: object) -> torch.dtype:
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise CodecError(f"unknown torch dtype {name!r}"[:200])
    return value


#: The encoder refuses quantized tensors; a record naming one of these dtypes is not ours.
_QUANTIZED = frozenset(
    getattr(torch, n) for n in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4") if hasattr(torch, n)
)


def _element_size(dtype: torch.dtype) -> int:
    if dtype in _QUANTIZED:
        raise CodecError(f"unsupported torch dtype {dtype}")
    try:
        return torch.empty((), dtype=dtype).element_size()
    except (RuntimeError, TypeError) as exc:  # quantized and other dtypes without plain storage
        raise CodecError(f"unsupported torch dtype {dtype}") from exc


def _shape(node: dict[str, Any]) -> list[int]:
    """A record's shape: a list of non-negative ints, never coerced (``"3"``, ``True``, ``-1``)."""
    shape = node.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CodecError(f"bad shape in tensor record {_brief(node)}")
    return shape


def _brief(node: dict[str, Any]) -> str:
    return repr({k: node.get(k) for k in ("t", "dtype", "shape", "offset", "nbytes")})[:200]


class _Decoder:
    def __init__(
        self,
        arena: bytearray | memoryview | np.ndarray[Any, Any],
        *,
        copy: bool = True,
        borrow: frozenset[tuple[str, ...]] = frozenset(),
    ) -> None:
        self.copy = copy
        self.borrow = borrow
        #: Below this depth no borrow path can match: the path is no longer tracked there.
        self._borrow_depth = max(map(len, borrow), default=0)
        self._path: list[Any] = []
        self.arena_np = np.frombuffer(arena, dtype=np.uint8) if not isinstance(arena, np.ndarray) else arena.view(np.uint8).reshape(-1)
        self.arena_t = torch.from_numpy(self.arena_np) if self.arena_np.size else None
        self.slots: list[TensorSlot] = []

    def _region(self, node: dict[str, Any], itemsize: int) -> tuple[int, int]:
        """The record's ``(offset, nbytes)``, checked against the arena and the records before.

        Regions come in arena order and never overlap (the encoder's layout), lie inside the
        arena, and start at a multiple of the item size (a view of another alignment is a torch
        error, not a tensor).
        """
        offset, nbytes = node.get("offset"), node.get("nbytes")
        if (
            not (isinstance(offset, int) and isinstance(nbytes, int))
            or isinstance(offset, bool) or isinstance(nbytes, bool)
            or offset < 0 or nbytes < 0
        ):
            raise CodecError(f"bad tensor record {_brief(node)}")
        if offset + nbytes > self.arena_np.size:
            raise CodecError(
                f"tensor record {_brief(node)} lies outside the arena ({self.arena_np.size} bytes)"
            )
        floor = self.slots[-1].offset + self.slots[-1].nbytes if self.slots else 0
        if offset < floor:
            raise CodecError(f"tensor record {_brief(node)} overlaps the one before (ends at {floor})")
        if offset % itemsize:
            raise CodecError(f"tensor record {_brief(node)}: offset not aligned to its dtype")
        self.slots.append(TensorSlot(offset=offset, nbytes=nbytes))
        return offset, nbytes

    def decode(self, node: JsonTree) -> Any:
        if node is None or isinstance(node, bool | int | float | str):
            return node
        if isinstance(node, list):
            return [self._child(i, x) for i, x in enumerate(node)]
        if not isinstance(node, dict):
            raise CodecError(f"bad tree node {node!r}")
        tag = node.get("t")
        if tag == "dict":
            return self._dict(node)
        if tag == "tuple":
            return tuple(self.decode(x) for x in node["v"])
        if tag == "float":
            if node["v"] not in ("nan", "inf", "-inf"):
                raise CodecError(f"bad float node {node!r}")
            return float(node["v"])
        if tag == "tensor":
            return self._tensor(node)
        if tag == "ndarray":
            return self._ndarray(node)
        if tag == "npscalar":
            dtype = np.dtype(node["dtype"])
            raw = base64.b64decode(node["v"])
            return np.frombuffer(raw, dtype=dtype)[0].copy()
        if tag == "dtype":
            return _torch_dtype(node["v"])
        if tag == "device":
            return torch.device(node["v"])
        if tag == "bytes":
            return base64.b64decode(node["v"])
        if tag == "bytearray":
            return bytearray(base64.b64decode(node["v"]))
        raise CodecError(f"unknown tree tag {tag!r}")

    def _dict(self, node: dict[str, Any]) -> dict[Any, Any]:
        keys = [self.decode(k) for k in node["k"]]
        if len(keys) != len(node["v"]):
            raise CodecError("dict node with different numbers of keys and values")
        values = [self._child(key, v) for key, v in zip(keys, node["v"], strict=True)]
        order = node.get("order", list(range(len(keys))))
        if sorted(order) != list(range(len(keys))):
            raise CodecError("dict node with a bad insertion order")
        cls = node.get("cls")
        out: dict[Any, Any] = OrderedDict() if cls == "odict" else {}
        for pos in order:
            out[keys[pos]] = values[pos]
        if "meta" in node:
            out._metadata = self.decode(node["meta"])  # type: ignore[attr-defined]
        return out

    def _child(self, key: Any, node: JsonTree) -> Any:
        """Decode a dict value or list item; under a ``borrow`` path, views instead of copies."""
        if len(self._path) >= self._borrow_depth:
            return self.decode(node)  # deep (or nothing borrowed): the common case, untracked
        self._path.append(key)
        saved = self.copy
        try:
            if self.copy and tuple(self._path) in self.borrow:
                self.copy = False
            return self.decode(node)
        finally:
            self.copy = saved
            self._path.pop()

    def _tensor(self, node: dict[str, Any]) -> torch.Tensor:
        dtype = _torch_dtype(node.get("dtype"))
        shape = _shape(node)
        itemsize = _element_size(dtype)
        offset, nbytes = self._region(node, itemsize)
        if nbytes != math.prod(shape) * itemsize:
            raise CodecError(f"tensor record {_brief(node)}: nbytes does not match shape and dtype")
        if nbytes == 0 or self.arena_t is None:
            return torch.empty(shape, dtype=dtype)
        view = self.arena_t[offset : offset + nbytes].view(dtype).view(shape)
        # Without copy the tensors are views that keep the (never reused) read buffer alive.
        return view.clone() if self.copy else view

    def _ndarray(self, node: dict[str, Any]) -> np.ndarray[Any, Any]:
        dtype = _numpy_dtype(node.get("dtype"))
        shape = tuple(_shape(node))
        offset, nbytes = self._region(node, 1)  # numpy views any byte offset
        if nbytes != math.prod(shape) * dtype.itemsize:
            raise CodecError(f"ndarray record {_brief(node)}: nbytes does not match shape and dtype")
        flat = self.arena_np[offset : offset + nbytes].view(dtype)
        out: np.ndarray[Any, Any] = flat.reshape(shape).copy()
        return out


def _numpy_dtype(name: object) -> np.dtype[Any]:
    if not isinstance(name, str):
        raise CodecError(f"bad numpy dtype {name!r}"[:200])
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"bad numpy dtype {name!r}"[:200]) from exc
    if dtype.hasobject or dtype.kind not in "biufc" or dtype.fields is not None:
        raise CodecError(f"unsupported numpy dtype {dtype}")
    return dtype


#: What a malformed tree makes the decoder's own operations raise (a missing key, a value of the
#: wrong type, an unhashable key, bad base64, a device name torch refuses, absurd nesting): all
#: mean a tree the encoder never wrote, reported as one CodecError.
_MALFORMED = (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError)


def decode_tree(
    tree: dict[str, Any],
    arena: bytearray | memoryview | np.ndarray[Any, Any],
    *,
    copy: bool = True,
    compute_digest: bool = True,
    borrow: frozenset[tuple[str, ...]] = frozenset(),
) -> tuple[Any, str | None]:
    """Rebuild the state from a parsed ``tree.json`` and its arena; return it and its digest.

    With ``copy=False`` the tensors are views into ``arena``, which must then never be reused
    (it stays alive as long as they do). ``borrow`` names dict-key paths (``("shared",
    "model")``) whose tensors are views even with ``copy=True``: for parts the caller copies into
    existing tensors at once (``load_state_dict`` of a module), where a fresh copy first would
    only cost memory and page faults. The digest is None unless ``compute_digest``.

    Every record is checked against the region it reads (inside the arena, in order without
    overlap, aligned, ``nbytes`` equal to shape times item size) and any malformation is a
    :class:`CodecError`, never a silently wrong tensor or a numpy/torch error.
    """
    fmt = tree.get("format")
    if fmt not in FORMATS:
        raise CodecError(f"unknown tree format {fmt!r}; expected one of {sorted(FORMATS)}")
    declared = tree.get("arena_nbytes")
    dec = _Decoder(arena, copy=copy, borrow=borrow)
    if declared != dec.arena_np.size:
        raise CodecError(f"arena has {dec.arena_np.size} bytes but the tree declares {declared}")
    if "root" not in tree:
        raise CodecError("tree.json has no root")
    try:
        obj = dec.decode(tree["root"])
    except CodecError:
        raise
    except _MALFORMED as exc:
        raise CodecError(f"malformed tree: {exc!r}"[:300]) from exc
    # The digest covers the regions the tensor walk names (storage.content); a tensor decoded
    # from anywhere else (a record in a dict key) would be state the digest does not vouch for.
    expected = [(r.get("offset"), r.get("nbytes")) for r in _tensor_records(tree["root"])]
    if [(s.offset, s.nbytes) for s in dec.slots] != expected:
        raise CodecError("the tree decodes tensors that its content digest does not cover")
    if not compute_digest:
        return obj, None
    if fmt == FORMAT_V1:
        return obj, _digests_v1(tree["root"], dec.arena_np.data, dec.slots)[0]
    return obj, arena_digest(canonical_tree_bytes(tree["root"]), dec.arena_np.data, dec.slots)


def decode(
    tree_json: bytes,
    arena: bytearray | memoryview | np.ndarray[Any, Any],
    *,
    copy: bool = True,
) -> tuple[Any, str]:
    """Parse ``tree.json`` bytes and rebuild the state from the arena; return it and its digest."""
    obj, digest = decode_tree(parse_tree(tree_json), arena, copy=copy, compute_digest=True)
    return obj, str(digest)


def parse_tree(tree_json: bytes) -> dict[str, Any]:
    """Parse ``tree.json`` bytes (CodecError when malformed)."""
    try:
        tree = json.loads(tree_json)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CodecError(f"tree.json is not valid JSON: {exc}") from exc
    if not isinstance(tree, dict):
        raise CodecError("tree.json does not hold an object")
    return tree


def encode_to_bytes(obj: Any) -> tuple[bytes, bytes, str]:
    """Encode ``obj`` fully in memory: (tree.json bytes, arena bytes, digest). For tests and tools."""
    encoded = encode(obj)
    arena = StagingArena().stage(encoded)
    arena_np = arena.numpy() if encoded.arena_nbytes else np.zeros(0, dtype=np.uint8)
    digest = arena_digest(encoded.canonical_tree_bytes(), arena_np.data, encoded.slots)
    return encoded.tree_bytes(), arena_np.tobytes(), digest
