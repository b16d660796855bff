"""Leg "fsdp": sharded snapshots of an FSDP2 model on 2 ranks against DCP, and the disk's limit.

The workload (:mod:`bench.workloads.fsdp`) runs under real ``torchrun``: the MLP of
:func:`bench.core.make_model` with every Linear and the root wrapped by ``fully_shard``, AdamW,
gloo on CPU with ``OMP_NUM_THREADS=1`` (NCCL when ``--device cuda`` and 2 GPUs exist). Ours is
the public :class:`trainer.Checkpointer` on that model, which takes a sharded snapshot (every
rank writes its own shard file, rank 0 commits the manifest after every rank reported). Measured
side by side in the same runs:

1. **stall**: the training thread blocked by one snapshot (slowest rank), ours against
   ``dcp.async_save`` of the ``get_state_dict`` model + optimizer state (its stall counts the
   ``get_state_dict`` call a user makes at every save), interleaved, first save of each excluded;
   beside them every rank copying its shards' bytes at once (the copy limit);
2. **write**: bytes of the snapshot over the seconds from staged to committed with every rank
   writing, against ``dd oflag=direct conv=fdatasync`` run on every rank in parallel writing as
   many bytes (the disk's limit for this pattern) and a synchronous ``dcp.save``; beside them
   every rank hashing its share with sha256 at once (what verified bytes cost the CPUs);
3. **resume with resharding**: a 2-rank snapshot resumed on 1 rank (and on 2) by
   ``Checkpointer.resume()`` (``allow_world_size_change``) against ``dcp.load`` +
   ``set_state_dict`` of the DCP checkpoint of the same step onto the same model, page cache
   dropped before each load.

Correctness gates: every manifest digest of ours equals the live digest at its step (equal for
the same state under any sharding); after every resume, of either tool on either world size, the
gathered full state's digest equals the one gathered at the save.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from typing import Any

import torch

from bench import core
from bench.workloads import harness as h

WORKER = "bench/workloads/fsdp.py"
RANKS = 2


def _width(size_bytes: int) -> int:
    """The MLP's width: 1024 (as the other legs) unless the size is below one such layer."""
    return 1024 if size_bytes >= 24 * core.MB else 256


def _torchrun(nproc: int, argv: list[str], *, env: dict[str, str], log: str, timeout: float) -> None:
    cmd = [*h._bin("torchrun"), "--standalone", f"--nproc-per-node={nproc}", WORKER, *argv]
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(cmd)}\n".encode())
        f.flush()
        try:
            proc = subprocess.run(cmd, cwd=h.REPO, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                  stderr=subprocess.STDOUT, timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise h.BenchRunError(f"{WORKER} ({nproc} ranks) still running after {timeout:.0f} s; "
                                  f"log tail:\n{_tail(log)}") from None
    if proc.returncode != 0:
        raise h.BenchRunError(f"{WORKER} ({nproc} ranks) exited {proc.returncode}; log tail:\n{_tail(log)}")


def _tail(path: str, n: int = 3000) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read().decode(errors="replace")


def _read(path: str) -> dict[str, Any]:
    with open(path) as f:
        doc: dict[str, Any] = json.load(f)
    return doc


def _env(config: core.BenchConfig, result: core.LegResult) -> dict[str, str]:
    if config.device == "cuda" and torch.cuda.device_count() >= RANKS:
        return h.base_env()
    if config.device == "cuda":
        result.notes.append(f"--device cuda: {torch.cuda.device_count()} GPU(s), FSDP on {RANKS} ranks "
                            "needs 2; measured on CPU (gloo)")
    return h.base_env(CUDA_VISIBLE_DEVICES="")


def _stat(samples: list[float], unit: str) -> core.Stat:
    return core.Stat(unit=unit, samples=tuple(samples))


def _r(x: float) -> float | None:
    """A ratio for the JSON: 3 decimals, None when a side is unavailable."""
    return round(x, 3) if math.isfinite(x) else None


def _gates(result: core.LegResult, gates: list[dict[str, Any]]) -> None:
    for g in gates:
        result.gate(str(g["expected"]), str(g["actual"]), g["what"])


def run(config: core.BenchConfig, size_bytes: int) -> core.LegResult:
    result = core.LegResult(leg="fsdp", size=core.size_label(size_bytes), size_bytes=0)
    base = config.scratch(f"fsdp-{result.size}")
    env = _env(config, result)
    log = os.path.join(base, "torchrun.log")
    timeout = 2 * h.timeout_for(size_bytes) + 60.0 * config.repeats
    common = ["--size", str(size_bytes), "--width", str(_width(size_bytes)), "--repeats", str(config.repeats),
              "--dir", base]
    saved_json = os.path.join(base, "save.json")
    _torchrun(RANKS, ["save", *common, "--out", saved_json], env=env, log=log, timeout=timeout)
    saved = _read(saved_json)
    result.size_bytes = int(saved["state_bytes"])
    _gates(result, saved["gates"])
    s = saved["samples"]
    for key, unit in (("ours_stall_s", "s"), ("dcp_async_save_stall_s", "s"), ("ours_MBps", "MB/s"),
                      ("dd_MBps", "MB/s"), ("dcp_save_MBps", "MB/s"), ("ours_writer_MBps", "MB/s"),
                      ("copy_limit_s", "s"), ("sha256_MBps", "MB/s")):
        result.values[key] = _stat(s[key], unit)

    resumes: dict[int, dict[str, Any]] = {}
    for nproc in (1, RANKS):
        out = os.path.join(base, f"resume-{nproc}.json")
        _torchrun(nproc, ["resume", *common, "--expected", saved_json, "--out", out], env=env, log=log,
                  timeout=timeout)
        resumes[nproc] = doc = _read(out)
        _gates(result, doc["gates"])
        result.values[f"dcp_load_{nproc}rank_s"] = _stat(doc["samples"]["dcp_load_s"], "s")
        wrong = sorted({r for r in doc["resumed_from"] if r != saved["final_step"]})
        for r in doc["resumed_from"]:
            result.gate(str(saved["final_step"]), str(r), f"ours on {nproc} rank(s): resumed step")
        if doc["ours_errors"] or wrong:
            # A resume that raised or restored another step (a fresh start is fast) is no time.
            why = doc["ours_errors"][0] if doc["ours_errors"] else f"resumed step {wrong} instead of {saved['final_step']}"
            result.scalars[f"ours_resume_{nproc}rank_unavailable"] = why
            result.notes.append(f"ours' resume on {nproc} rank(s) UNAVAILABLE: {why}")
        else:
            result.values[f"ours_resume_{nproc}rank_s"] = _stat(doc["samples"]["ours_s"], "s")

    v = {k: stat.median for k, stat in result.values.items()}
    for nproc in (1, RANKS):
        v.setdefault(f"ours_resume_{nproc}rank_s", math.inf)
    result.targets += [
        core.Target(name="fsdp_stall_vs_async_save", value=core.ratio(v["ours_stall_s"], v["dcp_async_save_stall_s"]),
                    bound=0.5, op="<=", meaning=f"FSDP {RANKS} ranks: stall / dcp.async_save"),
        core.Target(name="fsdp_write_vs_dd", value=core.ratio(v["ours_MBps"], v["dd_MBps"]), bound=0.9,
                    op=">=", meaning=f"FSDP {RANKS} ranks writing: snapshot MB/s / dd oflag=direct on every rank"),
        core.Target(name="fsdp_resume_1rank_vs_dcp_load",
                    value=core.ratio(v["ours_resume_1rank_s"], v["dcp_load_1rank_s"]), bound=1.0, op="<=",
                    meaning=f"{RANKS}-rank snapshot resumed on 1 rank / dcp.load + set_state_dict"),
    ]
    result.scalars.update(
        ranks=RANKS,
        state_bytes=result.size_bytes,
        snapshot_bytes=max(saved["snapshot_bytes"], default=0),
        dcp_checkpoint_bytes=saved["dcp_bytes"],
        resume_2rank_vs_dcp_load=_r(core.ratio(v[f"ours_resume_{RANKS}rank_s"], v[f"dcp_load_{RANKS}rank_s"])),
        write_vs_dcp_save=_r(core.ratio(v["ours_MBps"], v["dcp_save_MBps"])),
        stall_vs_copy=_r(core.ratio(v["ours_stall_s"], v["copy_limit_s"])),
        write_vs_sha256=_r(core.ratio(v["ours_MBps"], v["sha256_MBps"])),
        backend="nccl" if "CUDA_VISIBLE_DEVICES" not in env else "gloo",
    )
    result.notes.append(
        f"torchrun --standalone --nproc-per-node {RANKS}, fully_shard on every Linear and the root of a "
        f"{_width(size_bytes)}-wide MLP + AdamW; times are the slowest rank's; stall: first save of each "
        f"tool excluded, {2} training steps between a save and its wait; dcp.async_save on its own gloo "
        "group with a reused DefaultStager (pinned/async staging only on CUDA), its stall counts "
        "get_state_dict; write: ours from snapshot() returning to the manifest committed (rank 0), "
        "ours_writer_MBps is rank 0's writer thread alone; copy_limit_s: every rank copying its shards' "
        "bytes at once (memcpy between touched buffers); sha256_MBps: every rank hashing its share of the "
        "snapshot's bytes at once, one sha256 pass (ours hashes every byte twice when writing: the file "
        "checksum and the sharding-independent block digest); dd bs=8M oflag=direct conv=fdatasync, one per "
        "rank in parallel, each writing the snapshot's bytes / ranks; resume: page cache of both "
        "checkpoints dropped (fadvise) before each load, model and optimizer state zeroed; ours = "
        "Checkpointer(...) + resume(), which verifies every file's checksum and the digest of what it "
        "loaded before applying; DCP = get_state_dict + dcp.load + set_state_dict, which verifies nothing")
    return result
