"""TrainingState pieces: scheduler chains, scaler, EMA and RNGs survive the codec bit-exactly."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from trainer import codec
from trainer.errors import StateMismatch
from trainer.state import TrainingState, capture_rng, restore_rng, unwrap_model


def through_codec(obj: Any) -> Any:
    tree, arena, _ = codec.encode_to_bytes(obj)
    back, _ = codec.decode(tree, bytearray(arena))
    return back


def make(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt,
        [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5),
         torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)],
        milestones=[5],
    )
    return model, opt, sched


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, i: int) -> float:
    g = torch.Generator().manual_seed(i)
    loss = model(torch.randn(8, 4, generator=g)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return float(opt.param_groups[0]["lr"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cut", [2, 5, 6, 13])
def test_warmup_cosine_chain_round_trips_exactly(cut: int) -> None:
    m1, o1, s1 = make()
    golden = [train_step(m1, o1, s1, i) for i in range(25)]
    m2, o2, s2 = make()
    for i in range(cut):
        train_step(m2, o2, s2, i)
    saved = through_codec({"m": m2.state_dict(), "o": o2.state_dict(), "s": s2.state_dict()})
    m3, o3, s3 = make(seed=99)
    m3.load_state_dict(saved["m"])
    o3.load_state_dict(saved["o"])
    s3.load_state_dict(saved["s"])
    resumed = [train_step(m3, o3, s3, i) for i in range(cut, 25)]
    assert resumed == golden[cut:]
    assert codec.state_digest(m3.state_dict()) == codec.state_digest(m1.state_dict())
    assert codec.state_digest(o3.state_dict()) == codec.state_digest(o1.state_dict())


@pytest.mark.timeout(60)
def test_rng_states_round_trip() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in the legacy state
    saved = through_codec(capture_rng())
    expected = (random.random(), np.random.standard_normal(), float(torch.rand(())))
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    restore_rng(saved)
    assert (random.random(), np.random.standard_normal(), float(torch.rand(()))) == expected


@pytest.mark.timeout(60)
def test_shared_state_with_scaler_ema_and_extras_round_trips() -> None:
    model, opt, sched = make()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)  # type: ignore[no-untyped-call]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def state_dict(self) -> dict[str, Any]:
            return {"n": self.n}

        def load_state_dict(self, sd: dict[str, Any]) -> None:
            self.n = sd["n"]

    counter = Counter()
    state = TrainingState(model=model, optimizer=opt, scheduler=sched, scaler=scaler, ema=ema,
                          extras={"c": counter})
    for i in range(3):
        train_step(model, opt, sched, i)
        ema.update_parameters(model)
    counter.n, state.step, state.best_metric = 4, 3, 0.5
    saved = through_codec(state.shared_state_dict())
    m2, o2, s2 = make(seed=5)
    e2 = AveragedModel(m2, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)  # type: ignore[no-untyped-call]
    c2 = Counter()
    state2 = TrainingState(model=m2, optimizer=o2, scheduler=s2,
                           scaler=torch.amp.GradScaler("cpu"), ema=e2, extras={"c": c2})
    state2.load_shared_state_dict(saved)
    assert codec.state_digest(state2.shared_state_dict()) == codec.state_digest(state.shared_state_dict())
    assert c2.n == 4 and state2.step == 3 and state2.best_metric == 0.5
    state3 = TrainingState(model=m2, optimizer=o2, scheduler=s2)
    with pytest.raises(StateMismatch) as info:
        state3.load_shared_state_dict(saved)
    assert info.value.fatal


@pytest.mark.timeout(30)
def test_unwrap_model_strips_wrappers() -> None:
    inner = torch.nn.Linear(2, 2)
    assert unwrap_model(torch.nn.DataParallel(inner)) is inner
    assert unwrap_model(inner) is inner
