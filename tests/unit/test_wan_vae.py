"""Wan VAE streaming, temporal mappers and configuration errors (tiny random weights)."""

from __future__ import annotations

import pytest
import torch

from flashdreams.recipes.wan import (
    Wan22TI2V5BVAEDecoderConfig,
    WanVAEDecoderConfig,
    WanVAEEncoderConfig,
)

TINY = dict(checkpoint_path=None, dtype=torch.float32, base_dim=8, use_cuda_graph=False)


def _build(config_class, **overrides):
    torch.manual_seed(0)
    return config_class(**{**TINY, **overrides}).setup().eval()


def test_streaming_decode_equals_one_shot():
    decoder = _build(WanVAEDecoderConfig)
    latent = torch.randn(1, 5, 16, 3, 4)
    with torch.no_grad():
        one_shot = decoder(latent)
        cache = decoder.initialize_autoregressive_cache()
        chunks = [
            decoder(latent[:, :2], 0, cache),
            decoder(latent[:, 2:3], 1, cache),
            decoder(latent[:, 3:], 2, cache),
        ]
    torch.testing.assert_close(torch.cat(chunks, dim=1), one_shot, rtol=0, atol=1e-5)
    assert (
        [c.shape[1] for c in chunks]
        == [
            decoder.get_output_temporal_size(0, 2),
            decoder.get_output_temporal_size(1, 1),
            decoder.get_output_temporal_size(2, 2),
        ]
        == [5, 4, 8]
    )


def test_streaming_encode_equals_one_shot():
    encoder = _build(WanVAEEncoderConfig)
    video = torch.rand(1, 13, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        one_shot = encoder(video)
        cache = encoder.initialize_autoregressive_cache()
        first = encoder(video[:, :5], 0, cache)
        second = encoder(video[:, 5:], 1, cache)
    torch.testing.assert_close(torch.cat([first, second], dim=1), one_shot, rtol=0, atol=1e-5)
    assert first.shape[1] == encoder.get_output_temporal_size(0, 5) == 2
    assert second.shape[1] == encoder.get_output_temporal_size(1, 8) == 2
    assert encoder.get_input_temporal_size(0, 2) == 5 and encoder.get_input_temporal_size(1, 2) == 8


def test_cache_really_carries_state():
    decoder = _build(WanVAEDecoderConfig)
    latent = torch.randn(1, 2, 16, 3, 4)
    with torch.no_grad():
        cache = decoder.initialize_autoregressive_cache()
        decoder(latent[:, :1], 0, cache)
        continued = decoder(latent[:, 1:], 1, cache)
        fresh = decoder(latent[:, 1:], 1, decoder.initialize_autoregressive_cache())
    assert not torch.allclose(continued, fresh[:, -4:], atol=1e-4)


def test_ratios_and_inverse_mapper_errors():
    decoder = _build(WanVAEDecoderConfig)
    assert decoder.spatial_compression_ratio == 8 and decoder.temporal_compression_ratio == 4
    assert decoder.get_input_temporal_size(0, 9) == 3 and decoder.get_input_temporal_size(1, 8) == 2
    with pytest.raises(
        ValueError, match=r"8 pixel frames cannot be decoded at AR step 0: it needs 1 \+ 4k frames"
    ):
        decoder.get_input_temporal_size(0, 8)


def test_encoder_refuses_wrong_frame_count():
    encoder = _build(WanVAEEncoderConfig)
    with pytest.raises(ValueError, match=r"got 4 frames: the encoder needs 1 \+ 4k frames"):
        encoder(torch.zeros(1, 4, 3, 16, 16))


def test_remote_default_checkpoint_says_where_to_put_the_file():
    with pytest.raises(
        FileNotFoundError, match=r"remote address .* \./checkpoints/Wan2\.1_VAE\.pth"
    ):
        WanVAEDecoderConfig(dtype=torch.float32).setup()


def test_latent_stats_must_match_z_dim():
    with pytest.raises(
        ValueError, match=r"latent_mean / latent_std need z_dim=8 entries, got 16 / 16"
    ):
        _build(WanVAEDecoderConfig, z_dim=8)


def test_wan22_vae_is_reported_as_missing():
    with pytest.raises(NotImplementedError, match=r"Wan 2.2 TI2V 5B VAE .* is not implemented yet"):
        Wan22TI2V5BVAEDecoderConfig(checkpoint_path=None).setup()
