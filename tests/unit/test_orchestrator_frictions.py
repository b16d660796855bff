"""Frictions found by porting a third-party script: install line, start-up errors, re-launching
a finished run, terminal output, ``launch --help``."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

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
