"""The ORCH_* registry: one row per variable, one parser, every row in effect, README generated."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from contract import settings as registry
from contract.env import WorkerEnv
from contract.settings import BY_NAME, REGISTRY, Var, bound_variables, load
from orchestrator.settings import Settings, load_settings
from storage.settings import StorageSettings
from trainer.settings import WorkerSettings

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("contract", "orchestrator", "trainer", "storage")
#: The modules allowed to read the process environment (the settings classes' loaders).
ENV_READERS = {"contract/settings.py", "contract/env.py", "orchestrator/settings.py",
               "trainer/settings.py"}


def _sources(*packages: str) -> dict[str, str]:
    return {
        str(p.relative_to(ROOT)): p.read_text()
        for pkg in packages
        for p in sorted((ROOT / pkg).rglob("*.py"))
    }


def test_every_variable_has_one_row_and_is_read_by_a_settings_class() -> None:
    names = [v.name for v in REGISTRY]
    assert len(names) == len(set(names))
    assert bound_variables(Settings, StorageSettings, WorkerSettings, WorkerEnv) | {
        "ORCH_RESUME_STEP"  # parsed by WorkerEnv.from_env itself ("none" or a step)
    } == set(names)


def test_every_orch_variable_named_anywhere_is_in_the_registry() -> None:
    texts = _sources(*PRODUCT, "bench", "examples", "tests")
    texts["README.md"] = (ROOT / "README.md").read_text()
    texts["docs/INTERNALS.md"] = (ROOT / "docs" / "INTERNALS.md").read_text()
    unknown = {
        (path, name)
        for path, text in texts.items()
        for name in re.findall(r"\bORCH_[A-Z0-9_]*[A-Z0-9]\b", text)
        if name not in BY_NAME
    }
    assert not unknown


def test_no_variable_name_is_spelled_outside_the_settings_modules() -> None:
    """Other code refers to variables through the settings classes, never by a literal."""
    settings_modules = ENV_READERS | {"storage/settings.py"}
    offenders = []
    for path, text in _sources(*PRODUCT).items():
        if path in settings_modules:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(
                r"ORCH_[A-Z0-9_]+", node.value
            ):
                offenders.append((path, node.value))
    assert not offenders


def test_only_the_settings_modules_read_the_environment() -> None:
    offenders = [
        path
        for path, text in _sources(*PRODUCT).items()
        if re.search(r"os\.environ\b|os\.getenv\b", text) and path not in ENV_READERS
    ]
    assert not offenders


@pytest.mark.parametrize(
    ("raw", "value"),
    [("1", True), ("true", True), ("YES", True), ("on", True),
     ("0", False), ("False", False), ("no", False), ("off", False)],
)
def test_one_boolean_rule(raw: str, value: bool) -> None:
    for var in REGISTRY:
        if var.kind == "bool":
            assert var.parse(raw) is value


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("ORCH_STORAGE_DIRECT_IO", "perhaps", "ORCH_STORAGE_DIRECT_IO must be 0 or 1"),
        ("ORCH_REMOTE_CONCURRENCY", "8.5", "ORCH_REMOTE_CONCURRENCY must be an integer"),
        ("ORCH_POLL_INTERVAL_S", "fast", "ORCH_POLL_INTERVAL_S must be a number"),
    ],
)
def test_bad_values_name_the_variable(name: str, raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BY_NAME[name].parse(raw)


def test_blank_is_unset_and_values_reach_each_class() -> None:
    env = {
        "ORCH_POLL_INTERVAL_S": "0.05",
        "ORCH_CRASH_LOOP_ATTEMPTS": " 7 ",
        "ORCH_STORAGE_DIRECT_IO": "off",
        "ORCH_REMOTE_PART_SIZE": "1048576",
        "ORCH_HEARTBEAT_INTERVAL_S": "0",
        "ORCH_SNAPSHOT_STAGING": "sync",
        "ORCH_LOG_FORMAT": "",
    }
    s = load_settings(env)
    assert (s.poll_interval_s, s.crash_loop_attempts, s.log_format) == (0.05, 7, None)
    st = StorageSettings.from_env(env)
    assert (st.direct_io, st.remote_part_size) == (False, 1048576)
    w = WorkerSettings.from_env(env)
    assert (w.heartbeat_interval_s, w.snapshot_staging) == (0.0, "sync")
    assert load(Settings, {}) == Settings() and StorageSettings.from_env({}) == StorageSettings()


def test_defaults_come_from_the_registry() -> None:
    for cls in (Settings, StorageSettings, WorkerSettings, WorkerEnv):
        for f in cls.__dataclass_fields__.values():
            if "env" in f.metadata:
                assert f.default == BY_NAME[f.metadata["env"]].default, (cls, f.name)


@pytest.mark.parametrize("var", REGISTRY, ids=lambda v: v.name)
def test_defaults_format_and_parse_back(var: Var) -> None:
    if var.default is not None:
        assert var.parse(var.format(var.default)) == var.default
    assert var.doc.strip().endswith(".")


def test_readme_tables_are_generated_from_the_registry() -> None:
    text = (ROOT / "README.md").read_text()
    assert registry.render_readme(text) == text, (
        "README tables are stale: run `python -m contract.settings --write README.md`"
    )
    for var in REGISTRY:
        assert f"`{var.name}`" in text
