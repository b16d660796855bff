"""Codec: exact round trips of nested states (hypothesis), digest stability, safety checks."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer import codec
from trainer.errors import CodecError

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int32, torch.int64, torch.bool, torch.complex64]


def raw(t: torch.Tensor) -> bytes:
    """The bytes of a tensor's elements in row-major order."""
    if t.numel() == 0:
        return b""
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def same(a: Any, b: Any) -> bool:
    """Structural, type-aware, bitwise equality."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and raw(a) == raw(b)
    if isinstance(a, np.ndarray):
        return bool(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, dict):
        return list(a.keys()) == list(b.keys()) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    result: bool = a == b
    return result


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    n = math.prod(shape)
    raw = draw(st.binary(min_size=n * torch.empty((), dtype=dtype).element_size(),
                         max_size=n * torch.empty((), dtype=dtype).element_size()))
    if dtype == torch.bool:
        raw = bytes(b & 1 for b in raw)
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    t = flat.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
    if draw(st.booleans()) and t.dim() == 2:
        t = t.t()  # non-contiguous input must be stored by value
    return t


scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
           | st.binary(max_size=8))
arrays = st.builds(lambda xs: np.array(xs, dtype=np.uint32), st.lists(st.integers(0, 2**32 - 1), max_size=5))
leaves = scalars | tensors() | arrays
keys = st.integers(-5, 50) | st.text(max_size=5)
states = st.recursive(
    leaves,
    lambda children: (st.lists(children, max_size=4)
                      | st.lists(children, max_size=4).map(tuple)
                      | st.dictionaries(keys, children, max_size=4)),
    max_leaves=20,
)


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None)
@given(states)
def test_round_trip_is_exact(obj: Any) -> None:
    tree, arena, digest = codec.encode_to_bytes(obj)
    back, digest_back = codec.decode(tree, bytearray(arena))
    assert same(obj if not isinstance(obj, torch.Tensor) else obj.contiguous(), back)
    assert digest == digest_back == codec.state_digest(obj)
    for node in _tensor_records(json.loads(tree)["root"]):
        assert node["offset"] % codec.ALIGN == 0


def _tensor_records(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, list):
        return [r for x in node for r in _tensor_records(x)]
    if isinstance(node, dict):
        if node.get("t") in ("tensor", "ndarray"):
            return [node]
        return [r for v in node.values() for r in _tensor_records(v)]
    return []


@pytest.mark.timeout(60)
def test_optimizer_state_dict_round_trip_keeps_int_keys_and_order() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    sd = {"model": model.state_dict(), "opt": opt.state_dict()}
    tree, arena, _ = codec.encode_to_bytes(sd)
    back, _ = codec.decode(tree, bytearray(arena))
    assert same(sd, back)
    assert isinstance(back["model"], OrderedDict)
    assert getattr(back["model"], "_metadata", None) == getattr(sd["model"], "_metadata", 0)
    assert list(back["opt"]["state"]) == [0, 1, 2, 3]


@pytest.mark.timeout(60)
def test_digest_is_stable_and_sensitive() -> None:
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    base: dict[str, Any] = {"w": w, "step": 3, "lr": 0.1}
    d = codec.state_digest(base)
    assert d == codec.state_digest({"lr": 0.1, "step": 3, "w": w.clone()})  # order-free
    assert d.startswith("sha256:") and len(d) == 7 + 64
    changes = [
        {**base, "step": 4},
        {**base, "lr": 0.1000000001},
        {**base, "w": w.clone().index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(-0.0))},
        {**base, "w": w.double()},
        {**base, "w": w.reshape(3, 2)},
        {**base, "extra": None},
        {**base, "step": (3,)},
        {**base, "step": 3.0},
    ]
    for changed in changes:
        assert codec.state_digest(changed) != d


@pytest.mark.timeout(60)
def test_file_layout_does_not_change_digest_but_bytes_do() -> None:
    a = {"x": torch.ones(3), "y": torch.zeros(70, dtype=torch.uint8)}
    _tree, arena, digest = codec.encode_to_bytes(a)
    assert len(arena) == 64 + 70
    assert digest == codec.state_digest(a)


@pytest.mark.timeout(60)
def test_loaded_tensors_do_not_alias_the_buffer() -> None:
    tree, arena, _ = codec.encode_to_bytes({"x": torch.ones(4)})
    buf = bytearray(arena)
    back, _ = codec.decode(tree, buf)
    buf[:] = bytes(len(buf))
    assert torch.equal(back["x"], torch.ones(4))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", [object(), {1.5j: 1}, {(1, 2): torch.ones(1)}.items(), torch.ones(2).to_sparse()])
def test_unsupported_objects_are_refused(bad: Any) -> None:
    if isinstance(bad, dict):
        with pytest.raises(CodecError):
            codec.encode(bad)
        return
    with pytest.raises(CodecError):
        codec.encode({"x": bad})


@pytest.mark.timeout(60)
def test_corrupt_trees_are_refused() -> None:
    tree, arena, _ = codec.encode_to_bytes({"x": torch.ones(4)})
    doc = json.loads(tree)
    node = doc["root"]["v"][0]
    node["offset"] = len(arena)
    with pytest.raises(CodecError):
        codec.decode(json.dumps(doc).encode(), bytearray(arena))
    doc2 = json.loads(tree)
    doc2["root"]["v"][0]["dtype"] = "not_a_dtype"
    with pytest.raises(CodecError):
        codec.decode(json.dumps(doc2).encode(), bytearray(arena))
    with pytest.raises(CodecError):
        codec.decode(b"{not json", bytearray(arena))
    with pytest.raises(CodecError):
        codec.decode(tree, bytearray(arena) + b"x")


@pytest.mark.timeout(60)
def test_staging_arena_is_reused_while_layout_is_unchanged() -> None:
    arena = codec.StagingArena()
    state = {"w": torch.randn(100), "b": torch.randn(3)}
    first = arena.stage(codec.encode(state))
    state["w"].add_(1)
    second = arena.stage(codec.encode(state))
    assert arena.allocations == 1 and first.data_ptr() == second.data_ptr()
    back, _ = codec.decode(codec.encode(state).tree_bytes(), bytearray(second.numpy().tobytes()))
    assert torch.equal(back["w"], state["w"])


@pytest.mark.timeout(60)
def test_reserved_arena_has_zero_padding_and_matches_a_fresh_encoding() -> None:
    state = {"a": torch.ones(3), "b": torch.full((5,), 7, dtype=torch.uint8)}
    arena = codec.StagingArena()
    encoded = codec.encode(state)
    arena.reserve(encoded)
    staged = arena.stage(encoded)
    _, fresh, _ = codec.encode_to_bytes(state)
    assert staged.numpy().tobytes() == fresh and arena.allocations == 1
    state["b"] = torch.zeros(40, dtype=torch.uint8)  # a new layout of the same total size
    state["a"] = torch.ones(3)
    encoded = codec.encode(state)
    staged = arena.stage(encoded)
    assert staged.numpy().tobytes() == codec.encode_to_bytes(state)[1]


@pytest.mark.timeout(60)
def test_views_decode_shares_the_buffer() -> None:
    tree, arena, _ = codec.encode_to_bytes({"x": torch.ones(4)})
    buf = np.frombuffer(bytearray(arena), dtype=np.uint8)
    back, digest = codec.decode_tree(codec.parse_tree(tree), buf, copy=False, compute_digest=False)
    assert digest is None
    buf[:] = 0
    assert torch.equal(back["x"], torch.zeros(4))


def test_borrowed_paths_are_views_and_everything_else_copies() -> None:
    state = {
        "shared": {"model": {"w": torch.ones(4)}, "optimizer": {"m": torch.ones(4)}},
        "model": {"w": torch.ones(4)},  # the same key elsewhere: not borrowed
        "ranks": [{"shared": {"model": torch.ones(4)}}],
    }
    tree, arena, _ = codec.encode_to_bytes(state)
    buf = np.frombuffer(bytearray(arena), dtype=np.uint8)
    back, _ = codec.decode_tree(codec.parse_tree(tree), buf, compute_digest=False,
                                borrow=frozenset({("shared", "model")}))
    buf[:] = 0
    assert torch.equal(back["shared"]["model"]["w"], torch.zeros(4))
    assert torch.equal(back["shared"]["optimizer"]["m"], torch.ones(4))
    assert torch.equal(back["model"]["w"], torch.ones(4))
    assert torch.equal(back["ranks"][0]["shared"]["model"], torch.ones(4))
