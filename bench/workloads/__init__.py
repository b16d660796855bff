"""Training scripts the recovery legs run under a launcher, and the harness that drives them.

``ours.py`` trains under ``orchestrator launch`` with :class:`trainer.Checkpointer`; ``plain.py``
is the baseline a user would otherwise write (plain ``torchrun``, ``torch.save`` every N steps,
``torch.load`` on start). Both train the same 2-rank DDP model of a given state size on data that
is a pure function of ``(seed, step, rank)``, so an interrupted run of either must end
bit-identical to an uninterrupted one. :mod:`bench.workloads.harness` launches them, injects
failures, reads their progress files and cleans every process up.
"""
