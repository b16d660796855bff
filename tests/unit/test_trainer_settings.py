"""WorkerSettings.from_env: defaults, every ORCH_* variable, and refusal of bad values."""

from __future__ import annotations

import pytest

from contract.interval import Interval
from trainer.settings import WorkerSettings


@pytest.mark.timeout(30)
def test_defaults_without_any_variable() -> None:
    s = WorkerSettings.from_env({})
    assert (s.rank, s.world_size, s.local_rank, s.attempt) == (0, 1, 0, 0)
    assert s.resume_mode == "auto" and s.resume_step is None
    assert s.pg_timeout_s == 60.0 and not s.launched_by_torchrun
    assert s.checkpoint_dir is None and s.checkpoint_every is None


@pytest.mark.timeout(30)
def test_all_variables() -> None:
    s = WorkerSettings.from_env({
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x", "ORCH_CHECKPOINT_DIR": "/ckpt",
        "ORCH_RUN_ID": "r1", "ORCH_ATTEMPT": "3", "ORCH_NODE_RANK": "0",
        "ORCH_CHECKPOINT_EVERY": "0", "ORCH_RESUME_STEP": "25", "ORCH_ALLOW_CONFIG_CHANGE": "1",
        "ORCH_FAULTS": "step_end@3", "ORCH_PG_TIMEOUT_S": "12.5", "ORCH_LOG_FORMAT": "json",
    })
    assert s.rank == 1 and s.world_size == 2 and s.launched_by_torchrun
    assert s.resume_mode == "step" and s.resume_step == 25
    assert s.allow_config_change and s.checkpoint_every == Interval("steps", 0)
    assert s.pg_timeout_s == 12.5
    assert WorkerSettings.from_env({"ORCH_RESUME_STEP": "none"}).resume_mode == "fresh"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("env", [
    {"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "0"}, {"RANK": "x"},
    {"ORCH_ATTEMPT": "-1"}, {"ORCH_CHECKPOINT_EVERY": "-5"}, {"ORCH_RESUME_STEP": "soon"},
    {"ORCH_PG_TIMEOUT_S": "0"}, {"ORCH_PG_TIMEOUT_S": "fast"}, {"ORCH_LOG_FORMAT": "xml"},
    {"ORCH_ALLOW_CONFIG_CHANGE": "maybe"}, {"MASTER_PORT": "70000"},
])
def test_bad_values_raise_value_error_with_the_name(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        WorkerSettings.from_env(env)


@pytest.mark.timeout(30)
def test_direct_construction_is_validated_and_keyword_only() -> None:
    with pytest.raises(ValueError):
        WorkerSettings(resume_mode="step")
    with pytest.raises(TypeError):
        WorkerSettings(0)  # type: ignore[call-arg]
