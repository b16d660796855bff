"""Frictions found by porting a third-party script: install line, start-up errors, re-launching
a finished run, terminal output, ``launch --help``."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from contract.paths import RunPaths
from orchestrator.cli import build_parser
from orchestrator.config import LaunchConfig
from orchestrator.failures import diagnose, printed_startup_error
from orchestrator.launcher import EchoFilter, ProgressLine, TerminalStatus, total_steps_hint
from orchestrator.policy import AttemptResult, is_fatal
from orchestrator.runstate import RunState

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
        # Two ranks' last lines interleaved character-wise (seen in CI): the type doubled.
        ("ImportErrorImportError: : cannot import name 'x' from 'os' (os.py)cannot import name "
         "'x' from 'os' (os.py)\n",
         ("ImportError", "ImportError: cannot import name 'x' from 'os' (os.py)cannot import name "
          "'x' from 'os' (os.py)")),
        ("SyntaxError\n", ("SyntaxError", "SyntaxError")),
        ("", None),
    ],
)
def test_printed_startup_error(text: str, expected: tuple[str, str] | None) -> None:
    assert printed_startup_error(text) == expected


# -- 4. torchrun's tracebacks stay in the attempt log ---------------------------------------


def _filtered(data: bytes, chunk: int = 37) -> tuple[str, EchoFilter]:
    out = io.BytesIO()
    echo = EchoFilter(out, log_path="/ck/run/logs/attempt-3.log")
    for i in range(0, len(data), chunk):  # lines split across writes, as the pipe delivers
        echo.write(data[i : i + chunk])
    echo.close()
    return out.getvalue().decode(), echo


NOTE = ("orchestrator: torchrun's tracebacks and failure summary are kept out of the terminal: "
        "see /ck/run/logs/attempt-3.log\n")


@pytest.mark.parametrize(
    "fixture",
    ["orchestrator_torchrun_exception.txt", "orchestrator_torchrun_sigkill.txt",
     "orchestrator_torchrun_import_error.txt", "orchestrator_torchrun_syntax_error.txt"],
)
def test_real_torchrun_failures_reach_the_terminal_as_one_line(fixture: str) -> None:
    data = (FIXTURES / fixture).read_bytes()
    text, echo = _filtered(data)
    for noise in ("Traceback", "Root Cause", "FAILED", "====", "File \"", "exitcode  :",
                  "Error:", "^^^"):
        assert noise not in text, (noise, text)
    assert text.count(NOTE) == 1
    # What is left: the note and torchrun's one-line warnings ("Sending process ... SIGTERM").
    assert len(text.splitlines()) <= 4 and echo.hidden_lines >= 30


def test_ordinary_lines_pass_and_every_traceback_shape_is_held_back() -> None:
    data = b"".join([
        b"rank 0 step 10 loss 0.5\n",
        b"[rank1]: Traceback (most recent call last):\n",
        b'[rank1]:   File "x.py", line 3, in <module>\n',
        b"[rank1]:     main()\n",
        b"[rank1]: KeyError: 'a'\n",
        b"\n",
        b"During handling of the above exception, another exception occurred:\n",
        b"\n",
        b"Traceback (most recent call last):\n",
        b'  File "y.py", line 1, in f\n',
        b"torch.distributed.elastic.multiprocessing.api.SignalException: Process 7 got signal: 2\n",
        b"rank 0 step 11 loss 0.4\n",
        b"=" * 60 + b"\n",
        b"not a summary\n",
        b"an unterminated last line",
    ])
    text, _ = _filtered(data, chunk=5)
    assert text == ("rank 0 step 10 loss 0.5\n" + NOTE + "rank 0 step 11 loss 0.4\n"
                    + "=" * 60 + "\nnot a summary\nan unterminated last line\n")


def test_another_ranks_line_inside_a_traceback_is_echoed_and_the_traceback_still_held() -> None:
    # The attempt log of a CI failure: rank 1's print landed between rank 0's frame line and
    # its source line; the rest of the traceback used to reach the terminal.
    data = b"".join([
        b"rank 0 attempt 1 args=['always']\n",
        b"Traceback (most recent call last):\n",
        b'  File "/tmp/worker.py", line 17, in <module>\n',
        b"rank 1 attempt 1 args=['always']\n",
        b'    raise RuntimeError("this script always fails")\n',
        b"RuntimeError: this script always fails\n",
        b"Epoch 3 done\n",
    ])
    text, _ = _filtered(data, chunk=7)
    assert text == ("rank 0 attempt 1 args=['always']\n" + NOTE
                    + "rank 1 attempt 1 args=['always']\nEpoch 3 done\n")


@pytest.mark.parametrize("line", [b"KeyboardInterrupt", b"RuntimeError: boom", b"ValueError:",
                                  b"torch.distributed.DistBackendError: NCCL error",
                                  b"ExceptionGroup: 2 errors (2 sub-exceptions)"])
def test_a_tracebacks_last_line_ends_it(line: bytes) -> None:
    data = b'Traceback (most recent call last):\n  File "x.py", line 1, in f\n' + line + b"\nafter\n"
    text, _ = _filtered(data)
    assert text == NOTE + "after\n"


def test_without_anything_to_hide_the_echo_is_unchanged() -> None:
    data = b"".join(f"rank {r} step {s}\n".encode() for s in range(50) for r in range(2))
    text, echo = _filtered(data)
    assert text.encode() == data and echo.hidden_lines == 0


# -- 5. the progress line ------------------------------------------------------------------


def _run_state(**kw: object) -> RunState:
    base: dict[str, object] = {"run_id": "r", "phase": "running", "attempt": 0, "started_at": 0.0,
                               "updated_at": 0.0, "pid": 1}
    base.update(kw)
    return RunState(**base)  # type: ignore[arg-type]


class _Terminal:
    def __init__(self) -> None:
        self.raw = io.BytesIO()
        self.real = io.TextIOWrapper(self.raw, encoding="utf-8", write_through=True)
        self.status = TerminalStatus(self.real)

    def text(self) -> str:
        self.real.flush()
        return self.raw.getvalue().decode()


def test_the_progress_line_shows_step_total_rate_snapshot_restarts_and_phase() -> None:
    term = _Terminal()
    now = [100.0]
    line = ProgressLine(term.status, total=400, clock=lambda: now[0])
    assert line.render(_run_state(), now[0]) == (
        "orchestrator: step -/400 | - steps/s | last snapshot - | restarts 0 | running")
    line.update(_run_state(step=10))
    now[0] += 2.0
    line.update(_run_state(step=20, newest_local_step=20, restarts=1))
    assert term.text().endswith(
        "\r\x1b[Korchestrator: step 20/400 | 5 steps/s | last snapshot 20 | restarts 1 | running")
    # At most once a second (a phase change redraws at once).
    now[0] += 0.5
    line.update(_run_state(step=25, newest_local_step=20, restarts=1))
    assert "step 25" not in term.text()
    line.update(_run_state(step=25, newest_local_step=20, restarts=1, phase="recovering"))
    assert term.text().endswith("step 25/400 | 6 steps/s | last snapshot 20 | restarts 1 | "
                                "recovering")
    # A new attempt starts its own rate; an unknown total is left out.
    fresh = ProgressLine(term.status, clock=lambda: now[0])
    assert fresh.render(_run_state(step=5, attempt=1), now[0]).startswith(
        "orchestrator: step 5 | - steps/s")


def test_other_output_scrolls_above_the_progress_line() -> None:
    term = _Terminal()
    term.status.show("STATUS")
    term.status.stream.write("a structlog line\n")
    term.status.stream.buffer.write(b"rank 0 step 3\n")
    term.status.stream.write("partial")  # print() writes the text, then the newline
    term.status.stream.write("\n")
    assert term.text() == ("\r\x1b[KSTATUS" "\r\x1b[Ka structlog line\nSTATUS"
                           "\r\x1b[Krank 0 step 3\nSTATUS" "\r\x1b[Kpartial\nSTATUS")
    term.status.uninstall()
    assert term.text().endswith("STATUS\n")


@pytest.mark.parametrize(
    ("args", "total"),
    [(["--steps", "400", "--seed", "7"], 400), (["--max-steps=90"], 90), (["--steps"], None),
     (["--seed", "7"], None), (["--steps", "x"], None), (["--num-steps", "0"], None)],
)
def test_total_steps_hint(args: list[str], total: int | None) -> None:
    assert total_steps_hint(args) == total


# -- 6. launch --help states every default ---------------------------------------------------


def _launch_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = sub.choices["launch"]
    return parser


def test_every_launch_option_states_its_default() -> None:
    actions = [a for a in _launch_parser()._actions
               if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]
    assert len(actions) >= 20
    for action in actions:
        # Exactly once: a help that states its default is not given a second one.
        assert action.help and len(re.findall(r"\bdefault\b", action.help)) == 1, action.help


def test_the_stated_defaults_are_launch_configs() -> None:
    helps = {a.dest: a.help or "" for a in _launch_parser()._actions}
    for f in dataclasses.fields(LaunchConfig):
        if f.name not in helps or f.default in (None, (), dataclasses.MISSING):
            continue
        if f.name in ("best_metric", "best_mode"):
            continue
        shown = ("on" if f.default else "off") if isinstance(f.default, bool) else (
            f"{f.default:g}" if isinstance(f.default, float) else str(f.default))
        # "(default: 3)", or a choice marked in place: "warn (default; ...) or fail".
        stated = f"(default: {shown}" in helps[f.name] or f"{shown} (default" in helps[f.name]
        assert stated, (f.name, helps[f.name])


def test_launch_help_output() -> None:
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "launch", "--help"],
                         capture_output=True, text=True, timeout=30, check=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
    text = " ".join(out.stdout.split())
    for expected in ("(default: 3)", "(default: 30)", "(default: none: no heartbeat watchdog)",
                     "(default: off)", "(default: the one in the dir's run/state.json"):
        assert expected in text, expected
    assert "default: None" not in text
