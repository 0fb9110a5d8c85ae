"""Benchmark: a session through flashdreams-serve vs the same session driven in-process.

The same config (wan-tiny-t2v at ``--size`` x ``--size`` pixels, random weights, CPU,
``--threads`` intra-op threads) runs
``--chunks``-chunk sessions two ways, alternated ``--repeats`` times after one warm-up each:

* in-process: ``Session.open`` + ``step()`` per chunk + the uint8 frames of each chunk;
* served: a ``flashdreams-serve`` process on a free loopback port; a WebSocket client sends
  ``start`` and receives the chunk messages and JPEG frames.

Reported: time to first frame (open / ``start`` sent -> first frame in hand) and the
per-chunk latency (time between the completion of consecutive chunks: the last frame of a
chunk in hand) p50 / p95, and the serving overhead per chunk = served p50 / in-process
p50 - 1 (target <= 5% at a size where a chunk takes >= 100 ms).

    python bench/bench_serve.py [--size 128] [--threads 1] [--chunks 6] [--repeats 6]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, command_line, machine_description, setup_torch  # noqa: E402

PROMPT = "A red panda rolls down a grassy hill at sunset."


def percentile(values: list[float], q: float) -> float:
    from flashdreams.session.telemetry import percentile as nearest_rank

    return nearest_rank(values, q)


def build_in_process(size: int):
    from flashdreams.launch.cli import compose
    from flashdreams.launch.run_config import build_run_config
    from flashdreams.runner.runner import RunContext

    run_config = build_run_config(
        compose("wan-tiny-t2v", [f"runner.height={size}", f"runner.width={size}"])
    )
    runner = run_config.runner.setup(
        pipeline_config=run_config.pipeline,
        context=RunContext(run_dir=Path(tempfile.mkdtemp())),
    )
    pipeline = runner.build_pipeline()
    return pipeline, runner._latent_size(pipeline, size, size)


def in_process_session(pipeline, latent_size, num_chunks: int) -> tuple[float, list[float]]:
    from flashdreams.session import Session
    from flashdreams.session.frames import video_to_uint8_frames

    started = time.perf_counter()
    session = Session.open(pipeline, prompt=PROMPT, height=latent_size[0], width=latent_size[1])
    done = []
    for _ in range(num_chunks):
        video = session.step().video
        video_to_uint8_frames(video.reshape(-1, *video.shape[-4:])[0])
        done.append(time.perf_counter())
    session.close()
    return done[0] - started, [b - a for a, b in zip(done, done[1:])]


def start_server(size: int, threads: int) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [sys.executable, "-m", "flashdreams.serve", "wan-tiny-t2v", f"runner.height={size}",
         f"runner.width={size}", "--port", "0"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    for line in process.stderr:
        match = re.search(r"listening on http://(\S+)/", line)
        if match:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, match.group(1)
    raise RuntimeError("the server did not start")


def served_session(address: str, num_chunks: int) -> tuple[float, list[float], list[float]]:
    """(time to first frame, per-chunk latencies, the server's own chunk times)."""
    from websockets.sync.client import connect

    with connect(f"ws://{address}/v1/sessions", max_size=None) as ws:
        started = time.perf_counter()
        ws.send(json.dumps({"type": "start", "prompt": PROMPT, "num_chunks": num_chunks}))
        first_frame, done, server_s, remaining = None, [], [], 0
        while True:
            received = ws.recv()
            if isinstance(received, bytes):
                first_frame = first_frame or time.perf_counter()
                remaining -= 1
                if remaining == 0:
                    done.append(time.perf_counter())
                continue
            message = json.loads(received)
            if message["type"] == "chunk":
                remaining = message["num_frames"]
                server_s.append(message["timings"]["total_s"])
            elif message["type"] in ("ended", "error"):
                assert message.get("reason") == "completed", message
                break
    return first_frame - started, [b - a for a, b in zip(done, done[1:])], server_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of both paths (1: no OpenMP barrier stalls on shared cores)",
    )
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    setup_torch(args.threads)
    pipeline, latent_size = build_in_process(args.size)
    process, address = start_server(args.size, args.threads)
    try:
        in_process_session(pipeline, latent_size, 2)  # warm-up
        served_session(address, 2)
        results = {"in-process": ([], []), "served": ([], [])}
        server_chunk_s: list[float] = []
        for _ in range(args.repeats):
            ttff, chunks = in_process_session(pipeline, latent_size, args.chunks)
            results["in-process"][0].append(ttff)
            results["in-process"][1].extend(chunks)
            ttff, chunks, server_s = served_session(address, args.chunks)
            results["served"][0].append(ttff)
            results["served"][1].extend(chunks)
            server_chunk_s.extend(server_s[1:])
    finally:
        process.terminate()
        process.wait(60)
    print(f"Command: `{command_line()}`")
    print(f"Machine: {machine_description()}")
    print(
        f"{args.repeats} x {args.chunks}-chunk sessions each way, {args.size}x{args.size} px, "
        f"{args.threads} thread(s)\n"
    )
    print("| path | time to first frame ms, p50 | chunk ms p50 | chunk ms p95 |")
    print("|---|---|---|---|")
    for name, (ttffs, chunks) in results.items():
        print(f"| {name} | {percentile(ttffs, 50) * 1e3:.1f} | "
              f"{percentile(chunks, 50) * 1e3:.1f} | {percentile(chunks, 95) * 1e3:.1f} |")  # fmt: skip
    base = percentile(results["in-process"][1], 50)
    served = percentile(results["served"][1], 50)
    print(
        f"\nserving overhead per chunk (p50): {(served / base - 1) * 100:+.1f}% "
        f"({(served - base) * 1e3:+.1f} ms of {base * 1e3:.1f} ms); the server's own step "
        f"p50 {percentile(server_chunk_s, 50) * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
