"""CUDA-only (skipped without a GPU): runner.overlap_decode decodes on its own stream and
gives the same video and latents as the sequential order.

Both runs share one process, and cuDNN autotuning (which the Wan VAE switches on) is on
from the start, so every convolution uses the same algorithm in both runs: the outputs
must be bit-identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
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
from flashdreams.runner.runner import RunContext, Runner, RunnerConfig
from flashdreams.runner.video import read_mp4

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

HEIGHT, WIDTH = 64, 96


def tiny_t2v_config(*, use_cuda_graph: bool) -> WanInferencePipelineConfig:
    return WanInferencePipelineConfig(
        name="wan-tiny-overlap-gpu",
        diffusion_model=DiffusionModelConfig(
            transformer=Wan21TransformerConfig(
                network=WanDiTNetworkTinyConfig(),
                dtype=torch.float32,
                checkpoint_path=None,
                len_t=2,
                window_size_t=4,
                sink_size_t=0,
                compile_network=False,
                use_cuda_graph=use_cuda_graph,
            ),
            scheduler=FlowMatchSchedulerConfig(
                num_inference_steps=2, shift=5.0, denoising_timesteps=[1000, 500]
            ),
            seed=0,
        ),
        # use_cuda_graph on the VAE means torch.compile (minutes): eager here.
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


class StreamRecordingRunner(Runner):
    """Records the CUDA stream every ``decode_latent`` ran on."""

    decode_streams: list[torch.cuda.Stream]

    def build_pipeline(self):
        pipeline = super().build_pipeline()
        decode_latent = pipeline.decode_latent
        self.decode_streams = []

        def recording_decode(latent, autoregressive_index, cache):
            self.decode_streams.append(torch.cuda.current_stream(latent.device))
            return decode_latent(latent, autoregressive_index, cache)

        pipeline.decode_latent = recording_decode
        return pipeline


@pytest.fixture
def cudnn_autotuning():
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cudnn.benchmark = previous


# The DiT's CUDA graph is captured at AR step 3 (denoise) and 4 (KV commit) while the
# worker decodes the previous chunk: 6 chunks reach both captures.
@pytest.mark.parametrize("use_cuda_graph", [False, True], ids=["eager", "cuda-graph-dit"])
def test_overlap_on_cuda_equals_sequential(tmp_path, cudnn_autotuning, use_cuda_graph):
    runs = {}
    for overlap in (False, True):
        run_dir = tmp_path / ("overlap" if overlap else "sequential")
        runner = StreamRecordingRunner(
            RunnerConfig(
                prompt="a red ball",
                num_chunks=6,
                height=HEIGHT,
                width=WIDTH,
                save_latents=True,
                overlap_decode=overlap,
            ),
            pipeline_config=tiny_t2v_config(use_cuda_graph=use_cuda_graph),
            context=RunContext(run_dir=run_dir, device="cuda"),
        )
        stats = runner.run()
        assert stats["status"] == "completed"
        default_stream = torch.cuda.default_stream()
        assert len(runner.decode_streams) == 6
        if overlap:
            assert all(stream != default_stream for stream in runner.decode_streams)
            assert all(chunk["decode_s"] > 0 for chunk in stats["chunks"])
        else:
            assert all(stream == default_stream for stream in runner.decode_streams)
        runs[overlap] = (
            load_file(str(run_dir / "latents.safetensors"))["latents"],
            read_mp4(run_dir / "video.mp4")[0],
        )
    (sequential_latents, sequential_video), (overlap_latents, overlap_video) = (
        runs[False],
        runs[True],
    )
    assert torch.equal(overlap_latents, sequential_latents)
    assert overlap_video.shape == (1 + 4 * (12 - 1), HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(overlap_video, sequential_video)
