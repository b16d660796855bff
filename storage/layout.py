"""Names and paths of the checkpoint directory.

One place decides how a step maps to a directory name and back, so that listing, selection and
retention agree. Steps are always compared as integers parsed from the name, never by string
order or mtime; anything that does not parse is junk to be ignored, never deleted.
"""

from __future__ import annotations

import os
import re
import secrets
import stat

SNAPSHOTS_DIR = "snapshots"
EXPORTS_DIR = "exports"
MANIFEST_NAME = "manifest.json"
#: The trainer's two snapshot files: the tree (JSON) and the arena of tensor bytes. Named here so
#: that validation can check a snapshot's content digest (storage.content) without the trainer.
TREE_FILE = "tree.json"
TENSORS_FILE = "tensors.bin"

_STEP_WIDTH = 12
# ASCII digits only (`\d` would accept other scripts' digits, which int() parses) and full
# matches only (`$` accepts a trailing newline).
_COMMITTED = re.compile(r"step-([0-9]{1,30})")
_TEMP = re.compile(r"\.tmp-step-([0-9]{1,30})-.+", re.DOTALL)
TEMP_PREFIX = ".tmp-step-"


def snapshot_dirname(step: int) -> str:
    """Directory name of the committed snapshot at `step`."""
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    return f"step-{step:0{_STEP_WIDTH}d}"


def temp_dirname(step: int) -> str:
    """A fresh temporary name for a snapshot being written; unique per writer and attempt."""
    return f"{TEMP_PREFIX}{step:0{_STEP_WIDTH}d}-{os.getpid()}-{secrets.token_hex(4)}"


def parse_committed(name: str) -> int | None:
    """The step of a committed snapshot directory name, or None for anything else.

    Only the canonical name `snapshot_dirname(step)` counts: `step-9` or `step-0000000000009`
    would parse to a step whose `path()` is a different directory, so they are junk.
    """
    m = _COMMITTED.fullmatch(name)
    if m is None:
        return None
    step = int(m.group(1))
    return step if snapshot_dirname(step) == name else None


def parse_temp(name: str) -> int | None:
    """The step of a temporary (in-flight or abandoned) snapshot directory name, or None."""
    m = _TEMP.fullmatch(name)
    return int(m.group(1)) if m else None


def snapshots_root(checkpoint_dir: str) -> str:
    return os.path.join(checkpoint_dir, SNAPSHOTS_DIR)


def exports_root(checkpoint_dir: str) -> str:
    return os.path.join(checkpoint_dir, EXPORTS_DIR)


def is_safe_filename(name: str) -> bool:
    """Snapshot file names are plain names inside the snapshot directory.

    No separators (``/``, ``\\``), so never absolute and never ``..``; no dot-dirs, nothing
    hidden, no NUL, never the manifest itself. Whatever a manifest (local or downloaded) names
    is checked with this before a path is built from it; a name too long for the filesystem
    fails at open as an invalid snapshot.
    """
    return (
        isinstance(name, str)
        and bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not name.startswith(".")
        and name != MANIFEST_NAME
    )


def is_real_dir(path: str) -> bool:
    """A directory, not a symlink to one: only such a directory can be a snapshot of ours."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
