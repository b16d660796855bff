"""Real small filesystems for disk-fault tests: a tmpfs mounted for the duration of a block.

Mounting needs root (or a user namespace that allows it); where it is refused the test is
skipped with the reason, never passed.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, options: str = "") -> Iterator[None]:
    """A tmpfs of ``size`` (``"3m"``) at ``path`` (created), lazily unmounted afterwards;
    ``options`` adds mount options (``"ro"``)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
