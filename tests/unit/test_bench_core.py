"""The benchmark harness's arithmetic: statistics, targets, sizes, digests and the report."""

from __future__ import annotations

import math

import pytest
import torch

from bench import core, report


def test_stat_median_and_spread() -> None:
    s = core.Stat(unit="s", samples=(3.0, 1.0, 2.0, 10.0))
    assert s.median == 2.5
    assert s.spread == (1.0, 10.0)
    assert s.to_json()["n"] == 4
    with pytest.raises(ValueError, match="at least one"):
        core.Stat(unit="s", samples=())
    with pytest.raises(ValueError, match="non-finite"):
        core.Stat(unit="s", samples=(math.nan,))


@pytest.mark.parametrize(
    ("value", "op", "bound", "met"),
    [(0.5, "<=", 0.5, True), (0.51, "<=", 0.5, False), (1.2, ">=", 1.2, True),
     (1.1, ">=", 1.2, False), (math.inf, "<=", 1.0, False), (math.inf, ">=", 1.0, False)],
)
def test_target_met(value: float, op: str, bound: float, met: bool) -> None:
    t = core.Target(name="t", value=value, bound=bound, op=op, meaning="m")  # type: ignore[arg-type]
    assert t.met is met
    assert t.to_json()["met"] is met


def test_ratio_by_zero_is_never_met() -> None:
    assert core.ratio(1.0, 0.0) == math.inf
    assert not core.Target(name="t", value=core.ratio(1.0, 0.0), bound=10, op="<=", meaning="").met


@pytest.mark.parametrize(("text", "n"), [("100M", 100_000_000), ("1G", 10**9), ("4g", 4 * 10**9),
                                          ("512K", 512_000), ("2.5M", 2_500_000), ("123", 123)])
def test_parse_size(text: str, n: int) -> None:
    assert core.parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "G", "-1M", "0", "lots"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        core.parse_size(bad)


def test_gate_records_a_mismatch_and_fails_the_leg() -> None:
    leg = core.LegResult(leg="x", size="1M", size_bytes=1)
    leg.targets.append(core.Target(name="t", value=1, bound=2, op="<=", meaning="m"))
    leg.gate("a", "a", "first")
    assert leg.to_json()["met"] is True
    leg.gate("a", "b", "second")
    doc = leg.to_json()
    assert doc["correctness"] == {"checked": 2, "ok": False}
    assert doc["met"] is False  # a target met on a wrong snapshot is not met
    assert "CORRECTNESS" in doc["notes"][0]


def test_tensor_digest_sees_values_names_and_dtypes() -> None:
    a = {"model": {"w": torch.ones(3)}, "optim": {"state": {0: {"m": torch.zeros(2)}}}}
    same = {"model": {"w": torch.ones(3)}, "optim": {"state": {0: {"m": torch.zeros(2)}}}}
    assert core.tensor_digest(a) == core.tensor_digest(same)
    changed = {"model": {"w": torch.tensor([1.0, 1.0, 1.0 + 1e-7])}, "optim": same["optim"]}
    renamed = {"model": {"v": torch.ones(3)}, "optim": same["optim"]}
    retyped = {"model": {"w": torch.ones(3, dtype=torch.float64)}, "optim": same["optim"]}
    for other in (changed, renamed, retyped):
        assert core.tensor_digest(other) != core.tensor_digest(a)


def test_model_size_is_close_to_the_request() -> None:
    model = core.make_model(20_000_000, width=256)
    opt = core.make_optimizer(model)
    core.train_step(model, opt)
    assert 0.8 * 20_000_000 <= core.state_bytes(model, opt) <= 1.2 * 20_000_000


def test_markdown_lists_every_target_and_value() -> None:
    leg = core.LegResult(leg="stall", size="100M", size_bytes=10**8)
    leg.values["ours_s"] = core.Stat(unit="s", samples=(0.01, 0.02))
    leg.targets.append(core.Target(name="a", value=0.2, bound=1.25, op="<=", meaning="stall / memcpy"))
    leg.targets.append(core.Target(name="b", value=0.9, bound=0.5, op="<=", meaning="stall / dcp"))
    doc = {"command": "python -m bench --quick", "date": "d", "device": "cpu", "repeats": 3,
           "machine": core.machine(), "legs": [leg.to_json()]}
    text = report.markdown(doc)
    assert "| stall | 100M | stall / memcpy | 0.200 | <= 1.25 | yes |" in text
    assert "| stall | 100M | stall / dcp | 0.900 | <= 0.500 | **no** |" in text
    assert "ours_s: 0.015 [0.010-0.020] s" in text
    assert "python -m bench --quick" in text
