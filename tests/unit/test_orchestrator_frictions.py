"""Frictions found by porting a third-party script: install line, start-up errors, re-launching
a finished run, terminal output, ``launch --help``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import tomllib

from contract.paths import RunPaths
from orchestrator.failures import diagnose, printed_startup_error
from orchestrator.policy import AttemptResult, is_fatal

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_readme_installs_the_examples_extra_wherever_it_runs_an_example() -> None:
    readme = (REPO / "README.md").read_text()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    # The examples need scikit-learn, which only the examples (and dev) extras install.
    assert any(req.startswith("scikit-learn") for req in extras["examples"])
    assert not any(
        req.startswith("scikit-learn")
        for req in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    )
    runs_example = [b for b in _bash_blocks(readme) if re.search(r"\bexamples/\S+\.py", b)]
    assert runs_example, "the README no longer shows how to run an example"
    for block in runs_example:
        installs = re.findall(r"pip install (.*)", block)
        assert installs, f"a block runs an example without its install line:\n{block}"
        for line in installs:
            assert re.search(r"-e\s+'\.\[(examples|dev)\]'", line), line
    # A bare `pip install -e .` is never offered where it would miss scikit-learn.
    assert not re.search(r"pip install -e \.(\s|$)", readme)


# -- 2. import and syntax errors at start-up ------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"


def _paths(tmp_path: Path, log_fixture: str | None = None) -> RunPaths:
    paths = RunPaths.of(str(tmp_path))
    os.makedirs(paths.logs_dir, exist_ok=True)
    if log_fixture is not None:
        Path(paths.attempt_log(0)).write_text((FIXTURES / log_fixture).read_text())
    return paths


def test_a_module_missing_before_the_trainer_is_named_from_the_log(tmp_path: Path) -> None:
    # Real output: two ranks' tracebacks interleaved mid-line, no error file.
    paths = _paths(tmp_path, "orchestrator_torchrun_import_error.txt")
    failure = diagnose(paths, 0, 1)
    assert failure.summary == (
        "rank 0 exited with code 1: ModuleNotFoundError: No module named 'nonexistent_mod_xyz'"
    )
    assert failure.error_type == "ModuleNotFoundError" and failure.startup_error
    assert not failure.fatal  # the policy decides, knowing the attempt's progress
    assert is_fatal(AttemptResult(exit_code=1, progressed=False, failure=failure))
    assert not is_fatal(AttemptResult(exit_code=1, progressed=True, failure=failure))


def test_a_syntax_error_in_the_script_is_named_from_the_log(tmp_path: Path) -> None:
    paths = _paths(tmp_path, "orchestrator_torchrun_syntax_error.txt")
    failure = diagnose(paths, 0, 1)
    assert failure.summary == "rank 0 exited with code 1: SyntaxError: invalid syntax"
    assert failure.error_type == "SyntaxError" and failure.startup_error


def test_an_import_error_inside_trainer_run_is_named_by_its_error_file(tmp_path: Path) -> None:
    paths = _paths(tmp_path, "orchestrator_torchrun_exception.txt")
    d = paths.errors_dir(0)
    os.makedirs(d)
    Path(d, "rank-0.json").write_text(json.dumps({
        "rank": 0, "attempt": 0, "time": 1.0, "type": "ModuleNotFoundError",
        "message": "No module named 'sklearn'", "traceback": "", "fatal": False}))
    failure = diagnose(paths, 0, 1)
    assert failure.summary == "rank 0: ModuleNotFoundError: No module named 'sklearn'"
    assert failure.startup_error and failure.source == "error_file"


def test_other_errors_are_no_start_up_errors(tmp_path: Path) -> None:
    paths = _paths(tmp_path, "orchestrator_torchrun_exception.txt")
    failure = diagnose(paths, 0, 1)
    assert failure.error_type is None and not failure.startup_error
    text = (FIXTURES / "orchestrator_torchrun_import_error.txt").read_text()
    # The same log with a signal death (not an uncaught exception): not a start-up error.
    Path(paths.attempt_log(1)).write_text(
        text.replace("exitcode  : 1 (pid", "exitcode  : -9 (pid"))
    assert not diagnose(paths, 1, 1).startup_error


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[rank0]: ImportError: cannot import name 'x' from 'y'\n",
         ("ImportError", "ImportError: cannot import name 'x' from 'y'")),
        ("    x = 1\nIndentationError: unexpected indent\n",
         ("IndentationError", "IndentationError: unexpected indent")),
        ("WARNING: ImportError: optional extension missing\n", None),  # not a traceback's end
        ("ImportErrorHandler started\n", None),
        ("", None),
    ],
)
def test_printed_startup_error(text: str, expected: tuple[str, str] | None) -> None:
    assert printed_startup_error(text) == expected
