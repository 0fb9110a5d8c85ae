"""Benchmark 7: start-up wall time of ``flashdreams-run --help`` and ``import flashdreams``,
each divided by ``python -c "import torch"`` measured in the same run.

Each command runs as a fresh subprocess, round-robin (torch, flashdreams, --help, torch,
...) so a load change on the machine hits all three alike; medians over the repeats.

    python bench/bench_startup.py [--record] [--repeats N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_common_arguments,
    command_line,
    record,
    spread,
    time_interleaved,
)


def commands() -> dict[str, list[str]]:
    cli = shutil.which("flashdreams-run")
    if cli is None:
        raise FileNotFoundError(
            "flashdreams-run is not on PATH; install the project with `pip install -e .`"
        )
    return {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        'python -c "import flashdreams"': [sys.executable, "-c", "import flashdreams"],
        "flashdreams-run --help": [cli, "--help"],
    }


def run(num_repeats: int = 7) -> dict[str, list[float]]:
    def runner(argv: list[str]):
        return lambda: subprocess.run(argv, check=True, capture_output=True)

    return time_interleaved(
        {name: runner(argv) for name, argv in commands().items()}, num_repeats=num_repeats
    )


def format_result(samples: dict[str, list[float]]) -> str:
    baseline_name = 'python -c "import torch"'
    baseline = statistics.median(samples[baseline_name])
    lines = ["| command | median s | spread | / import torch |", "|---|---|---|---|"]
    for name, values in samples.items():
        median = statistics.median(values)
        lines.append(f"| `{name}` | {median:.3f} | {spread(values)} | {median / baseline:.2f} |")
    lines.append("")
    lines.append(f"Median of {len(samples[baseline_name])} fresh processes each, interleaved.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    args = parser.parse_args()
    text = format_result(run(num_repeats=args.repeats or 7))
    print(text)
    if args.record:
        record("Start-up time", command_line(), text, label=args.label)


if __name__ == "__main__":
    main()
