"""Benchmark harness: our snapshots, mirror and recovery measured against their peers.

Run ``python -m bench [--quick] [--json PATH]`` from the repository root; see ``bench/README``
in the project README ("Benchmarks") for what each leg measures and its targets.
"""
