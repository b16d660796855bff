"""The snapshot interval: one parser (flag, TOML key, worker variable, Checkpointer(every=)), the
auto rule as a pure function, and the launch configuration's validation (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from contract.env import WorkerEnv
from contract.interval import (
    AUTO,
    AUTO_MIN_INTERVAL_S,
    FINAL_ONLY,
    Interval,
    auto_interval_s,
    parse_interval,
)
from contract.settings import BY_NAME
from orchestrator.config import LaunchConfig, build_config, load_config_file
from orchestrator.launcher import build_worker_env
from orchestrator.settings import Settings

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("25", Interval("steps", 25), "25"),
        ("0", FINAL_ONLY, "0"),
        (" 7 ", Interval("steps", 7), "7"),
        (25, Interval("steps", 25), "25"),
        (0, FINAL_ONLY, "0"),
        ("90s", Interval("seconds", 90), "90s"),
        ("10m", Interval("seconds", 600), "600s"),
        ("1h", Interval("seconds", 3600), "3600s"),
        ("1.5h", Interval("seconds", 5400), "5400s"),
        ("0.25s", Interval("seconds", 0.25), "0.25s"),
        ("2M", Interval("seconds", 120), "120s"),
        ("auto", AUTO, "auto"),
        ("AUTO", AUTO, "auto"),
    ],
)
def test_good_values_parse_and_round_trip(text: str | int, expected: Interval, canonical: str) -> None:
    got = parse_interval(text)
    assert got == expected and got.kind == expected.kind
    assert str(got) == canonical
    assert parse_interval(str(got)) == got


@pytest.mark.parametrize(
    "text",
    ["", " ", "-1", -1, "1.5", "25 steps", "0s", "0m", "-5s", "10d", "1e3s", "inf",
     "nan", "s", "m10", "auto5", "10ms", True, 2.5],
)
def test_bad_values_are_refused_naming_the_source(text: Any) -> None:
    with pytest.raises(ValueError, match=r"^SOMEWHERE must be a number of steps .* or auto, got"):
        parse_interval(text, name="SOMEWHERE")


def test_interval_properties() -> None:
    assert Interval("steps", 25).steps == 25 and not Interval("steps", 25).time_based
    assert FINAL_ONLY.steps == 0 and not FINAL_ONLY.time_based
    assert Interval("seconds", 90).steps == 0 and Interval("seconds", 90).time_based
    assert AUTO.steps == 0 and AUTO.time_based
    for bad in (("steps", -1), ("steps", 2.5), ("seconds", 0), ("seconds", float("inf")),
                ("auto", 3), ("hours", 1)):
        with pytest.raises(ValueError):
            Interval(*bad)  # type: ignore[arg-type]


# -- the auto rule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stall_s", "cap_s", "expected_s"),
    [
        (None, 1800.0, AUTO_MIN_INTERVAL_S),  # nothing measured yet: the first snapshot
        (0.0, 1800.0, AUTO_MIN_INTERVAL_S),
        (0.05, 1800.0, AUTO_MIN_INTERVAL_S),  # 100 x 50 ms = 5 s: below the floor
        (0.6, 1800.0, 60.0),
        (1.0, 1800.0, 100.0),  # 1% overhead: 100 x the stall
        (2.5, 1800.0, 250.0),
        (17.9, 1800.0, 1790.0),
        (60.0, 1800.0, 1800.0),  # capped by ORCH_MAX_SNAPSHOT_INTERVAL_S
        (1.0, 30.0, 30.0),  # a cap below the floor wins
        (None, 10.0, 10.0),
    ],
)
def test_auto_interval_is_100x_the_stall_within_bounds(
    stall_s: float | None, cap_s: float, expected_s: float
) -> None:
    assert auto_interval_s(stall_s, cap_s) == pytest.approx(expected_s)


def test_auto_interval_keeps_the_overhead_under_one_percent() -> None:
    for stall_ms in range(1, 20000, 37):
        stall = stall_ms / 1000
        interval = auto_interval_s(stall, 1800.0)
        assert stall / interval <= 0.01 + 1e-12 or interval == 1800.0
    with pytest.raises(ValueError):
        auto_interval_s(1.0, 0.0)


def test_max_interval_is_a_registry_row() -> None:
    row = BY_NAME["ORCH_MAX_SNAPSHOT_INTERVAL_S"]
    assert (row.kind, row.default, row.owner, row.set_by) == ("float", 1800.0, "trainer", "user")
    every = BY_NAME["ORCH_CHECKPOINT_EVERY"]
    assert (every.kind, every.default, every.set_by) == ("str", None, "supervisor")


# -- the worker contract ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["25", "0", "90s", "10m", "auto"])
def test_worker_env_carries_every_form(text: str) -> None:
    env = WorkerEnv.from_env({"ORCH_CHECKPOINT_EVERY": text})
    assert env.checkpoint_every == parse_interval(text)
    assert WorkerEnv.from_env(env.to_env()) == env
    assert WorkerEnv.from_env({}).checkpoint_every is None  # unset: script's every=, else auto


@pytest.mark.parametrize("text", ["-5", "soon", "1.5", "0s"])
def test_worker_env_refuses_a_bad_variable(text: str) -> None:
    with pytest.raises(ValueError, match="ORCH_CHECKPOINT_EVERY"):
        WorkerEnv.from_env({"ORCH_CHECKPOINT_EVERY": text})


# -- launch configuration ---------------------------------------------------------------------


def cfg(**kw: Any) -> LaunchConfig:
    return LaunchConfig(**{"checkpoint_dir": "/ckpt", "script": "train.py", **kw})


@pytest.mark.parametrize(
    ("value", "expected"),
    [(25, Interval("steps", 25)), ("25", Interval("steps", 25)), (0, FINAL_ONLY),
     ("10m", Interval("seconds", 600)), ("auto", AUTO), (AUTO, AUTO), (None, None)],
)
def test_config_accepts_every_form(value: Any, expected: Interval | None) -> None:
    assert cfg(checkpoint_every=value).checkpoint_every == expected


@pytest.mark.parametrize("value", [-5, "-5", "often", "1.5", "10d", True, 2.5, "0s"])
def test_config_refuses_bad_values_naming_the_flag(value: Any) -> None:
    with pytest.raises(ValueError, match="--checkpoint-every must be"):
        cfg(checkpoint_every=value)


def test_toml_key_takes_every_form(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('checkpoint-dir = "ck"\nscript = "train.py"\ncheckpoint-every = "90s"\n')
    assert build_config({}, load_config_file(str(f))).checkpoint_every == Interval("seconds", 90)
    f.write_text('checkpoint-dir = "ck"\nscript = "train.py"\ncheckpoint-every = 25\n')
    assert build_config({}, load_config_file(str(f))).checkpoint_every == Interval("steps", 25)
    # The flag wins over the file.
    c = build_config({"checkpoint_every": "auto"}, load_config_file(str(f)))
    assert c.checkpoint_every == AUTO
    f.write_text('checkpoint-dir = "ck"\nscript = "train.py"\ncheckpoint-every = "weekly"\n')
    with pytest.raises(ValueError, match="--checkpoint-every"):
        build_config({}, load_config_file(str(f)))


def test_worker_env_gets_the_flag_only_when_given() -> None:
    def env(c: LaunchConfig) -> dict[str, str]:
        return build_worker_env(base={"ORCH_CHECKPOINT_EVERY": "999"}, config=c, settings=Settings(),
                                run_id="r", attempt=0, resume_step=None, token="t")

    assert "ORCH_CHECKPOINT_EVERY" not in env(cfg())  # absent: the script's every=, else auto
    assert env(cfg(checkpoint_every="10m"))["ORCH_CHECKPOINT_EVERY"] == "600s"
    assert env(cfg(checkpoint_every="auto"))["ORCH_CHECKPOINT_EVERY"] == "auto"
    assert env(cfg(checkpoint_every=0))["ORCH_CHECKPOINT_EVERY"] == "0"


@pytest.mark.parametrize("value", ["-3", "1.5", "10x", "every"])
def test_cli_exits_2_with_a_clear_message(tmp_path: Path, value: str) -> None:
    script = tmp_path / "train.py"
    script.write_text("print('never run')\n")
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "launch", "--checkpoint-dir", str(tmp_path / "ck"),
         f"--checkpoint-every={value}", str(script)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--checkpoint-every must be a number of steps" in proc.stderr
    assert repr(value) in proc.stderr
    assert not (tmp_path / "ck" / "run" / "state.json").exists()
