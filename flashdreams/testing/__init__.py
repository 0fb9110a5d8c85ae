"""Helpers for tests and benchmarks of code that runs on several ranks (CPU, gloo)."""

from flashdreams.testing.distributed import find_free_port, run_on_ranks

__all__ = ["find_free_port", "run_on_ranks"]
