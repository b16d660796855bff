"""Session fixtures for end-to-end tests: uninterrupted golden runs, computed once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import harness


def _golden(tmp_path_factory: pytest.TempPathFactory, name: str, *script_args: str) -> dict[int, str]:
    ckpt = tmp_path_factory.mktemp(name)
    result = harness.launch(ckpt, script_args=script_args)
    assert result.rc == 0, f"golden run failed:\n{result.stderr[-4000:]}"
    got = harness.digests(result.snapshots())
    assert max(got) == harness.STEPS, sorted(got)
    return got


@pytest.fixture(scope="session")
def golden(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    """Digest of every snapshot of an uninterrupted run (no DataLoader workers)."""
    return _golden(tmp_path_factory, "golden")


@pytest.fixture(scope="session")
def golden_workers(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    """The same with two DataLoader worker processes per rank."""
    return _golden(tmp_path_factory, "golden-workers", "--workers", "2")


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return tmp_path / "ckpt"
