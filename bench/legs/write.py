"""Leg "write": local snapshot throughput, including checksums, fsync and the atomic rename.

Ours is timed from the moment ``snapshot()`` hands the staged state to the writer thread until
the snapshot is committed (tensor file written and fsynced, SHA-256 of the file and the content
digest computed, manifest written, directory renamed into place and the parent fsynced). Peers on
the same disk and bytes: ``dd oflag=direct conv=fsync`` (the device limit: no page cache, no
hashing) and synchronous ``torch.save`` + fsync + rename. Every snapshot of ours is read back
with checksum verification and its tensors compared with the live state at its step.

The read-back is also the verified-load measurement (the scaling curves' "verified load"): a
fresh model + AdamW restored by :meth:`trainer.Checkpointer.resume` from the snapshot (every
file's checksum and the content digest checked before anything is applied), timed once with a
cold page cache (the snapshot's files evicted first) and once warm; the peer is
``torch.load(weights_only=True)`` + ``load_state_dict`` of the ``torch.save`` file, cold.
"""

from __future__ import annotations

import copy

import torch

import trainer
from bench import core
from bench.legs import savers
from trainer.settings import WorkerSettings


class _Reader:
    """A second model + AdamW of the same shapes that snapshots are loaded into."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.grad = None
        self.optimizer = core.make_optimizer(self.model)

    def verified_load(self, directory: str, step: int) -> tuple[float, str]:
        """Seconds of a verified resume of ``step`` from ``directory``; the loaded state's digest."""
        state = trainer.TrainingState(model=self.model, optimizer=self.optimizer)
        settings = WorkerSettings(checkpoint_dir=directory, run_id="bench", resume_mode="step",
                                  resume_step=step)
        ckpt = trainer.Checkpointer(state, hparams={}, every=0, settings=settings)
        try:
            seconds = core.timed(ckpt.resume)
        finally:
            ckpt.close()
        return seconds, core.tensor_digest(core.training_state(self.model, self.optimizer))

    def torch_load(self, path: str) -> tuple[float, str]:
        def load() -> None:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optim"])

        seconds = core.timed(load)
        return seconds, core.tensor_digest(core.training_state(self.model, self.optimizer))


def run(config: core.BenchConfig, size_bytes: int) -> core.LegResult:
    model, optimizer, result, base = savers.prepare(config, size_bytes, "write")
    nbytes = result.size_bytes
    ours = savers.Ours(model, optimizer, f"{base}/ours")
    plain = savers.TorchSave(model, optimizer, f"{base}/torch_save")
    ours_mbps: list[float] = []
    save_mbps: list[float] = []
    dd: list[float] = []
    raw: list[float] = []
    loads: dict[str, list[float]] = {"ours_load_cold_s": [], "ours_load_warm_s": [], "torch_load_cold_s": []}
    cache_dropped = True
    reader = _Reader(model)
    try:
        for i in range(config.repeats + 1):
            # Interleaved, so drift in the disk's speed hits every tool alike.
            core.train_step(model, optimizer)
            step = i + 1
            expected = core.tensor_digest(core.training_state(model, optimizer))
            ours.save(step)
            written = ours.wait()
            snapshot_bytes = ours.ckpt.store.read_manifest(step).total_bytes
            cache_dropped &= core.drop_page_cache(ours.ckpt.store.path(step))
            cold, digest = reader.verified_load(f"{base}/ours", step)
            result.gate(expected, digest, f"ours write {i}, verified load (cold cache)")
            warm, digest = reader.verified_load(f"{base}/ours", step)
            result.gate(expected, digest, f"ours write {i}, verified load (warm cache)")
            ours.delete(step)
            seconds = plain.save(step)
            cache_dropped &= core.drop_page_cache(plain.path(step))
            peer_load, digest = reader.torch_load(plain.path(step))
            result.gate(expected, digest, f"torch.save {i}, torch.load (cold cache)")
            plain.delete(step)
            if i == 0:
                continue  # warm-up: first-touch allocation of the arena and of torch.save's buffers
            loads["ours_load_cold_s"].append(cold)
            loads["ours_load_warm_s"].append(warm)
            loads["torch_load_cold_s"].append(peer_load)
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
    for key, samples in loads.items():
        result.values[key] = core.Stat(unit="s", samples=tuple(samples))
    result.scalars["ours_load_cold_vs_torch_load"] = round(
        core.ratio(result.values["ours_load_cold_s"].median, result.values["torch_load_cold_s"].median), 3)
    if not cache_dropped:
        result.notes.append("a page-cache eviction failed: some cold loads may have read cached pages")
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
