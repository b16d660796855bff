"""``python -m bench``'s scratch directory: deleted when the run ends, however it ends.

A fake leg (registered for the test) writes into the run's scratch dir and leaves a child
process running, as an interrupted leg would; then it returns, raises, or is interrupted. The
run dir must be gone afterwards (unless ``--keep-scratch``), the child killed first, and a
``--workdir`` given by the user kept with its contents.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import bench.__main__ as cli
from bench import core, legs, scratch

ROOT = Path(__file__).resolve().parents[2]


class FakeLeg:
    """Writes a file into the scratch dir, starts a child that outlives it, then ``ends``."""

    def __init__(self, ends: Callable[[], None] | None = None) -> None:
        self.ends = ends
        self.workdirs: list[str] = []
        self.children: list[subprocess.Popen[bytes]] = []

    def __call__(self, config: core.BenchConfig, size_bytes: int) -> core.LegResult:
        self.workdirs.append(config.workdir)
        with open(os.path.join(config.workdir, "state.bin"), "wb") as f:
            f.write(b"\0" * 4096)
        # Inherits this process's environment, as every leg's children do.
        self.children.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                              start_new_session=True))
        if self.ends is not None:
            self.ends()
        return core.LegResult(leg="fake", size=core.size_label(size_bytes), size_bytes=size_bytes)

    def child_killed(self) -> bool:
        """The child was SIGKILLed by the bench (waited for, never killed here)."""
        return all(c.wait(timeout=60) == -signal.SIGKILL for c in self.children)

    def cleanup(self) -> None:
        for c in self.children:
            if c.poll() is None:
                c.kill()
                c.wait()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeLeg:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "quiet_logs", lambda: None)  # no global structlog change in pytest
    monkeypatch.setitem(legs.LEGS, "fake", "fake")
    leg = FakeLeg()
    monkeypatch.setattr(legs, "load", lambda name: leg)
    return leg


def run_cli(tmp_path: Path, *args: str) -> int:
    return cli.main(["--legs", "fake", "--sizes", "1M", "--repeats", "1",
                     "--json", str(tmp_path / "r.json"), *args])


@pytest.mark.timeout(120)
def test_default_scratch_deleted_after_a_normal_run(fake: FakeLeg, tmp_path: Path) -> None:
    try:
        assert run_cli(tmp_path) == 0
        (workdir,) = fake.workdirs
        assert os.path.dirname(workdir) == str(tmp_path / ".bench")
        assert os.path.basename(workdir).startswith("run-")
        assert not os.path.exists(workdir)
        assert fake.child_killed()
        assert (tmp_path / "r.json").exists()
    finally:
        fake.cleanup()


@pytest.mark.timeout(120)
def test_default_scratch_deleted_when_the_leg_raises(fake: FakeLeg, tmp_path: Path) -> None:
    def boom() -> None:
        raise RuntimeError("leg broke")

    fake.ends = boom
    try:
        assert run_cli(tmp_path) == 1
        (workdir,) = fake.workdirs
        assert not os.path.exists(workdir)
        assert fake.child_killed()
    finally:
        fake.cleanup()


@pytest.mark.timeout(120)
def test_default_scratch_deleted_on_keyboard_interrupt(fake: FakeLeg, tmp_path: Path) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    fake.ends = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run_cli(tmp_path)
        (workdir,) = fake.workdirs
        assert not os.path.exists(workdir)
        assert fake.child_killed()
        assert scratch.RUN_VAR not in os.environ
    finally:
        fake.cleanup()


@pytest.mark.timeout(120)
def test_keep_scratch_keeps_it(fake: FakeLeg, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        assert run_cli(tmp_path, "--keep-scratch") == 0
        (workdir,) = fake.workdirs
        assert os.path.exists(os.path.join(workdir, "state.bin"))
        assert f"scratch kept: {workdir}" in capsys.readouterr().err
        assert fake.child_killed()  # processes go either way
    finally:
        fake.cleanup()


@pytest.mark.timeout(120)
def test_user_workdir_kept_only_the_run_dir_deleted(fake: FakeLeg, tmp_path: Path) -> None:
    user = tmp_path / "disk-under-test"
    user.mkdir()
    (user / "mine.txt").write_text("the user's")
    try:
        assert run_cli(tmp_path, "--workdir", str(user)) == 0
        (workdir,) = fake.workdirs
        assert os.path.dirname(workdir) == str(user)
        assert not os.path.exists(workdir)
        assert sorted(p.name for p in user.iterdir()) == ["mine.txt"]
        assert (user / "mine.txt").read_text() == "the user's"
        assert not (tmp_path / ".bench").exists()
    finally:
        fake.cleanup()


@pytest.mark.timeout(60)
def test_bad_input_makes_no_scratch(fake: FakeLeg, tmp_path: Path) -> None:
    assert run_cli(tmp_path, "--repeats", "0") == 2
    assert fake.workdirs == []
    assert not (tmp_path / ".bench").exists()


_SIGTERMED = """
import sys, time
import bench.__main__ as cli
from bench import core, legs

def leg(config, size_bytes):
    open(config.workdir + "/state.bin", "wb").close()
    print(config.workdir, flush=True)
    time.sleep(600)

legs.LEGS["fake"] = "fake"
legs.load = lambda name: leg
sys.exit(cli.main(["--legs", "fake", "--sizes", "1M", "--repeats", "1", "--json", sys.argv[1]]))
"""


@pytest.mark.timeout(120)
def test_default_scratch_deleted_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERMED, str(tmp_path / "r.json")], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        workdir = proc.stdout.readline().strip()  # the leg is running in its scratch dir
        assert os.path.exists(os.path.join(workdir, "state.bin"))
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert not os.path.exists(workdir)
        assert os.path.isdir(tmp_path / ".bench")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
