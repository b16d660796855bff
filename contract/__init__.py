"""The contract between the supervisor and its workers, and the pieces both sides share.

The supervisor (``orchestrator``, never imports torch) and the ranks (``trainer``) run in
different processes and talk only through environment variables, files in the checkpoint dir
and exit codes. Everything both sides must agree on is defined here once: run-dir paths
(:mod:`contract.paths`), the documents stored there (:mod:`contract.documents`), exit codes and
phases (:mod:`contract.codes`), the worker environment (:mod:`contract.env`) and the registry of
every ``ORCH_*`` variable (:mod:`contract.settings`); plus what both sides use alike: atomic
small-file writes (:mod:`contract.atomic`), structured logging (:mod:`contract.logs`),
background work whose errors reach the owner (:mod:`contract.threads`), bounded polling
(:mod:`contract.polling`) and test-only fault injection (:mod:`contract.faults`). This package depends on the standard
library and structlog only; ``storage``, ``trainer`` and ``orchestrator`` build on it.
"""
