"""Safety pieces of the runner (flashdreams.runner.safety) and a 1,000-chunk rollout.

Atomic files, the SIGTERM guard, the non-finite check, rank-failure notices
through a real TCPStore, fault-injection parsing, unsafe checkpoints, and a
long sink + window rollout with flat memory and flat time per chunk.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from flashdreams.runner.safety import (
    FailureReport,
    PeerRankFailed,
    RankFailureChannel,
    RunInterrupted,
    StopGuard,
    atomic_write_text,
    parse_fault_injection,
)
from flashdreams.session import NonFiniteOutputError, check_finite

# ---- atomic files ------------------------------------------------------------------


def test_atomic_write_renames_a_complete_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "stats.json"
    target.write_text("old")
    renames = []
    real_replace = os.replace

    def spy_replace(source, destination):
        renames.append((Path(source), Path(destination), Path(source).read_text()))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", spy_replace)
    atomic_write_text(target, '{"status": "completed"}\n')
    ((source, destination, content),) = renames
    assert destination == target and source.parent == tmp_path and source != target
    assert content == '{"status": "completed"}\n'  # complete before the rename
    assert target.read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]  # no temporary left


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    target.write_text("old: 1\n")

    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new: 2\n")
    assert target.read_text() == "old: 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_runner_writes_config_and_stats_atomically(tmp_path, monkeypatch):
    """config.yaml and stats.json of a real (tiny) run both arrive through os.replace."""
    from flashdreams.launch.app import run
    from flashdreams.launch.cli import compose

    renamed = []
    real_replace = os.replace

    def spy_replace(source, destination):
        renamed.append(Path(destination).name)
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.chdir(tmp_path)
    container = compose(
        "wan-tiny-t2v",
        ["runner.height=32", "runner.width=32", "runner.num_chunks=1", "runner.output_dir=run"],
    )
    stats = run(container)
    # config.yaml, the stats placeholder that reserves disk space, the final stats.
    assert renamed == ["config.yaml", "stats.json", "stats.json"]
    assert json.loads((tmp_path / "run" / "stats.json").read_text())["status"] == "completed"
    assert stats["status"] == "completed" and stats["last_completed_chunk"] == 0


# ---- SIGTERM guard -------------------------------------------------------------------


def test_sigterm_raises_run_interrupted_and_handler_is_restored():
    previous = signal.getsignal(signal.SIGTERM)
    with StopGuard() as guard:
        with pytest.raises(RunInterrupted, match="interrupted by SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises before this ends
        assert guard.interrupted
    assert signal.getsignal(signal.SIGTERM) is previous


def test_sigterm_is_held_back_inside_a_critical_section():
    steps = []
    with StopGuard() as guard:
        with pytest.raises(RunInterrupted):
            with guard.critical():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                steps.append("chunk appended")  # still runs: the whole chunk is written
            steps.append("after")  # never runs
    assert steps == ["chunk appended"]


def test_request_stop_from_another_thread_reaches_the_main_thread():
    report = FailureReport(rank=1, autoregressive_index=3, stage="generate", message="X: boom")
    with StopGuard() as guard:
        with pytest.raises(PeerRankFailed, match="stopping because rank 1 failed at AR step 3"):
            threading.Timer(0.05, guard.request_stop, args=(PeerRankFailed(report),)).start()
            time.sleep(5)
        assert not guard.interrupted  # not a real SIGTERM


# ---- non-finite output -----------------------------------------------------------------


def test_check_finite():
    check_finite(torch.zeros(2, 3), 0)
    check_finite(None, 0)
    latent = torch.zeros(2, 3)
    latent[1, 2] = float("inf")
    latent[0, 0] = float("nan")
    with pytest.raises(NonFiniteOutputError) as error:
        check_finite(latent, 7)
    assert str(error.value).startswith(
        "AR step 7: the generated latent holds 2 NaN/Inf value(s) out of 6"
    )
    assert "runner.check_finite=false" in str(error.value)


# ---- rank failure notices ---------------------------------------------------------------


def test_failure_channel_notifies_the_other_rank_through_a_store():
    from torch.distributed import TCPStore

    server = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10))
    client = TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=10))
    report = FailureReport(rank=1, autoregressive_index=2, stage="write", message="OSError: x")
    with StopGuard() as guard:
        watcher = RankFailureChannel(server, rank=0, guard=guard, poll_interval_s=0.02)
        failing = RankFailureChannel(client, rank=1, guard=StopGuard(), poll_interval_s=0.02)
        watcher.start()
        try:
            with pytest.raises(PeerRankFailed) as error:
                failing.post(report)
                failing.post(FailureReport(rank=1, autoregressive_index=3, stage="x", message="y"))
                time.sleep(5)
        finally:
            watcher.stop()
    assert error.value.report == report  # the first failure is the one reported
    assert str(error.value) == "stopping because rank 1 failed at AR step 2 (write): OSError: x"
    assert watcher.peer_failure == report and failing.read() == report


# ---- fault injection -------------------------------------------------------------------


def test_fault_injection_parsing():
    assert parse_fault_injection(None) is None
    injection = parse_fault_injection("rank=1,step=2,stage=generate")
    assert (injection.rank, injection.step, injection.stage, injection.kind) == (
        1,
        2,
        "generate",
        "error",
    )
    with pytest.raises(ValueError, match="stage must be one of generate, write, finalize"):
        parse_fault_injection("rank=1,step=2,stage=decode")
    with pytest.raises(ValueError, match="use rank=<r>,step=<k>"):
        parse_fault_injection("rank=1,step=2")


# ---- unsafe checkpoints -----------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_unsafe_pth_is_refused_and_its_code_never_runs(tmp_path):
    from flashdreams.core.checkpoint import load_checkpoint

    marker = tmp_path / "ran"
    path = tmp_path / "model.pth"
    torch.save({"weight": torch.ones(2), "payload": _RunsCode(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(ValueError) as error:
        load_checkpoint(path)
    assert str(error.value).startswith(
        f"refusing to load '{path}': it contains pickled objects other than tensors, and "
        "unpickling them could run arbitrary code."
    )
    assert not marker.exists()
    torch.save({"weight": torch.ones(2)}, tmp_path / "plain.pth")  # tensors only: fine
    assert load_checkpoint(tmp_path / "plain.pth")["weight"].equal(torch.ones(2))


# ---- 1,000-chunk rollout ---------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


@torch.no_grad()
def test_1000_chunk_rollout_has_flat_memory_and_time():
    """Sink + window cache over 1,000 AR chunks: RSS and time per chunk stay flat.

    Tiny DiT, 1 latent frame of 2x2 per chunk, 1 denoising step, no VAE. RSS is
    read from /proc/self/statm at the window fill plus 100 warm-up chunks and at
    the end (<= 1.05x). Time per chunk is compared between chunks 100-199 and the
    best of the four blocks 600-699 ... 900-999, each block by its lower quartile
    (other processes on a shared 2-core machine only ever add time, so the lower
    quartile and the best block are the stable statistics), <= 1.1x.
    """
    from flashdreams.infra.diffusion.model import DiffusionModelConfig
    from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
    from flashdreams.recipes.wan.transformer import Wan21TransformerConfig, WanDiTNetworkTinyConfig

    torch.manual_seed(0)
    sink_t, window_t, num_chunks = 1, 3, 1000
    model = (
        DiffusionModelConfig(
            transformer=Wan21TransformerConfig(
                network=WanDiTNetworkTinyConfig(),
                dtype=torch.float32,
                len_t=1,
                window_size_t=window_t,
                sink_size_t=sink_t,
                compile_network=False,
                use_cuda_graph=False,
            ),
            scheduler=FlowMatchSchedulerConfig(num_inference_steps=1, denoising_timesteps=[1000]),
            seed=0,
        )
        .setup()
        .eval()
    )
    text = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))
    cache = model.transformer.initialize_autoregressive_cache(
        height=2, width=2, text_embeddings=text
    )
    warm_index = sink_t + window_t + 100
    seconds, rss_warm = [], None
    for index in range(num_chunks):
        started = time.perf_counter()
        clean, final_state = model.generate(index, cache)
        check_finite(final_state.clean_latent, index)  # on by default in the runner
        model.finalize(final_state)
        seconds.append(time.perf_counter() - started)
        if index == warm_index:
            rss_warm = _rss_bytes()
    rss_end = _rss_bytes()
    assert clean.shape[-2:] == (2, 2) and torch.isfinite(clean).all()
    assert rss_end <= 1.05 * rss_warm, (
        f"RSS grew {rss_warm / 2**20:.1f} -> {rss_end / 2**20:.1f} MiB"
    )

    def lower_quartile(block: list[float]) -> float:
        return statistics.quantiles(block, n=4)[0]

    # A cost that grows with the chunk index slows every late block; a burst of load
    # from other processes slows one, so the late side takes the best of four blocks.
    start = lower_quartile(seconds[100:200])
    end = min(lower_quartile(seconds[first : first + 100]) for first in (600, 700, 800, 900))
    assert end <= 1.1 * start, f"time per chunk {start * 1e3:.2f} ms -> {end * 1e3:.2f} ms"


# ---- stop requests inside the rollout, full disks ------------------------------------------


def test_deferred_stop_is_recorded_then_a_second_signal_raises():
    with StopGuard() as guard:
        with guard.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert guard.stop_signal == signal.SIGINT and guard.received_at is not None
            with pytest.raises(RunInterrupted, match="interrupted by SIGINT") as error:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)
    assert error.value.exit_code == 130


def test_stats_fit_in_the_reserved_file_when_the_disk_is_full(tmp_path):
    from flashdreams.runner.safety import (
        STATS_RESERVED_BYTES,
        reserved_stats_text,
        write_stats_in_place,
    )

    path = tmp_path / "stats.json"
    path.write_text(reserved_stats_text("demo"))
    assert json.loads(path.read_text()) == {"status": "running", "pipeline": "demo"}
    stats = {"status": "failed", "num_chunks_written": 3, "chunks": [{"i": "x" * 100}] * 2000}
    assert write_stats_in_place(path, stats)
    assert path.stat().st_size == STATS_RESERVED_BYTES  # not one byte more disk
    saved = json.loads(path.read_text())
    assert saved["status"] == "failed" and saved["num_chunks_written"] == 3
    assert "chunks" not in saved and "details_dropped" in saved


def test_mp4_writer_cuts_back_to_the_last_whole_chunk_when_a_write_fails(tmp_path, monkeypatch):
    """A write error after two chunks leaves exactly those two chunks, decodable."""
    import numpy as np

    from flashdreams.runner import video
    from flashdreams.runner.safety import OutputWriteError

    writer = video.Mp4Writer(tmp_path / "v.mp4", fps=8.0)
    rng = np.random.default_rng(0)
    for num_frames in (5, 8):
        writer.append(rng.integers(0, 255, (num_frames, 16, 16, 3), dtype=np.uint8))
    writer._process.stdin.flush()
    deadline = time.monotonic() + 30
    while writer.num_chunks_on_disk < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    real_write = os.write

    def failing_write(fd, data):
        if fd == writer._fd and writer.num_chunks_on_disk >= 2:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(video.os, "write", failing_write)
    writer.append(rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(OutputWriteError, match="no space left on device writing .*v.mp4"):
        writer.close()
    assert writer.num_chunks_appended == 3 and writer.num_chunks_on_disk == 2
    assert video.read_mp4(tmp_path / "v.mp4")[0].shape == (13, 16, 16, 3)
