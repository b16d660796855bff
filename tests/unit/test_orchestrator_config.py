"""LaunchConfig validation, TOML config files and settings from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import (
    DEFAULT_KEEP_LOCAL,
    LaunchConfig,
    build_config,
    check_launchable,
    load_config_file,
)
from orchestrator.settings import Settings, load_settings

pytestmark = pytest.mark.timeout(10)


def cfg(**kw: Any) -> LaunchConfig:
    base: dict[str, Any] = {"checkpoint_dir": "/ckpt", "script": "train.py"}
    base.update(kw)
    return LaunchConfig(**base)


def test_defaults() -> None:
    c = cfg()
    assert (c.nodes, c.nproc_per_node, c.node_rank, c.max_restarts) == (1, 1, 0, 3)
    assert c.checkpoint_every is None and c.run_id is None
    # Bounded by default: auto intervals snapshot up to once a minute.
    assert c.keep_local == DEFAULT_KEEP_LOCAL == 3 and c.retention_active


@pytest.mark.parametrize("given", ["all", "keep-all"])
def test_keep_local_all_keeps_every_snapshot(given: str) -> None:
    if given == "all":
        c = cfg(keep_local="all")
        assert c.keep_local is None and not c.retention_active
    else:
        with pytest.raises(ValueError, match="--keep-local must be a count >= 1 or all"):
            cfg(keep_local=given)


def test_keep_local_all_from_the_flag_and_a_config_file(tmp_path: Path) -> None:
    from orchestrator.cli import build_parser

    args = build_parser().parse_args(["launch", "--keep-local", "all", "t.py"])
    assert args.keep_local == "all"
    assert build_config({"keep_local": args.keep_local, "checkpoint_dir": "/c", "script": "t.py"}).keep_local is None
    toml = tmp_path / "c.toml"
    toml.write_text('keep-local = "all"\n')
    assert load_config_file(str(toml)) == {"keep_local": "all"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["launch", "--keep-local", "most", "t.py"])


def test_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        LaunchConfig("/ckpt", "train.py")  # type: ignore[call-arg]
    c = cfg()
    with pytest.raises(AttributeError):
        c.nodes = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"nodes": 0}, "--nodes"),
        ({"nproc_per_node": 0}, "--nproc-per-node"),
        ({"nodes": 2}, "--rdzv-endpoint"),
        ({"nodes": 2, "rdzv_endpoint": "host"}, "HOST:PORT"),
        ({"nodes": 2, "rdzv_endpoint": "host:70000"}, "HOST:PORT"),
        ({"node_rank": 1}, "--node-rank"),
        ({"max_restarts": -1}, "--max-restarts"),
        ({"checkpoint_every": -5}, "--checkpoint-every"),
        ({"keep_local": 0}, "--keep-local"),
        ({"keep_every": 0}, "--keep-every"),
        ({"keep_best": 2, "best_metric": "val_acc"}, "--best-metric"),
        ({"best_mode": "max"}, "--best-mode"),
        ({"grace": -1.0}, "--grace"),
        ({"hang_timeout": 0.0}, "--hang-timeout"),
        ({"run_id": "bad id/../x"}, "--run-id"),
        ({"script": ""}, "SCRIPT"),
    ],
)
def test_invalid_values_name_the_flag(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("-", r"\-").replace("+", r"\+")):
        cfg(**kw)


def test_multi_node_fields_are_kept() -> None:
    c = cfg(nodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500")
    assert (c.nodes, c.node_rank, c.rdzv_endpoint) == (2, 1, "10.0.0.1:29500")


def test_toml_defaults_are_overridden_by_flags(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text(
        'checkpoint-dir = "ck"\nmax_restarts = 7\nnproc-per-node = 2\ngrace = 5\n'
        'keep-local = 3\nscript = "train.py"\nscript-args = ["--lr", "0.1"]\n'
        "allow-config-change = true\n"
    )
    values = load_config_file(str(f))
    assert values["checkpoint_dir"] == str(tmp_path / "ck")  # relative to the file
    c = build_config({"max_restarts": 1, "nproc_per_node": None}, values)
    assert c.max_restarts == 1
    assert c.nproc_per_node == 2
    assert c.grace == 5
    assert c.keep_local == 3
    assert c.script_args == ("--lr", "0.1")
    assert c.allow_config_change is True


def test_toml_unknown_key_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text("max-restart = 3\n")
    with pytest.raises(ValueError, match="unknown key 'max-restart'"):
        load_config_file(str(f))


@pytest.mark.parametrize(
    "body",
    ['max-restarts = "3"', "max-restarts = true", "grace = \"x\"", 'script-args = [1, 2]',
     "nodes = 1.5"],
)
def test_toml_wrong_types_are_errors(tmp_path: Path, body: str) -> None:
    f = tmp_path / "run.toml"
    f.write_text(body + "\n")
    with pytest.raises(ValueError):
        load_config_file(str(f))


def test_toml_same_key_twice_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text("max-restarts = 1\nmax_restarts = 2\n")
    with pytest.raises(ValueError, match="twice"):
        load_config_file(str(f))


def test_toml_broken_or_missing(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text("max-restarts = = 1\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config_file(str(f))
    with pytest.raises(ValueError, match="does not exist"):
        load_config_file(str(tmp_path / "nope.toml"))


def test_build_config_requires_dir_and_script() -> None:
    with pytest.raises(ValueError, match="--checkpoint-dir is required"):
        build_config({"script": "x.py"})
    with pytest.raises(ValueError, match="SCRIPT is required"):
        build_config({"checkpoint_dir": "/ck"})


def test_check_launchable(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    with pytest.raises(ValueError, match="does not exist"):
        check_launchable(cfg(script=str(script), checkpoint_dir=str(tmp_path / "ck")))
    script.write_text("pass\n")
    check_launchable(cfg(script=str(script), checkpoint_dir=str(tmp_path / "ck")))
    assert (tmp_path / "ck" / "run").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        check_launchable(cfg(script=str(script), checkpoint_dir=str(blocker)))
    with pytest.raises(ValueError, match="cannot be created"):
        check_launchable(cfg(script=str(script), checkpoint_dir=str(blocker / "sub")))


def test_settings_from_env() -> None:
    s = load_settings({"ORCH_RESTART_BACKOFF_INITIAL_S": "0.01", "ORCH_RESTART_BACKOFF_MAX_S": "0.02",
                       "ORCH_CRASH_LOOP_ATTEMPTS": "5", "ORCH_LOG_FORMAT": "json"})
    assert (s.backoff_initial_s, s.backoff_max_s, s.crash_loop_attempts) == (0.01, 0.02, 5)
    assert s.worker_log_format() == "json"
    assert load_settings({}) == Settings()


@pytest.mark.parametrize(
    "env",
    [{"ORCH_POLL_INTERVAL_S": "fast"}, {"ORCH_POLL_INTERVAL_S": "0"},
     {"ORCH_CRASH_LOOP_ATTEMPTS": "1.5"}, {"ORCH_LOG_FORMAT": "xml"},
     {"ORCH_RESTART_BACKOFF_INITIAL_S": "5", "ORCH_RESTART_BACKOFF_MAX_S": "1"}],
)
def test_bad_settings_name_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="ORCH_"):
        load_settings(env)


def test_observability_from_a_config_file_and_its_validation(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('notify = ["json://127.0.0.1:9/hook", "slack://T/B/C"]\n'
                    'notify-on = "failure,gave_up"\nmetrics-port = 0\nmetrics-file = "m.prom"\n')
    c = build_config({"checkpoint_dir": "/c", "script": "t.py"}, load_config_file(str(toml)))
    assert c.notify == ("json://127.0.0.1:9/hook", "slack://T/B/C")
    assert c.notify_on == ("failure", "gave_up") and c.metrics_port == 0
    assert "slack://" not in repr(c)  # URLs carry credentials: never in a repr or a log
    with pytest.raises(ValueError, match="--notify-on: unknown sometimes"):
        cfg(notify_on="failure,sometimes")
    with pytest.raises(ValueError, match="--metrics-port"):
        cfg(metrics_port=70000)
    with pytest.raises(ValueError, match="--notify takes"):
        cfg(notify=("",))


@pytest.mark.parametrize(
    ("given", "nodes", "low", "nnodes", "may_change"),
    [(2, 2, None, "2", False), ("3", 3, None, "3", False), ("1:4", 4, 1, "1:4", True),
     ("2:2", 2, 2, "2", False)],
)
def test_nodes_range(given: Any, nodes: int, low: int | None, nnodes: str, may_change: bool) -> None:
    c = cfg(nodes=given, rdzv_endpoint="h:1")
    assert (c.nodes, c.min_nodes, c.nnodes, c.world_size_may_change) == (nodes, low, nnodes, may_change)
    assert cfg(allow_world_size_change=True).world_size_may_change


@pytest.mark.parametrize("bad", ["0:2", "3:2", "a:b", "1:", ":2", "1:2:3", 2.5, True])
def test_bad_nodes_range_names_the_flag(bad: Any) -> None:
    with pytest.raises(ValueError, match="--nodes"):
        cfg(nodes=bad, rdzv_endpoint="h:1")


def test_world_size_flags_from_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('nodes = "1:2"\nnode-copies = false\nrdzv-endpoint = "h:1"\n')
    c = build_config({"checkpoint_dir": "/c", "script": "t.py"}, load_config_file(str(path)))
    assert (c.nodes, c.min_nodes, c.node_copies, c.world_size_may_change) == (2, 1, False, True)
