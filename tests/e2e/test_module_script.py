"""A module-level, nanoGPT-shaped script (no ``main()``, globals, a batch prefetched across the
step boundary) ported with the "right thing is easy" API: launched as-is through
``launch --wrap`` (``trainer.run_script``), seeded with ``seed_everything``, the prefetched batch in ``per_rank`` state,
a logging-only hyperparameter ignored. Killed mid-run and resumed with a different logging
interval, it ends bit-identical to an uninterrupted run; the same script keeping its prefetched
batch outside the registered state does not (the control that shows the comparison can fail).
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.e2e import harness

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

STEPS, EVERY = 30, 5

SCRIPT = textwrap.dedent('''
    import sys

    import torch
    import torch.nn.functional as F

    import trainer
    from data import get_batch  # a sibling module, as nanoGPT imports model.py
    from trainer.resume import ResumePolicy

    steps = 30
    log_interval = 5
    register_batch = 1
    for arg in sys.argv[1:]:
        key, val = arg.lstrip("-").split("=")
        globals()[key] = int(val)
    config = {"steps": steps, "log_interval": log_interval}

    ctx = trainer.init_distributed()
    torch.manual_seed(1337)  # identical initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(32, 1))
    model = torch.nn.parallel.DistributedDataParallel(model)
    trainer.seed_everything(1337)  # per-rank streams for dropout and data
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)


    class Prefetched:
        def __init__(self):
            self.x = self.y = None

        def state_dict(self):
            return {"x": self.x, "y": self.y}

        def load_state_dict(self, sd):
            self.x, self.y = sd["x"], sd["y"]


    batch = Prefetched()
    state = trainer.TrainingState(model=model, optimizer=opt,
                                  per_rank={"batch": batch} if register_batch else None)
    ckpt = trainer.Checkpointer(state, hparams=config,
                                resume_policy=ResumePolicy(ignore_hparams=("log_interval",)))
    start = ckpt.resume()
    if start == 0 or not register_batch:
        batch.x, batch.y = get_batch()
    for step in range(start, steps):
        loss = F.mse_loss(model(batch.x), batch.y)
        batch.x, batch.y = get_batch()  # prefetch the next batch before backward, as nanoGPT does
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_interval == 0 and ctx.rank == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
        ckpt.step_done(step + 1)
    ckpt.finish()
''')

DATA = textwrap.dedent('''
    import torch


    def get_batch():
        x = torch.randn(8, 16)
        return x, x.sum(dim=1, keepdim=True)
''')


def _launch(tmp_path: Path, name: str, *script_args: str, faults: str | None = None) -> harness.Result:
    ckpt = tmp_path / name
    # --wrap: the script runs unchanged under trainer.run_script (it has no main()).
    args = [*harness.ORCH, "launch", "--nproc-per-node", "2", "--checkpoint-dir", str(ckpt),
            "--checkpoint-every", str(EVERY), "--keep-local", "all", "--max-restarts", "2",
            "--wrap", str(tmp_path / "train.py"), *script_args]
    env = harness.base_env(**({"ORCH_FAULTS": faults} if faults else {}))
    p = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    return harness.Result(p.returncode, p.stdout, p.stderr, ckpt)


@pytest.mark.parametrize("registered", [True, False])
def test_ported_module_level_script_resumes_bit_identically(tmp_path: Path, registered: bool) -> None:
    (tmp_path / "train.py").write_text(SCRIPT)
    (tmp_path / "data.py").write_text(DATA)
    flag = f"--register_batch={int(registered)}"
    golden = _launch(tmp_path, "golden", flag)
    assert golden.rc == 0, golden.stderr[-4000:]
    expected = harness.digests(golden.snapshots())
    assert sorted(expected) == list(range(EVERY, STEPS + 1, EVERY))
    # rank 1 dies after step 12; the relaunch resumes from 10 with another logging interval.
    faulty = _launch(tmp_path, "faulty", flag, "--log_interval=3", faults="step_end@12:rank=1")
    assert faulty.status()["resumed_from_step"] == 10
    if registered:
        harness.assert_matches_golden(faulty, expected)
    else:
        assert faulty.rc == 0, faulty.stderr[-4000:]
        got = harness.digests(faulty.snapshots())
        assert got[10] == expected[10] and got[STEPS] != expected[STEPS]
