"""Leg "write": local snapshot throughput, including checksums, fsync and the atomic rename.

Ours is timed from the moment ``snapshot()`` hands the staged state to the writer thread until
the snapshot is committed (tensor file written and fsynced, SHA-256 of the file and the content
digest computed, manifest written, directory renamed into place and the parent fsynced). Peers on
the same disk and bytes: ``dd oflag=direct conv=fsync`` (the device limit: no page cache, no
hashing) and synchronous ``torch.save`` + fsync + rename. Every snapshot of ours is read back
with checksum verification and its tensors compared with the live state at its step.
"""

from __future__ import annotations

from bench import core
from bench.legs import savers


def run(config: core.BenchConfig, size_bytes: int) -> core.LegResult:
    model, optimizer, result, base = savers.prepare(config, size_bytes, "write")
    nbytes = result.size_bytes
    ours = savers.Ours(model, optimizer, f"{base}/ours")
    plain = savers.TorchSave(model, optimizer, f"{base}/torch_save")
    ours_mbps: list[float] = []
    save_mbps: list[float] = []
    dd: list[float] = []
    raw: list[float] = []
    try:
        for i in range(config.repeats + 1):
            # Interleaved, so drift in the disk's speed hits every tool alike.
            core.train_step(model, optimizer)
            step = i + 1
            expected = core.tensor_digest(core.training_state(model, optimizer))
            ours.save(step)
            written = ours.wait()
            snapshot_bytes = ours.ckpt.store.read_manifest(step).total_bytes
            result.gate(expected, ours.saved_digest(step), f"ours write {i}")
            ours.delete(step)
            seconds = plain.save(step)
            plain.delete(step)
            if i == 0:
                continue  # warm-up: first-touch allocation of the arena and of torch.save's buffers
            ours_mbps.append(snapshot_bytes / core.MB / written)
            save_mbps.append(nbytes / core.MB / seconds)
            dd.extend(core.dd_direct_mbps(base, nbytes, repeats=1).samples)
            raw.extend(core.direct_write_mbps(base, nbytes, repeats=1).samples)
    finally:
        ours.close()
    result.values["ours_MBps"] = core.Stat(unit="MB/s", samples=tuple(ours_mbps))
    result.values["dd_direct_MBps"] = core.Stat(unit="MB/s", samples=tuple(dd))
    result.values["torch_save_MBps"] = core.Stat(unit="MB/s", samples=tuple(save_mbps))
    result.values["raw_o_direct_MBps"] = core.Stat(unit="MB/s", samples=tuple(raw))
    o = result.values["ours_MBps"].median
    result.targets += [
        core.Target(name="write_vs_dd_direct", value=core.ratio(o, result.values["dd_direct_MBps"].median),
                    bound=0.9, op=">=", meaning="local write / dd oflag=direct"),
    ]
    result.scalars["ours_vs_torch_save"] = round(core.ratio(o, result.values["torch_save_MBps"].median), 3)
    result.scalars["ours_vs_raw_o_direct"] = round(
        core.ratio(o, result.values["raw_o_direct_MBps"].median), 3)
    result.scalars["state_bytes"] = nbytes
    result.scalars["staging"] = ours.ckpt.staging
    return result
