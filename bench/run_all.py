"""Entry command of the benchmark suite: run every benchmark, append the results to bench/RESULTS.md.

Each benchmark runs in its own Python process (so one's memory peak or thread pool does
not leak into the next) and is also runnable alone (see its docstring).

    python bench/run_all.py                          # everything, recorded
    python bench/run_all.py --only dit,stream        # a subset
    python bench/run_all.py --label "after fusions"  # label of the RESULTS.md sections
    python bench/run_all.py --no-record              # print only

Benchmarks: dit (1 + 2: DiT forward vs diffusers, roofline), stream (3: AR chunk),
e2e (4: T2V vs diffusers WanPipeline), vae (Wan VAE decode/encode vs
diffusers, the decoder behind 4), cp (5: bench_cp.py bytes + attention step and
bench_cp_step.py DiT step at CP 1 vs 2), cfg_parallel (CFG branches on two ranks vs
batched CFG at CP 2), overlap (runner.overlap_decode on vs off), memory (6: 200-chunk
RSS), startup (7), lora (LoRA swap / re-weight / forward, fused vs run-time), quantization (int8 weights and int8 / fp8 KV cache vs fp32), gpu (8: bench/gpu/bench_gpu.py; prints a message and exits on
machines without CUDA).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, REPO_ROOT, record  # noqa: E402

# name -> (script, records itself with --record / --label, title when run_all records it)
BENCHMARKS: dict[str, tuple[str, bool, str]] = {
    "dit": ("bench_dit.py", True, ""),
    "stream": ("bench_stream.py", True, ""),
    "e2e": ("bench_e2e.py", True, ""),
    "vae": ("bench_vae.py", True, ""),
    "cp": ("bench_cp.py", False, "Context parallel: bytes per rank and attention step"),
    "cp_step": ("bench_cp_step.py", False, "Context parallel: DiT step at CP 1 vs 2"),
    "cfg_parallel": (
        "bench_cfg_parallel.py",
        False,
        "CFG on 2 ranks: batched CFG + CP 2 vs cfg_parallel",
    ),
    "overlap": ("bench_overlap.py", False, "Rollout with runner.overlap_decode on vs off"),
    "memory": ("bench_memory.py", True, ""),
    "startup": ("bench_startup.py", True, ""),
    "lora": ("bench_lora.py", True, ""),
    "quantization": ("bench_quantization.py", True, ""),
    "gpu": ("gpu/bench_gpu.py", True, ""),
}
GROUPS = {"cp": ["cp", "cp_step"]}


def selected(only: str | None) -> list[str]:
    if not only:
        return list(BENCHMARKS)
    names: list[str] = []
    for name in only.split(","):
        name = name.strip()
        if name in GROUPS:
            names += GROUPS[name]
        elif name in BENCHMARKS:
            names.append(name)
        else:
            raise ValueError(
                f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)} (cp runs both "
                "CP scripts)"
            )
    return names


def run_one(name: str, *, record_results: bool, label: str) -> int:
    script, records_itself, title = BENCHMARKS[name]
    path = BENCH_DIR / script
    argv = [sys.executable, str(path)]
    if records_itself and record_results:
        argv.append("--record")
        if label:
            argv += ["--label", label]
    print(f"\n===== {name}: {' '.join(argv[1:])}", flush=True)
    start = time.perf_counter()
    completed = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    print(completed.stdout, end="")
    if completed.returncode != 0:
        print(completed.stderr[-4000:], file=sys.stderr)
        print(f"===== {name} FAILED (exit {completed.returncode}) after {elapsed:.0f} s")
        return completed.returncode
    if not records_itself and record_results:
        body = f"```\n{completed.stdout.strip()}\n```"
        record(title, f"python bench/{script}", body, label=label)
    print(f"===== {name} done in {elapsed:.0f} s", flush=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=None, help=f"comma list of {', '.join(BENCHMARKS)}")
    parser.add_argument("--label", default="", help="label of the RESULTS.md sections")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    failures = [
        name
        for name in selected(args.only)
        if run_one(name, record_results=not args.no_record, label=args.label) != 0
    ]
    if failures:
        sys.exit(f"failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
