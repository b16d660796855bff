"""Per-component digests: names, isolation, layout independence, the manifest field, the
Checkpointer's snapshots and ``snapshots --json`` (both tiers)."""

from __future__ import annotations

import copy
import json
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import torch

from orchestrator import cli
from orchestrator.status import remote_snapshot_records, snapshot_records
from storage import CorruptSnapshot, FileEntry, LocalSnapshotStore, Manifest
from storage.remote import RemoteSnapshotStore
from trainer import codec
from trainer.checkpoint import Checkpointer
from trainer.errors import CodecError
from trainer.settings import WorkerSettings
from trainer.state import TrainingState

SHA = "sha256:" + "ab" * 32


class Counter:
    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.table = torch.arange(4, dtype=torch.float32) * value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "table": self.table}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.value = int(sd["value"])
        self.table = sd["table"].clone()


class Loader:
    def __init__(self) -> None:
        self.position = 3
        self.perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "perm": self.perm}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.position = int(sd["position"])


def make_state() -> TrainingState:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    ema = torch.optim.swa_utils.AveragedModel(model)
    return TrainingState(model=model, optimizer=opt, scheduler=sched, ema=ema, loader=Loader(),
                         extras={"early_stopping": Counter(2), "other": Counter(5)})


def snapshot_object(state: TrainingState, world: int = 2) -> dict[str, Any]:
    ranks = []
    for _ in range(world):
        ranks.append(state.rank_state_dict())
        torch.rand(1), random.random(), np.random.rand()  # each rank's RNGs differ
    return state.snapshot_object(ranks)


EXPECTED_NAMES = {
    "model", "optimizer", "scheduler", "ema", "progress", "world_size",
    "extras/early_stopping", "extras/other",
    *(f"{part}/rank{r}" for part in ("step", "loader", "rng/python", "rng/numpy", "rng/torch",
                                       "rng/cuda") for r in (0, 1)),
}


def test_names_cover_every_part_of_a_training_state() -> None:
    comps = codec.component_digests(snapshot_object(make_state()))
    # No scaler registered: no "scaler" component (a None part has none).
    assert set(comps) == EXPECTED_NAMES
    assert all(v.startswith("sha256:") and len(v) == 7 + 64 for v in comps.values())


def test_every_tensor_belongs_to_exactly_one_component() -> None:
    encoded = codec.encode(snapshot_object(make_state()))
    plan = codec.component_plan(encoded.root)
    covered = sorted(i for c in plan for i in range(c.first, c.stop))
    assert covered == list(range(len(encoded.slots)))


def test_a_component_digest_is_the_digest_of_that_part_alone() -> None:
    obj = snapshot_object(make_state())
    comps = codec.component_digests(obj)
    shared, ranks = obj["shared"], obj["ranks"]
    assert comps["model"] == codec.state_digest(shared["model"])
    assert comps["optimizer"] == codec.state_digest(shared["optimizer"])
    assert comps["extras/other"] == codec.state_digest(shared["extras"]["other"])
    assert comps["rng/torch/rank1"] == codec.state_digest(ranks[1]["rng"]["torch"])
    assert comps["rng/python/rank0"] == codec.state_digest(ranks[0]["rng"]["python"])
    assert comps["loader/rank1"] == codec.state_digest(ranks[1]["loader"])
    assert comps["world_size"] == codec.state_digest(2)
    # Different ranks' RNGs really are told apart.
    assert comps["rng/torch/rank0"] != comps["rng/torch/rank1"]


def test_state_digests_agree_with_state_digest_and_component_digests() -> None:
    obj = snapshot_object(make_state())
    digest, comps = codec.state_digests(obj)
    assert digest == codec.state_digest(obj)
    assert comps == codec.component_digests(obj)


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    assert set(before) == set(after)
    return {k for k in before if before[k] != after[k]}


def test_changing_one_optimizer_tensor_changes_only_the_optimizer() -> None:
    obj = snapshot_object(make_state())
    before = codec.state_digests(obj)
    other = copy.deepcopy(obj)
    state = other["shared"]["optimizer"]["state"]
    first = sorted(state)[0]
    state[first]["exp_avg"].view(-1)[0] += 1e-3
    after = codec.state_digests(other)
    assert _changed(before[1], after[1]) == {"optimizer"}
    assert before[0] != after[0]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda o: o["shared"]["model"]["2.bias"].add_(1), {"model"}),
        (lambda o: o["shared"]["extras"]["other"].update(value=6), {"extras/other"}),
        (lambda o: o["shared"]["extras"]["early_stopping"]["table"].add_(1),
         {"extras/early_stopping"}),
        (lambda o: o["ranks"][1]["rng"]["torch"][100:101].fill_(7), {"rng/torch/rank1"}),
        (lambda o: o["ranks"][0]["loader"].update(position=4), {"loader/rank0"}),
        (lambda o: o["shared"]["progress"].update(best_metric=0.5), {"progress"}),
        (lambda o: o["shared"]["scheduler"].update(last_epoch=9), {"scheduler"}),
    ],
)
def test_each_edit_changes_only_its_component(edit: Any, expected: set[str]) -> None:
    obj = snapshot_object(make_state())
    before = codec.component_digests(obj)
    other = copy.deepcopy(obj)
    edit(other)
    assert _changed(before, codec.component_digests(other)) == expected


def test_same_content_in_other_layouts_gives_equal_components() -> None:
    state = make_state()
    two = snapshot_object(state, world=2)
    one = {**copy.deepcopy(two), "world_size": 1, "ranks": {0: copy.deepcopy(two["ranks"][0])}}
    # Fewer ranks move every shared tensor ("ranks" sorts before "shared") to other offsets.
    e1, e2 = codec.encode(one), codec.encode(two)
    assert e1.slots[-1].offset != e2.slots[-1].offset
    c1, c2 = codec.component_digests(one), codec.component_digests(two)
    for name in ("model", "optimizer", "ema", "extras/other", "rng/torch/rank0", "loader/rank0"):
        assert c1[name] == c2[name], name
    assert c1["world_size"] != c2["world_size"]
    # Another insertion order of the same dicts: same digests.
    shuffled = copy.deepcopy(two)
    shuffled["shared"] = dict(reversed(list(shuffled["shared"].items())))
    model = shuffled["shared"]["model"]
    reordered = OrderedDict(reversed(list(model.items())))
    reordered._metadata = model._metadata  # type: ignore[attr-defined]
    shuffled["shared"]["model"] = reordered
    assert list(shuffled["shared"]) != list(two["shared"])
    assert codec.state_digests(shuffled) == codec.state_digests(two)


def _relaid(tree_json: bytes, arena: bytes, gap: int) -> tuple[bytes, bytes]:
    """The same state with every tensor moved ``gap`` more bytes apart (another file layout)."""
    tree = json.loads(tree_json)
    records: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for x in node:
                walk(x)
        elif isinstance(node, dict):
            if node.get("t") in ("tensor", "ndarray"):
                records.append(node)
            for key, value in node.items():
                if key != "k":
                    walk(value)

    walk(tree["root"])
    out = bytearray()
    for rec in sorted(records, key=lambda r: int(r["offset"])):
        data = arena[rec["offset"] : rec["offset"] + rec["nbytes"]]
        # Garbage padding (never part of a digest), keeping 8-byte alignment for the decoder.
        out += b"\xee" * (-len(out) % 8 + gap)
        rec["offset"] = len(out)
        out += data
    tree["arena_nbytes"] = len(out)
    return json.dumps(tree).encode(), bytes(out)


def test_snapshot_files_in_another_layout_give_the_same_digests() -> None:
    obj = snapshot_object(make_state())
    tree_json, arena, digest = codec.encode_to_bytes(obj)
    expected = codec.state_digests(obj)
    assert codec.snapshot_digests(tree_json, arena) == expected == (digest, expected[1])
    tree2, arena2 = _relaid(tree_json, arena, gap=24)
    assert arena2 != arena
    assert codec.snapshot_digests(tree2, arena2) == expected
    # And the decoder agrees on the whole digest.
    assert codec.decode(tree2, bytearray(arena2))[1] == digest


def test_arena_digests_keeps_the_whole_digest() -> None:
    obj = snapshot_object(make_state())
    encoded = codec.encode(obj)
    arena = codec.StagingArena().stage(encoded).numpy().data
    tree = encoded.canonical_tree_bytes()
    plan = codec.component_plan(encoded.root)
    one = codec.arena_digests(tree, arena, encoded.slots, plan)
    assert one[0] == codec.arena_digest(tree, arena, encoded.slots) == codec.state_digest(obj)
    assert one[1] == codec.component_digests(obj)
    # Without components it is just the whole digest.
    assert codec.arena_digests(tree, arena, encoded.slots, []) == (one[0], {})


def test_new_parts_get_a_component_automatically() -> None:
    obj = snapshot_object(make_state())
    for r, rank in obj["ranks"].items():
        rank["cursor"] = {"seen": torch.full((3,), float(r))}
    obj["shared"]["journal"] = {"entries": [1, 2]}
    obj["fingerprint"] = "abc"
    comps = codec.component_digests(obj)
    assert {"cursor/rank0", "cursor/rank1", "journal", "fingerprint"} <= set(comps)
    assert comps["cursor/rank0"] != comps["cursor/rank1"]
    assert codec.state_digest(obj) == codec.state_digests(obj)[0]


def test_per_rank_objects_get_one_component_each_per_rank() -> None:
    obj = snapshot_object(make_state())
    for r, rank in obj["ranks"].items():
        rank["per_rank"] = {"prefetch": {"batch": torch.full((3,), float(r))}, "cursor": {"i": 4}}
    before = codec.component_digests(obj)
    names = {"per_rank/prefetch/rank0", "per_rank/prefetch/rank1", "per_rank/cursor/rank0",
             "per_rank/cursor/rank1"}
    assert names <= set(before)
    assert before["per_rank/cursor/rank0"] == before["per_rank/cursor/rank1"]
    assert before["per_rank/prefetch/rank0"] != before["per_rank/prefetch/rank1"]
    obj["ranks"][1]["per_rank"]["prefetch"]["batch"][0] = 9.0
    assert _changed(before, codec.component_digests(obj)) == {"per_rank/prefetch/rank1"}


def test_odd_shapes() -> None:
    assert codec.component_digests(torch.ones(3)) == {}  # not a dict: no parts
    assert codec.component_digests({"a": torch.ones(2), "b": None}) == {
        "a": codec.state_digest(torch.ones(2))
    }
    # Parts that are not dicts where dicts are expected stay whole.
    comps = codec.component_digests({"shared": {"extras": [1]}, "ranks": {0: 5}})
    assert set(comps) == {"extras", "ranks/rank0"}
    # A name that is not printable is escaped, never written raw.
    assert set(codec.component_digests({"shared": {"extras": {"a\nb": 1}}})) == {"extras/a\\nb"}
    with pytest.raises(CodecError, match="component name"):
        codec.component_plan(codec.encode({"shared": {"world_size": 1}, "world_size": 1}).root)


# -- manifest ---------------------------------------------------------------------------------


def _manifest(**over: Any) -> Manifest:
    kw: dict[str, Any] = {
        "run_id": "r", "step": 5, "epoch": 0, "world_size": 2,
        "files": {"tensors.bin": FileEntry(size=3, checksum="0" * 64)},
        "digest": SHA, "created_at": 1.5,
    }
    kw.update(over)
    return Manifest(**kw)


def test_manifest_components_round_trip() -> None:
    comps = {"model": SHA, "rng/python/rank1": "sha256:" + "0" * 64, "extras/ü": SHA}
    m = _manifest(components=comps)
    raw = m.to_json()
    assert json.loads(raw)["components"] == comps
    back = Manifest.from_json(raw)
    assert back == m and dict(back.components) == comps and back.to_json() == raw


def test_manifest_without_components_loads_empty_and_keeps_its_bytes() -> None:
    m = _manifest()
    raw = m.to_json()
    assert "components" not in json.loads(raw)  # an old manifest's exact form
    back = Manifest.from_json(raw)
    assert back.components == {} and back.to_json() == raw


@pytest.mark.parametrize(
    "components",
    [[], "x", {"model": "cd" * 32}, {"model": "sha256:" + "AB" * 32}, {"model": 5},
     {"model": "sha256:" + "ab" * 31}, {"": SHA}, {"a\nb": SHA}, {"x" * 1025: SHA}],
)
def test_bad_components_are_corruption(components: Any) -> None:
    doc = json.loads(_manifest().to_json())
    doc["components"] = components
    with pytest.raises(CorruptSnapshot):
        Manifest.from_json(json.dumps(doc).encode())


def test_writer_commits_components(tmp_path: Path) -> None:
    store = LocalSnapshotStore(str(tmp_path))
    w = store.begin(7)
    w.write_bytes("tensors.bin", b"abc")
    m = w.commit(run_id="r", epoch=0, world_size=1, digest=SHA, components={"model": SHA})
    assert store.read_manifest(7).components == {"model": SHA} == m.components
    w = store.begin(8)
    w.write_bytes("tensors.bin", b"abc")
    with pytest.raises(ValueError, match="component"):
        w.commit(run_id="r", epoch=0, world_size=1, digest=SHA, components={"model": "nope"})
    assert [i.step for i in store.list()] == [7]


# -- a real Checkpointer snapshot -------------------------------------------------------------


@pytest.fixture(autouse=True)
def _reset_structlog() -> Any:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def _checkpointer(tmp_path: Path, state: TrainingState, staging: str = "deferred") -> Checkpointer:
    return Checkpointer(state, hparams={"lr": 0.01}, checkpoint_dir=str(tmp_path / "ck"), every=2,
                        staging=staging,  # type: ignore[arg-type]
                        settings=WorkerSettings.from_env({}))


@pytest.mark.parametrize("staging", ["deferred", "sync"])
def test_checkpointer_records_components(tmp_path: Path, staging: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    state = make_state()
    ckpt = _checkpointer(tmp_path, state, staging)
    assert ckpt.last_components == {} and ckpt.last_components_step is None
    ckpt.step_done(1)
    ckpt.step_done(2)
    ckpt.wait()
    # Nothing changed since the snapshot: the live state still has its digests.
    live = state.snapshot_object([state.rank_state_dict()])
    manifest = ckpt.store.read_manifest(2)
    assert dict(manifest.components) == ckpt.last_components == codec.component_digests(live)
    assert ckpt.last_components_step == 2
    assert manifest.digest == ckpt.last_digest == codec.state_digest(live)
    assert set(manifest.components) == {
        "model", "optimizer", "scheduler", "ema", "progress", "world_size",
        "extras/early_stopping", "extras/other", "step/rank0", "loader/rank0",
        "rng/python/rank0", "rng/numpy/rank0", "rng/torch/rank0", "rng/cuda/rank0"}
    # The snapshot's own files give the same digests.
    path = Path(ckpt.store.path(2))
    assert codec.snapshot_digests((path / "tree.json").read_bytes(),
                                  (path / "tensors.bin").read_bytes()) == (
        manifest.digest, dict(manifest.components))
    # The next snapshot after an optimizer step: the model and optimizer change, extras do not.
    first = dict(ckpt.last_components)
    state.model(torch.randn(2, 4)).sum().backward()
    state.optimizer.step()
    ckpt.step_done(3)
    ckpt.step_done(4)
    ckpt.wait()
    changed = _changed(first, ckpt.last_components)
    assert {"model", "optimizer", "progress", "step/rank0"} <= changed
    assert not changed & {"extras/other", "extras/early_stopping", "ema", "world_size"}
    ckpt.close()

    # snapshots --json shows them, per snapshot.
    capsys.readouterr()
    assert cli.main(["snapshots", "--checkpoint-dir", str(tmp_path / "ck"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[0]["components"] == dict(manifest.components)
    assert rows[1]["components"] == ckpt.last_components
    assert [r["components"] for r in snapshot_records(str(tmp_path / "ck"), verify=True)] == [
        r["components"] for r in rows]


def test_old_snapshot_without_components_lists_empty(tmp_path: Path) -> None:
    store = LocalSnapshotStore(str(tmp_path))
    w = store.begin(3)
    w.write_bytes("tensors.bin", b"abc")
    w.commit(run_id="r", epoch=0, world_size=1, digest=SHA)
    os_manifest = Path(store.path(3), "manifest.json").read_bytes()
    assert b"components" not in os_manifest
    (row,) = snapshot_records(str(tmp_path), verify=False)
    assert row["components"] == {} and row["digest"] == SHA


def test_remote_tier_carries_components(tmp_path: Path) -> None:
    state = make_state()
    ckpt = _checkpointer(tmp_path, state)
    ckpt.step_done(1)
    ckpt.step_done(2)
    ckpt.close()
    local = ckpt.store
    remote = RemoteSnapshotStore(f"file://{tmp_path}/remote")
    remote.upload(local, 2)
    (row,) = remote_snapshot_records(remote, verify=True)
    assert row["tier"] == "remote" and row["valid"] is True
    assert row["components"] == ckpt.last_components != {}
    # Byte for byte the local manifest.
    assert (tmp_path / "remote/snapshots/step-000000000002/manifest.json").read_bytes() == Path(
        local.path(2), "manifest.json").read_bytes()



def test_training_state_per_rank_objects_are_components() -> None:
    base = make_state()
    state = TrainingState(model=base.model, optimizer=base.optimizer,
                          per_rank={"prefetch": Counter(1), "cursor": Counter(3)})
    comps = codec.component_digests(state.snapshot_object([state.rank_state_dict()] * 2))
    assert {f"per_rank/{n}/rank{r}" for n in ("prefetch", "cursor") for r in (0, 1)} <= set(comps)
    assert comps["per_rank/prefetch/rank0"] == codec.state_digest(Counter(1).state_dict())
