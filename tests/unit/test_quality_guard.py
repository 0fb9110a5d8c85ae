"""runner.quality_check: frame flags, PSNR / latent error vs the reference precision, and a
deliberately broken low-precision mode caught (tiny Wan T2V pipeline, real Runner, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from test_overlap_decode import HEIGHT, WIDTH, tiny_t2v_config

from flashdreams.infra.config import derive_config
from flashdreams.runner.quality import (
    QualityCheckError,
    frame_problem,
    low_precision_settings,
    psnr_db,
    reference_precision_config,
)
from flashdreams.runner.runner import RunContext, Runner, RunnerConfig


def test_frame_problems():
    video = torch.rand(1, 3, 3, 8, 8) * 2 - 1  # [B, T, 3, H, W]
    assert frame_problem(video) is None
    black = video.clone()
    black[0, 1] = -1.0
    assert frame_problem(black) == "1 of 3 frame(s) black"
    constant = video.clone()
    constant[0, 2] = 0.3
    assert frame_problem(constant) == "1 of 3 frame(s) constant"
    broken = video.clone()
    broken[0, 0, 0, 0, 0] = float("nan")
    assert frame_problem(broken) == "non-finite pixels (NaN/Inf)"
    assert psnr_db(video, video) == float("inf")
    assert psnr_db(video, video + 0.02) == pytest.approx(10 * torch.log10(torch.tensor(4 / 4e-4)))


def test_reference_config_resets_every_low_precision_field():
    config = derive_config(
        tiny_t2v_config(),
        diffusion_model=dict(
            transformer=dict(quantization="int8_weight_only", kv_cache_dtype="fp8_e4m3")
        ),
    )
    assert low_precision_settings(config) == {
        "pipeline.diffusion_model.transformer.quantization": "int8_weight_only",
        "pipeline.diffusion_model.transformer.kv_cache_dtype": "fp8_e4m3",
    }
    reference = reference_precision_config(config)
    assert low_precision_settings(reference) == {}
    assert config.diffusion_model.transformer.quantization == "int8_weight_only"


def _run(tmp_path, pipeline_config, runner_class=Runner, **runner_fields) -> dict:
    config = RunnerConfig(
        **{"prompt": "a red ball", "num_chunks": 2, "height": HEIGHT, "width": WIDTH}
        | runner_fields
    )
    runner = runner_class(
        config, pipeline_config=pipeline_config, context=RunContext(run_dir=tmp_path)
    )
    return runner.run()


def _low_precision_config():
    return derive_config(
        tiny_t2v_config(),
        diffusion_model=dict(
            transformer=dict(quantization="int8_weight_only", kv_cache_dtype="int8")
        ),
    )


def test_working_mode_passes_and_reports(tmp_path):
    stats = _run(tmp_path, _low_precision_config(), quality_check=True)
    report = stats["quality_check"]
    print(
        f"int8 weights + int8 KV cache: PSNR {report['psnr_db']:.1f} dB, latent error "
        f"{report['latent_relative_error']:.2e}"
    )
    assert report["psnr_db"] > 40 and report["latent_relative_error"] < 1e-2
    assert report["frame_problem"] is None
    written = json.loads((tmp_path / "stats.json").read_text())
    assert written["quality_check"]["psnr_db"] == pytest.approx(report["psnr_db"])


def test_same_video_with_and_without_the_check(tmp_path):
    """The check re-seeds the model RNG: the rollout draws the noise it draws without it."""
    with_check = _run(
        tmp_path / "a", _low_precision_config(), quality_check=True, save_latents=True
    )
    without = _run(tmp_path / "b", _low_precision_config(), save_latents=True)
    from safetensors.torch import load_file

    assert with_check["status"] == without["status"] == "completed"
    a = load_file(str(tmp_path / "a" / "latents.safetensors"))["latents"]
    b = load_file(str(tmp_path / "b" / "latents.safetensors"))["latents"]
    assert torch.equal(a, b)


def test_broken_weight_scale_gives_black_frames_and_is_caught(tmp_path, monkeypatch):
    """Weight quantisation that zeroes every block weight and the head: the decoded chunk is
    flat, the guard stops on the first chunk and names the quantization knob."""
    import flashdreams.recipes.wan.transformer.wan21 as wan21

    def zero_weights(module, mode, *, filter_fn=None):
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.zero_()

    monkeypatch.setattr(wan21, "quantize_linear_weights", zero_weights)
    config = derive_config(
        tiny_t2v_config(), diffusion_model=dict(transformer=dict(quantization="int8_weight_only"))
    )
    with pytest.raises(QualityCheckError) as raised:
        _run(tmp_path, config, quality_check=True)
    message = str(raised.value)
    assert "pipeline.diffusion_model.transformer.quantization=int8_weight_only" in message
    assert "runner.quality_max_latent_error=0.25" in message


def test_black_frames_are_flagged_in_any_run(tmp_path, monkeypatch):
    from loguru import logger

    class BlackRunner(Runner):
        def build_pipeline(self, pipeline_config=None):
            pipeline = super().build_pipeline(pipeline_config)
            generate = pipeline.generate

            def black(index, cache):
                return torch.full_like(generate(index, cache), -1.0)

            pipeline.generate = black
            return pipeline

    messages: list[str] = []
    handler = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        config = RunnerConfig(prompt="a", num_chunks=1, height=HEIGHT, width=WIDTH)
        BlackRunner(
            config, pipeline_config=tiny_t2v_config(), context=RunContext(run_dir=tmp_path / "a")
        ).run()
        assert any("AR step 0: the decoded chunk has 5 of 5 frame(s) black" in m for m in messages)
        config = RunnerConfig(
            prompt="a", num_chunks=1, height=HEIGHT, width=WIDTH, quality_check=True
        )
        with pytest.raises(QualityCheckError, match="frame\\(s\\) black"):
            BlackRunner(
                config,
                pipeline_config=tiny_t2v_config(),
                context=RunContext(run_dir=tmp_path / "b"),
            ).run()
    finally:
        logger.remove(handler)


def test_black_frames_stop_the_background_decoder_too(tmp_path):
    """With runner.overlap_decode the frame check runs on the decode worker; the failure
    reaches the main thread naming the AR step. (Chunk 1 turns black: the quality check's
    own first chunk passes.)"""
    from flashdreams.session import ChunkDecodeError

    class BlackDecodeRunner(Runner):
        def build_pipeline(self, pipeline_config=None):
            pipeline = super().build_pipeline(pipeline_config)
            decode_latent = pipeline.decode_latent

            def black(latent, index, cache):
                video = decode_latent(latent, index, cache)
                return torch.full_like(video, -1.0) if index == 1 else video

            pipeline.decode_latent = black
            return pipeline

    with pytest.raises(ChunkDecodeError) as raised:
        _run(
            tmp_path,
            tiny_t2v_config(),
            BlackDecodeRunner,
            overlap_decode=True,
            quality_check=True,
        )
    assert raised.value.autoregressive_index == 1
    assert "QualityCheckError: AR step 1: the decoded chunk has 8 of 8 frame(s) black" in str(
        raised.value
    )


def test_quality_check_chunks_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="runner.quality_check_chunks must be >= 1, got 0"):
        _run(tmp_path, tiny_t2v_config(), quality_check=True, quality_check_chunks=0)
