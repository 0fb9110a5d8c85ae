"""WanInferencePipeline: tiny random-weight T2V / I2V rollouts and input validation."""

from __future__ import annotations

import pytest
import torch

from flashdreams.infra.diffusion.model import DiffusionModelConfig
from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
from flashdreams.recipes.wan import (
    I2VCtrl,
    UMT5TextEncoderConfig,
    Wan21TransformerConfig,
    WanDiTNetworkTinyConfig,
    WanI2VCtrlEncoderConfig,
    WanInferencePipelineConfig,
    WanVAEDecoderConfig,
    WanVAEEncoderConfig,
)

LATENT_HEIGHT, LATENT_WIDTH = 4, 6
NUM_LATENT_FRAMES = 2
TINY_VAE = dict(checkpoint_path=None, dtype=torch.float32, base_dim=8, use_cuda_graph=False)


def tiny_text_encoder() -> UMT5TextEncoderConfig:
    return UMT5TextEncoderConfig(
        checkpoint_path=None,
        tokenizer_path="builtin:bytes",
        text_len=32,
        dtype=torch.float32,
        model_dim=32,
        num_layers=1,
        num_heads=2,
        ffn_dim=64,
        vocab_size=300,
    )


def tiny_pipeline_config(*, i2v=False, guidance_scale=1.0, batch_shape=(1,)):
    transformer = Wan21TransformerConfig(
        network=WanDiTNetworkTinyConfig(),
        dtype=torch.float32,
        checkpoint_path=None,
        batch_shape=batch_shape,
        len_t=NUM_LATENT_FRAMES,
        window_size_t=4,
        sink_size_t=0,
        guidance_scale=guidance_scale,
        compile_network=False,
        use_cuda_graph=False,
        stamp_image_latent=i2v,
    )
    return WanInferencePipelineConfig(
        name="wan-tiny-test",
        diffusion_model=DiffusionModelConfig(
            transformer=transformer,
            scheduler=FlowMatchSchedulerConfig(
                num_inference_steps=2, shift=5.0, denoising_timesteps=[1000, 500]
            ),
            seed=0,
        ),
        decoder=WanVAEDecoderConfig(**TINY_VAE),
        encoder=WanI2VCtrlEncoderConfig(encoder=WanVAEEncoderConfig(**TINY_VAE)) if i2v else None,
        text_encoder=tiny_text_encoder(),
        negative_prompt="blurry",
    )


def build(config):
    torch.manual_seed(0)
    return config.setup().eval()


def test_t2v_rollout_shapes_range_and_frame_counts():
    pipeline = build(tiny_pipeline_config(guidance_scale=3.0))
    cache = pipeline.initialize_cache(["a red ball"], height=LATENT_HEIGHT, width=LATENT_WIDTH)
    ratio = pipeline.decoder.spatial_compression_ratio
    for index in range(3):
        video = pipeline.generate(index, cache)
        expected_frames = pipeline.decoder.get_output_temporal_size(index, NUM_LATENT_FRAMES)
        assert video.shape == (1, expected_frames, 3, LATENT_HEIGHT * ratio, LATENT_WIDTH * ratio)
        assert torch.isfinite(video).all()
        assert video.min() >= -1 and video.max() <= 1
        pipeline.finalize(index, cache)
    assert [pipeline.decoder.get_output_temporal_size(i, 2) for i in range(2)] == [5, 8]


def test_t2v_rollout_is_reproducible():
    outputs = []
    for _ in range(2):
        pipeline = build(tiny_pipeline_config())
        cache = pipeline.initialize_cache(["a red ball"], height=LATENT_HEIGHT, width=LATENT_WIDTH)
        outputs.append(pipeline.generate(0, cache))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_i2v_rollout_pins_the_first_latent_frame():
    pipeline = build(tiny_pipeline_config(i2v=True))
    ratio = pipeline.decoder.spatial_compression_ratio
    image = torch.rand(1, 1, 3, LATENT_HEIGHT * ratio, LATENT_WIDTH * ratio) * 2 - 1
    cache = pipeline.initialize_cache(["a red ball"], image=image)
    transformer = pipeline.diffusion_model.transformer

    # The control the encoder produces for AR 0, computed independently.
    reference_encoder = pipeline.encoder
    control: I2VCtrl = reference_encoder(
        image,
        0,
        reference_encoder.initialize_autoregressive_cache(num_latent_frames=NUM_LATENT_FRAMES),
    )
    assert control.mask[0, 0].eq(1).all() and control.mask[0, 1:].eq(0).all()

    video = pipeline.generate(0, cache)
    assert video.shape[1] == 5
    clean_tokens = cache.final_state.clean_latent
    clean = transformer.unpatchify_and_maybe_gather_cp(clean_tokens)  # [1, T, C, H, W]
    torch.testing.assert_close(clean[:, 0], control.latent[:, 0], rtol=0, atol=1e-6)
    assert not torch.allclose(clean[:, 1], control.latent[:, 1], atol=1e-3)
    pipeline.finalize(0, cache)
    # Later chunks carry no first frame: nothing is pinned.
    pipeline.generate(1, cache)
    pipeline.finalize(1, cache)


def test_release_oneshot_encoders_is_idempotent_and_reloads():
    pipeline = build(tiny_pipeline_config())
    pipeline.initialize_cache(["x"], height=LATENT_HEIGHT, width=LATENT_WIDTH)
    assert pipeline.text_encoder is None  # released by default
    pipeline.release_oneshot_encoders()
    pipeline.release_oneshot_encoders()
    pipeline.initialize_cache(
        ["x"], height=LATENT_HEIGHT, width=LATENT_WIDTH, release_oneshot_encoders=False
    )
    assert pipeline.text_encoder is not None


def test_image_given_to_t2v_is_refused():
    pipeline = build(tiny_pipeline_config())
    with pytest.raises(ValueError, match=r"an image was given but this is a T2V pipeline"):
        pipeline.initialize_cache(["x"], image=torch.zeros(1, 1, 3, 32, 48))


def test_i2v_without_image_is_refused():
    pipeline = build(tiny_pipeline_config(i2v=True))
    with pytest.raises(ValueError, match=r"this is an I2V pipeline: pass the first frame"):
        pipeline.initialize_cache(["x"], height=LATENT_HEIGHT, width=LATENT_WIDTH)


def test_image_size_must_match_height_width_times_compression():
    pipeline = build(tiny_pipeline_config(i2v=True))
    with pytest.raises(
        ValueError,
        match=r"image size 32x48 does not match the latent size 5x6 x spatial compression 8 \(= 40x48 pixels\)",
    ):
        pipeline.initialize_cache(["x"], image=torch.zeros(1, 1, 3, 32, 48), height=5)
    with pytest.raises(
        ValueError,
        match=r"image size 30x48 is not a multiple of the VAE's spatial compression ratio 8",
    ):
        pipeline.initialize_cache(["x"], image=torch.zeros(1, 1, 3, 30, 48))
    with pytest.raises(ValueError, match=r"image must have shape \[\*batch_shape, 1, 3, H, W\]"):
        pipeline.initialize_cache(["x"], image=torch.zeros(1, 3, 32, 48))


def test_text_batch_must_match_batch_shape():
    pipeline = build(tiny_pipeline_config(batch_shape=(2,)))
    with pytest.raises(
        ValueError, match=r"got 1 prompt\(s\) but the transformer's batch_shape \(2,\) needs 2"
    ):
        pipeline.initialize_cache(["x"], height=LATENT_HEIGHT, width=LATENT_WIDTH)


def test_t2v_needs_latent_size():
    pipeline = build(tiny_pipeline_config())
    with pytest.raises(ValueError, match=r"T2V needs the latent height and width"):
        pipeline.initialize_cache(["x"])


def test_batch_of_two_prompts():
    pipeline = build(tiny_pipeline_config(batch_shape=(2,), guidance_scale=2.0))
    cache = pipeline.initialize_cache(["a", "b"], height=LATENT_HEIGHT, width=LATENT_WIDTH)
    video = pipeline.generate(0, cache)
    assert video.shape[:2] == (2, 5)
    assert not torch.allclose(video[0], video[1])
