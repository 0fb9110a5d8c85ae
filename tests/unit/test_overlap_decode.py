"""runner.overlap_decode: chunk i decoded and written on a background thread while chunk i+1 is denoised.

A tiny random-weight Wan T2V pipeline on CPU, driven by the real Runner: the video
frames and the latents must be bit-identical to the sequential order, a failing
background decode must name its AR step and keep the chunks before it, and the
pipeline's split API (``generate_latent`` + ``decode_latent``) must equal ``generate``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from flashdreams.infra.diffusion.model import DiffusionModelConfig
from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
from flashdreams.recipes.wan import (
    UMT5TextEncoderConfig,
    Wan21TransformerConfig,
    WanDiTNetworkTinyConfig,
    WanInferencePipelineConfig,
    WanVAEDecoderConfig,
)
from flashdreams.runner import video as video_module
from flashdreams.runner.runner import RunContext, Runner, RunnerConfig
from flashdreams.runner.safety import FAULT_INJECTION_ENV, InjectedFault
from flashdreams.runner.video import read_mp4
from flashdreams.session.worker import BackgroundChunkWorker, ChunkDecodeError

HEIGHT, WIDTH = 32, 48  # pixels: latent 4 x 6 with the tiny VAE's 8x compression
NUM_CHUNKS = 4
LEN_T = 2  # latent frames per chunk


def tiny_t2v_config() -> WanInferencePipelineConfig:
    return WanInferencePipelineConfig(
        name="wan-tiny-overlap-test",
        diffusion_model=DiffusionModelConfig(
            transformer=Wan21TransformerConfig(
                network=WanDiTNetworkTinyConfig(),
                dtype=torch.float32,
                checkpoint_path=None,
                len_t=LEN_T,
                window_size_t=4,
                sink_size_t=0,
                compile_network=False,
                use_cuda_graph=False,
            ),
            scheduler=FlowMatchSchedulerConfig(
                num_inference_steps=2, shift=5.0, denoising_timesteps=[1000, 500]
            ),
            seed=0,
        ),
        decoder=WanVAEDecoderConfig(
            checkpoint_path=None, dtype=torch.float32, base_dim=8, use_cuda_graph=False
        ),
        text_encoder=UMT5TextEncoderConfig(
            checkpoint_path=None,
            tokenizer_path="builtin:bytes",
            text_len=32,
            dtype=torch.float32,
            model_dim=32,
            num_layers=1,
            num_heads=2,
            ffn_dim=64,
            vocab_size=300,
        ),
    )


def frames_of(num_chunks: int) -> int:
    """Causal Wan VAE: 1 frame for the first latent frame, 4 for every later one."""
    return 1 + 4 * (num_chunks * LEN_T - 1)


class RecordingRunner(Runner):
    """The real runner; ``break_decode_at`` makes the pipeline's decode raise at that AR step,
    ``slow_finalize_s`` makes every ``finalize`` that much slower (so the worker finishes a
    chunk before the main thread does)."""

    break_decode_at: int | None = None
    slow_finalize_s: float = 0.0

    def build_pipeline(self):
        pipeline = super().build_pipeline()
        if self.slow_finalize_s:
            finalize = pipeline.finalize

            def slow_finalize(autoregressive_index, cache):
                time.sleep(self.slow_finalize_s)
                return finalize(autoregressive_index, cache)

            pipeline.finalize = slow_finalize
        if self.break_decode_at is not None:
            decode_latent = pipeline.decode_latent
            broken = self.break_decode_at

            def failing_decode(latent, autoregressive_index, cache):
                if autoregressive_index == broken:
                    raise RuntimeError("VAE exploded")
                return decode_latent(latent, autoregressive_index, cache)

            pipeline.decode_latent = failing_decode
        return pipeline


def make_runner(
    run_dir: Path,
    *,
    break_decode_at: int | None = None,
    slow_finalize_s: float = 0.0,
    **runner_fields,
) -> RecordingRunner:
    defaults = dict(
        prompt="a red ball", num_chunks=NUM_CHUNKS, height=HEIGHT, width=WIDTH, save_latents=True
    )
    runner = RecordingRunner(
        RunnerConfig(**(defaults | runner_fields)),
        pipeline_config=tiny_t2v_config(),
        context=RunContext(run_dir=run_dir),
    )
    runner.break_decode_at = break_decode_at
    runner.slow_finalize_s = slow_finalize_s
    return runner


@pytest.fixture
def appended_frames(monkeypatch):
    """Every frame array handed to ``Mp4Writer.append``, with the thread that appended it."""
    calls: list[tuple[np.ndarray, str]] = []
    original = video_module.Mp4Writer.append

    def spy(self, frames):
        calls.append((frames.copy(), threading.current_thread().name))
        original(self, frames)

    monkeypatch.setattr(video_module.Mp4Writer, "append", spy)
    return calls


def test_overlap_is_bit_identical_to_sequential(tmp_path, appended_frames):
    sequential_stats = make_runner(tmp_path / "sequential").run()
    sequential_calls = list(appended_frames)
    appended_frames.clear()
    # A slow finalize: each chunk is written by the worker before this thread finishes it.
    overlap_runner = make_runner(tmp_path / "overlap", overlap_decode=True, slow_finalize_s=0.1)
    overlap_stats = overlap_runner.run()
    overlap_calls = list(appended_frames)

    assert len(sequential_calls) == len(overlap_calls) == NUM_CHUNKS
    for (expected, _), (actual, _) in zip(sequential_calls, overlap_calls, strict=True):
        np.testing.assert_array_equal(actual, expected)
    assert {thread for _, thread in sequential_calls} == {"MainThread"}
    assert {thread for _, thread in overlap_calls} == {"flashdreams-chunk-worker"}

    sequential_latents = load_file(str(tmp_path / "sequential" / "latents.safetensors"))
    overlap_latents = load_file(str(tmp_path / "overlap" / "latents.safetensors"))
    assert torch.equal(sequential_latents["latents"], overlap_latents["latents"])
    sequential_video, _ = read_mp4(tmp_path / "sequential" / "video.mp4")
    overlap_video, _ = read_mp4(tmp_path / "overlap" / "video.mp4")
    assert overlap_video.shape == (frames_of(NUM_CHUNKS), HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(overlap_video, sequential_video)

    assert overlap_stats["status"] == "completed"
    assert overlap_stats["num_chunks_written"] == NUM_CHUNKS
    assert overlap_stats["last_completed_chunk"] == NUM_CHUNKS - 1
    for sequential_chunk, overlap_chunk in zip(
        sequential_stats["chunks"], overlap_stats["chunks"], strict=True
    ):
        assert overlap_chunk["num_frames"] == sequential_chunk["num_frames"]
        assert overlap_chunk["decode_s"] > 0 and overlap_chunk["write_s"] > 0
        assert overlap_chunk["wait_s"] >= 0
        assert "decode_s" not in sequential_chunk and "wait_s" not in sequential_chunk
    assert overlap_stats["first_chunk_latency_s"] > 0
    assert overlap_stats["steady_fps"] > 0


def test_background_decode_failure_names_the_chunk_and_keeps_the_earlier_ones(
    tmp_path, appended_frames
):
    runner = make_runner(tmp_path, overlap_decode=True, break_decode_at=2, num_chunks=5)
    with pytest.raises(ChunkDecodeError) as raised:
        runner.run()
    assert str(raised.value) == (
        "AR step 2: decoding or writing this chunk failed in the background worker "
        "(runner.overlap_decode=true): RuntimeError: VAE exploded"
    )
    assert raised.value.autoregressive_index == 2
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert (runner.progress.autoregressive_index, runner.progress.stage) == (2, "decode")

    assert len(appended_frames) == 2  # nothing written after the failed chunk
    video, _ = read_mp4(tmp_path / "video.mp4")
    assert video.shape[0] == frames_of(2)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["status"] == "failed"
    assert stats["error"].startswith("ChunkDecodeError: AR step 2: decoding or writing")
    assert stats["num_chunks_written"] == 2 and stats["last_completed_chunk"] == 1


def test_profiling_with_overlap_times_the_decode_on_the_worker(tmp_path):
    stats = make_runner(tmp_path, overlap_decode=True, profile=True, num_chunks=2).run()
    for chunk in stats["chunks"]:
        # The pipeline's profile covers this thread's stages; the worker times the decode.
        assert set(chunk["profile"]) >= {"diffuse_ms", "finalize_ms", "total_ms"}
        assert "decode_ms" not in chunk["profile"]
        assert chunk["decode_s"] > 0


@pytest.mark.parametrize("overlap_decode", [False, True])
def test_main_thread_failure_keeps_the_chunks_already_handed_over(
    tmp_path, monkeypatch, overlap_decode
):
    """A fault in finalize(2): chunk 2 was already written (or handed over), so 3 chunks stay."""
    monkeypatch.setenv(FAULT_INJECTION_ENV, "rank=0,step=2,stage=finalize")
    runner = make_runner(tmp_path, overlap_decode=overlap_decode)
    with pytest.raises(InjectedFault):
        runner.run()
    assert runner.progress.stage == "finalize"
    video, _ = read_mp4(tmp_path / "video.mp4")
    assert video.shape[0] == frames_of(3)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["num_chunks_written"] == 3 and stats["last_completed_chunk"] == 1


def test_overlap_needs_a_pipeline_with_the_split_api(tmp_path):
    class NoSplitRunner(Runner):
        def build_pipeline(self):
            return nn.Module()

    runner = NoSplitRunner(
        RunnerConfig(height=HEIGHT, width=WIDTH, overlap_decode=True),
        pipeline_config=SimpleNamespace(name="legacy"),
        context=RunContext(run_dir=tmp_path),
    )
    with pytest.raises(ValueError) as raised:
        runner.run()
    assert str(raised.value) == (
        "runner.overlap_decode=true needs a pipeline with generate_latent() and decode_latent() "
        "(every StreamInferencePipeline has them); pipeline 'legacy' (Module) lacks "
        "generate_latent and decode_latent. Set runner.overlap_decode=false"
    )


# ---- the pipeline's split API ---------------------------------------------------------------


def build_tiny_pipeline_and_cache():
    torch.manual_seed(0)
    pipeline = tiny_t2v_config().setup().eval()
    # The text encoder is built (random weights) inside initialize_cache: same seed there too.
    return pipeline, pipeline.initialize_cache(["a red ball"], height=4, width=6)


def test_generate_latent_then_decode_latent_equals_generate():
    whole, whole_cache = build_tiny_pipeline_and_cache()
    split, split_cache = build_tiny_pipeline_and_cache()
    expected_videos, split_videos, latents = [], [], []
    for index in range(3):
        expected_videos.append(whole.generate(index, whole_cache))
        whole.finalize(index, whole_cache)
        latents.append(split.generate_latent(index, split_cache))
        assert latents[-1].shape == (1, LEN_T, 16, 4, 6)
        split.finalize(index, split_cache)
        if index > 0:  # decode one step behind, as the background worker does
            split_videos.append(split.decode_latent(latents[index - 1], index - 1, split_cache))
    split_videos.append(split.decode_latent(latents[2], 2, split_cache))
    for expected, actual in zip(expected_videos, split_videos, strict=True):
        assert torch.equal(actual, expected)


def test_decode_latent_must_follow_ar_order():
    pipeline, cache = build_tiny_pipeline_and_cache()
    latent = pipeline.generate_latent(0, cache)
    with pytest.raises(ValueError) as raised:
        pipeline.decode_latent(latent, 1, cache)
    assert str(raised.value) == (
        "decode out of order: the previous decoded step was None, so the next "
        "decode_latent must be for AR step 0, got 1"
    )
    pipeline.decode_latent(latent, 0, cache)
    pipeline.finalize(0, cache)
    with pytest.raises(ValueError) as raised:
        pipeline.decode_latent(latent, 1, cache)
    assert str(raised.value) == (
        "decode_latent(1) called before generate_latent(1): the latest generated AR step is 0"
    )


# ---- the worker on its own ---------------------------------------------------------------------


def test_worker_runs_jobs_in_order_and_skips_the_ones_after_a_failure():
    worker = BackgroundChunkWorker("cpu", max_pending=8)
    done: list[int] = []
    release = threading.Event()

    def job(index: int):
        def run_job():
            release.wait(5)
            if index == 2:
                raise KeyError("no such frame")
            done.append(index)

        return run_job

    for index in range(5):
        worker.submit(index, job(index))
    release.set()
    worker.drain()
    assert done == [0, 1]
    with pytest.raises(ChunkDecodeError) as raised:
        worker.submit(5, job(5))
    assert str(raised.value) == (
        "AR step 2: decoding or writing this chunk failed in the background worker "
        "(runner.overlap_decode=true): KeyError: 'no such frame'"
    )
    worker.close()
    assert not worker._thread.is_alive()
