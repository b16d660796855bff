"""Per-rank state (``TrainingState(per_rank=...)``): saved for every rank, restored on the same
rank, part of the digest, and a different set of names refuses the resume.

The two-rank test runs real gloo processes (``torch.multiprocessing.spawn``): each rank keeps a
different prefetched batch and cursor, snapshots, and a fresh group resumes and gets its own back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import spawn

from trainer import codec
from trainer.checkpoint import Checkpointer
from trainer.errors import StateMismatch
from trainer.settings import WorkerSettings
from trainer.state import TrainingState


class Prefetch:
    """A prefetched batch and a cursor: what nanoGPT keeps across the step boundary."""

    def __init__(self, rank: int = 0) -> None:
        self.cursor = rank * 100
        self.batch = torch.arange(4, dtype=torch.float32) + rank

    def advance(self) -> None:
        self.cursor += 1
        self.batch = self.batch * 2 + 1

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "batch": self.batch}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.cursor = int(sd["cursor"])
        self.batch = sd["batch"].clone()


def _state(per_rank: dict[str, Any] | None = None) -> TrainingState:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    return TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         per_rank=per_rank)


def test_per_rank_state_round_trips_and_is_restored() -> None:
    saved = Prefetch(rank=1)
    saved.advance()
    state = _state({"prefetch": saved})
    rank_state = state.rank_state_dict()
    assert rank_state["per_rank"]["prefetch"]["cursor"] == 101
    fresh = Prefetch()
    _state({"prefetch": fresh}).load_rank_state_dict(rank_state)
    assert fresh.cursor == 101 and torch.equal(fresh.batch, saved.batch)


def test_per_rank_state_is_part_of_the_digest() -> None:
    prefetch = Prefetch()
    state = _state({"prefetch": prefetch})
    before = codec.state_digest(state.snapshot_object([state.rank_state_dict()]))
    prefetch.advance()
    assert codec.state_digest(state.snapshot_object([state.rank_state_dict()])) != before


def test_without_per_rank_objects_the_rank_state_is_unchanged() -> None:
    # Snapshots (and digests) of scripts that register none are what they were before.
    assert set(_state().rank_state_dict()) == {"step", "rng", "loader"}


@pytest.mark.parametrize(("saved", "registered"), [({"a"}, {"b"}), ({"a"}, set()), (set(), {"a"}),
                                                   ({"a", "b"}, {"a"})])
def test_different_per_rank_names_are_a_state_mismatch(saved: set[str], registered: set[str]) -> None:
    rank_state = _state({n: Prefetch() for n in saved}).rank_state_dict()
    with pytest.raises(StateMismatch, match="per_rank"):
        _state({n: Prefetch() for n in registered}).load_rank_state_dict(rank_state)


def test_per_rank_objects_must_be_stateful() -> None:
    with pytest.raises(TypeError, match="per_rank 'x'"):
        _state({"x": object()})


# -- two real ranks ---------------------------------------------------------------------------


def _rank_main(rank: int, world_size: int, directory: str, init_file: str, phase: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        prefetch = Prefetch(rank)
        state = _state({"prefetch": prefetch})
        settings = WorkerSettings(checkpoint_dir=directory, rank=rank, local_rank=rank,
                                  world_size=world_size,
                                  resume_mode="fresh" if phase == "save" else "auto")
        ckpt = Checkpointer(state, hparams={}, every=3, settings=settings)
        start = ckpt.resume()
        if phase == "save":
            assert start == 0
            for step in range(1, 4):
                prefetch.advance()
                ckpt.step_done(step)
            ckpt.wait()
            expected = {"cursor": prefetch.cursor, "batch": prefetch.batch.tolist()}
            with open(os.path.join(directory, f"expected-{rank}.json"), "w") as f:
                json.dump(expected, f)
        else:
            assert start == 3
            with open(os.path.join(directory, f"restored-{rank}.json"), "w") as f:
                json.dump({"cursor": prefetch.cursor, "batch": prefetch.batch.tolist()}, f)
        ckpt.close()
        dist.barrier()  # rank 0 may still be writing: tear the group down together
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, phase: str) -> None:
    init_file = tmp_path / f"init-{phase}"
    spawn(_rank_main, args=(2, str(tmp_path), str(init_file), phase), nprocs=2, join=True)  # type: ignore[no-untyped-call]


@pytest.mark.timeout(300)
def test_two_ranks_each_get_their_own_state_back(tmp_path: Path) -> None:
    _spawn(tmp_path, "save")
    tree = json.loads((tmp_path / "snapshots" / f"step-{3:012d}" / "tree.json").read_text())
    assert "per_rank" in json.dumps(tree)
    _spawn(tmp_path, "resume")
    expected = [json.loads((tmp_path / f"expected-{r}.json").read_text()) for r in range(2)]
    restored = [json.loads((tmp_path / f"restored-{r}.json").read_text()) for r in range(2)]
    assert expected[0] != expected[1]  # the ranks really held different state
    assert restored == expected
