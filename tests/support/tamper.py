"""Damage that file checksums cannot see: a snapshot rewritten together with its manifest.

What an encoder/decoder bug or a deliberate edit produces: ``tree.json`` describes a tensor
differently (another dtype of the same item size, so every byte length still adds up) and the
manifest's entry for the file is updated to match, so the snapshot passes file-level
verification; only its content ``digest`` (left as it was) no longer describes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from storage.blockhash import checksum_of

#: Same-size dtype swaps (torch names as the trainer records them).
_SWAP = {"float32": "int32", "int32": "float32", "float64": "int64", "int64": "float64"}


def _records(node: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if isinstance(node, list):
        for item in node:
            out.extend(_records(item))
    elif isinstance(node, dict):
        if node.get("t") == "tensor":
            out.append(node)
        else:
            for value in node.values():
                out.extend(_records(value))
    return out


def _replace(path: Path, data: bytes) -> None:
    """Atomically, so that a supervisor scanning the directory never reads half a file."""
    tmp = path.with_name(f".{path.name}.tamper")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def rewrite_manifest_entry(snapshot: Path, name: str) -> None:
    """Make the manifest's size and checksum of ``name`` match the file as it is now."""
    manifest_path = snapshot / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    data = (snapshot / name).read_bytes()
    algorithm = manifest.get("checksum_algorithm", "sha256")
    manifest["files"][name] = {"size": len(data), "checksum": checksum_of(data, algorithm)}
    _replace(manifest_path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def retype_tensor(snapshot: Path) -> str:
    """Change the dtype of the largest swappable tensor in ``tree.json`` (same item size) and
    fix the manifest's file entry; returns the new dtype. The content digest is left alone."""
    tree_path = snapshot / "tree.json"
    tree = json.loads(tree_path.read_text())
    candidates = [r for r in _records(tree["root"]) if r.get("dtype") in _SWAP and r["nbytes"]]
    if not candidates:
        raise ValueError(f"no tensor of a swappable dtype in {tree_path}")
    record = max(candidates, key=lambda r: r["nbytes"])
    record["dtype"] = _SWAP[record["dtype"]]
    _replace(
        tree_path,
        json.dumps(tree, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(),
    )
    rewrite_manifest_entry(snapshot, "tree.json")
    return str(record["dtype"])
