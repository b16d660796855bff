"""Run a module-level training script (no ``main()``) as a worker: ``python -m trainer.script``.

``python -m trainer.script train.py --batch_size 32`` runs ``train.py`` exactly as ``python
train.py --batch_size 32`` would, but under :func:`trainer.run`'s handler (error files, exit
codes, preemption on SIGTERM): see :func:`trainer.runtime.run_script`. Under torchrun::

    torchrun --nproc-per-node 2 -m trainer.script train.py --batch_size 32

Under ``orchestrator launch``, ``--wrap`` puts this module's file (which ``python -m
trainer.script --path`` prints) before the script::

    orchestrator launch --checkpoint-dir /ckpt --nproc-per-node 2 --wrap train.py --batch_size 32
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NoReturn

USAGE = "usage: python -m trainer.script SCRIPT [ARGS...]   (or: python -m trainer.script --path)"


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``argv[0]`` with the rest of ``argv`` as its arguments (default: ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--path"] and len(args) == 1:
        print(os.path.abspath(__file__))
        raise SystemExit(0)
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE)
        print(__doc__)
        raise SystemExit(0)

    from trainer.errors import UsageError
    from trainer.runtime import run, run_script

    if not args:

        def missing() -> None:
            raise UsageError(f"no training script given; {USAGE}")

        run(missing)
    run_script(args[0], args[1:])


if __name__ == "__main__":
    main()
