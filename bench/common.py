"""Shared helpers of the benchmark scripts: timing, machine description, RESULTS.md rows.

Every benchmark measures its numerator and denominator in the same process, one
right after the other, so a ratio is never a comparison with a number taken on
another day or machine.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_PATH = BENCH_DIR / "RESULTS.md"
NUM_THREADS = 2
"""Intra-op threads for every CPU measurement (the dev machine has 2 shared cores)."""


def setup_torch(num_threads: int = NUM_THREADS) -> None:
    """Fix the thread count and disable autograd for the whole process."""
    import torch

    torch.set_num_threads(num_threads)
    torch.set_grad_enabled(False)


def time_call(
    fn: Callable[[], object], *, num_repeats: int, num_warmup: int = 1
) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` in seconds over ``num_repeats`` runs, plus all samples."""
    for _ in range(num_warmup):
        fn()
    samples = []
    for _ in range(num_repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, num_repeats: int, num_warmup: int = 1
) -> dict[str, list[float]]:
    """Time several callables round-robin (A B A B ...) so load changes hit both alike."""
    for _ in range(num_warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(num_repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def spread(samples: list[float]) -> str:
    """``min..max`` of the samples relative to their median, e.g. ``-3%..+5%``."""
    median = statistics.median(samples)
    low = (min(samples) / median - 1) * 100
    high = (max(samples) / median - 1) * 100
    return f"{low:+.0f}%..{high:+.0f}%"


def machine_description() -> str:
    """CPU model, core count, torch version and the thread count used."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} threads"
    )


def record(title: str, command: str, body: str, *, label: str = "") -> None:
    """Append one section (title, command, machine, date, body) to bench/RESULTS.md."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    heading = f"### {title}" + (f" ({label})" if label else "")
    text = (
        f"\n{heading}\n\nCommand: `{command}`  \nMachine: {machine_description()}  \n"
        f"Date: {date}\n\n{body.rstrip()}\n"
    )
    with RESULTS_PATH.open("a") as handle:
        handle.write(text)
    print(f"[appended to {RESULTS_PATH.relative_to(REPO_ROOT)}]")


def command_line() -> str:
    """The command that reproduces the current run, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_text = str(script)
    return " ".join(["python", script_text, *sys.argv[1:]])


def add_common_arguments(parser) -> None:  # noqa: ANN001  (argparse.ArgumentParser)
    parser.add_argument(
        "--record", action="store_true", help="append the result to bench/RESULTS.md"
    )
    parser.add_argument("--label", default="", help="label of the RESULTS.md section")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
