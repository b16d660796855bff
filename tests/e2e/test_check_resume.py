"""``orchestrator check-resume`` on a third-party-style script: each habit that breaks bit-exact
resume is named with the right component and hint; the fixed script passes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import harness

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PORT = str(Path(__file__).resolve().parent / "ports" / "third_party.py")


def check(tmp_path: Path, mistake: str, *, at: str | None = "7") -> tuple[int, dict[str, Any]]:
    args = [*harness.ORCH, "check-resume", "--json", *(["--at", at] if at else []), "--workdir",
            str(tmp_path / mistake), PORT, "--mistake", mistake, "--steps", "16"]
    p = subprocess.run(args, env=harness.base_env(), cwd=harness.REPO, capture_output=True,
                       text=True, timeout=500)
    assert p.returncode in (0, 1), p.stderr
    return p.returncode, json.loads(p.stdout)


def test_the_fixed_script_resumes_bit_exactly(tmp_path: Path) -> None:
    code, out = check(tmp_path, "none", at=None)
    assert code == 0 and out["exact"] is True and out["first_divergence"] is None, out
    # No --at: runs stop at the script's own end (16, before the default 20), snapshots every
    # 5, and the kill is chosen between snapshots 10 and 15. The resume point is 10, or 5 when
    # rank 0 was torn down before snapshot 10 committed; either way steps were re-executed.
    assert out["at_chosen_from_run"] is True and out["at"] == 13, out
    assert out["resumed_from"] in (5, 10) and out["compared_steps"][-1] == 16


@pytest.mark.parametrize(
    ("mistake", "between", "component", "hint"),
    [
        ("unseeded", "fresh-vs-fresh", "rng/numpy/", "seed numpy"),
        ("held", "fresh-vs-resumed", "", "across the step boundary"),
        ("extras", "fresh-vs-resumed", "", "TrainingState(per_rank=...)"),
    ],
)
def test_each_mistake_is_named(
    tmp_path: Path, mistake: str, between: str, component: str, hint: str
) -> None:
    code, out = check(tmp_path, mistake)
    assert code == 1 and out["exact"] is False
    first = out["first_divergence"]
    assert first["between"] == between
    assert first["component"].startswith(component)
    if between == "fresh-vs-resumed":
        assert first["step"] > out["resumed_from"]
    assert any(hint in h for h in out["hints"]), out["hints"]
