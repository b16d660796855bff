"""Module-level scripts (no ``main()``) under the worker handler: ``trainer.run_script`` and
``python -m trainer.script SCRIPT ARGS``, alone and under real torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from contract.codes import EXIT_FATAL, EXIT_PREEMPTED
from trainer.errors import EXIT_FAILURE

REPO = Path(__file__).resolve().parents[2]

# A module-level script in the style of nanoGPT's train.py: imports a sibling module (named like
# a module of the trainer package, which must not shadow it), reads sys.argv, runs at top level.
SCRIPT = textwrap.dedent("""
    import json
    import os
    import sys

    import settings  # the script's sibling, not trainer/settings.py

    kind = sys.argv[1]
    if kind == "crash":
        raise RuntimeError("boom at module level")
    if kind == "usage":
        sys.exit(2)
    if kind == "config":
        from trainer.errors import ConfigMismatch
        raise ConfigMismatch(5, {"lr": (0.1, 0.2)})
    if kind == "preempted":
        from trainer.errors import Preempted
        raise Preempted(7)
    if kind.startswith("nested"):
        import trainer
        from trainer.errors import Preempted

        def main():
            if kind == "nested-preempted":
                raise Preempted(7)
            raise RuntimeError("boom inside trainer.run")

        trainer.run(main)
    import importlib.util

    out = {"argv": sys.argv, "name": __name__, "file": __file__, "sibling": settings.WHO,
           "rank": os.environ.get("RANK"),
           # trainer/script.py run as a file must not leave the package's modules importable
           "trainer_modules_top_level": importlib.util.find_spec("staging") is not None}
    with open(os.path.join(os.environ["OUT_DIR"], "out-%s.json" % os.environ.get("RANK", "0")), "w") as f:
        json.dump(out, f)
""")


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "ORCH_CHECKPOINT_DIR": str(tmp_path / "ckpt"), "ORCH_ATTEMPT": "1",
            "RANK": "0", "ORCH_LOG_FORMAT": "json", "OUT_DIR": str(tmp_path)}


def _script(tmp_path: Path) -> Path:
    (tmp_path / "settings.py").write_text("WHO = 'sibling'\n")
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("form", ["module", "file"])
def test_a_module_level_script_runs_as_main_with_its_arguments(tmp_path: Path, form: str) -> None:
    script = _script(tmp_path)
    launcher = ["-m", "trainer.script"] if form == "module" else [str(REPO / "trainer" / "script.py")]
    proc = subprocess.run([sys.executable, *launcher, str(script), "ok", "--lr=3"], env=_env(tmp_path),
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads((tmp_path / "out-0.json").read_text())
    assert out["argv"] == [str(script), "ok", "--lr=3"]
    assert out["name"] == "__main__" and out["file"] == str(script) and out["sibling"] == "sibling"
    assert out["trainer_modules_top_level"] is False


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("kind", "code", "fatal"), [
    ("crash", EXIT_FAILURE, False), ("usage", EXIT_FATAL, True), ("config", EXIT_FATAL, True),
    ("nested", EXIT_FAILURE, False), ("preempted", EXIT_PREEMPTED, None),
    ("nested-preempted", EXIT_PREEMPTED, None), ("missing", EXIT_FATAL, True),
])
def test_failures_get_the_handlers_error_files_and_exit_codes(
    tmp_path: Path, kind: str, code: int, fatal: bool | None
) -> None:
    script = _script(tmp_path) if kind != "missing" else tmp_path / "absent.py"
    proc = subprocess.run([sys.executable, "-m", "trainer.script", str(script), kind], env=_env(tmp_path),
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    path = tmp_path / "ckpt/run/errors/attempt-1/rank-0.json"
    if fatal is None:
        assert not path.exists()
        return
    doc = json.loads(path.read_text())
    assert doc["fatal"] is fatal and doc["rank"] == 0


@pytest.mark.timeout(30)
def test_path_prints_the_file_to_give_orchestrator_launch(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "trainer.script", "--path"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=30, check=True)
    assert Path(proc.stdout.strip()) == REPO / "trainer" / "script.py"


@pytest.mark.timeout(120)
def test_torchrun_runs_a_module_level_script_on_every_rank(tmp_path: Path) -> None:
    script = _script(tmp_path)
    env = _env(tmp_path)
    del env["RANK"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "--max-restarts=0", "-m", "trainer.script", str(script), "ok"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = [json.loads((tmp_path / f"out-{r}.json").read_text()) for r in range(2)]
    assert [o["rank"] for o in outs] == ["0", "1"]
    assert all(o["argv"] == [str(script), "ok"] and o["name"] == "__main__" for o in outs)


GROUP_SCRIPT = textwrap.dedent("""
    import atexit
    import os
    import socket

    import torch.distributed as dist

    import trainer

    out = os.environ["OUT_DIR"]

    def main():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        atexit.register(lambda: open(os.path.join(out, "atexit"), "w").write("ran"))
        log = open(os.path.join(out, "unclosed.txt"), "w")  # never closed, never flushed
        log.write("last line\\n")
        globals()["log"] = log
        if os.environ.get("KIND") == "preempted":
            raise trainer.Preempted(3)

    trainer.run(main)
""")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("kind", "code"), [("ok", 0), ("preempted", EXIT_PREEMPTED)])
def test_a_rank_with_a_process_group_exits_cleanly_keeping_atexit_and_open_files(
    tmp_path: Path, kind: str, code: int
) -> None:
    """The rank ends without interpreter finalisation (gloo's teardown can SIGABRT there), yet
    atexit handlers run and files the script left open keep what it wrote."""
    script = tmp_path / "group.py"
    script.write_text(GROUP_SCRIPT)
    p = subprocess.run([sys.executable, str(script)], env={**_env(tmp_path), "KIND": kind},
                       cwd=REPO, capture_output=True, text=True, timeout=50)
    assert p.returncode == code, p.stderr[-2000:]
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "unclosed.txt").read_text() == "last line\n"
