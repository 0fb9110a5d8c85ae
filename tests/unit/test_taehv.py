"""TAEHV light decoder: streaming exactness, temporal mappers, lighttae loading, errors."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from flashdreams.recipes.taehv import (
    AVAILABLE_TAEHV_CHECKPOINT_PATHS,
    TAEHVCache,
    TeahvVAEDecoder,
    TeahvVAEDecoderConfig,
    lighttae_state_dict_transform,
)

LATENT_CHANNELS = 4
CHANNELS = (8, 8, 6, 4)


def _tiny_config(**overrides) -> TeahvVAEDecoderConfig:
    fields = dict(
        checkpoint_path=None,
        dtype=torch.float32,
        use_compile=False,
        use_cuda_graph=False,
        latent_channels=LATENT_CHANNELS,
        decoder_channels=CHANNELS,
    )
    fields.update(overrides)
    return TeahvVAEDecoderConfig(**fields)


def _tiny_decoder(seed: int = 0, **overrides) -> TeahvVAEDecoder:
    torch.manual_seed(seed)
    decoder = _tiny_config(**overrides).setup()
    # Default init leaves most outputs clamped at 0; widen the weights so the
    # test sees non-trivial pixels.
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.mul_(2.0)
    return decoder.eval()


def _latent(num_frames: int, seed: int = 1, batch_shape=(2,)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*batch_shape, num_frames, LATENT_CHANNELS, 3, 4, generator=generator)


# --- an independent re-statement of upstream TAEHV's parallel decode ---------


def _upstream_style_decode(flat_sd: dict[str, torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
    """Decode [N, T, C, H, W] with upstream's flat layout and whole-video memory padding.

    Works straight from a flat ``decoder.<i>.*`` state dict (lighttae layout,
    first TGrow stored with stride 2), using functional ops only.
    """

    def conv(x, prefix, padding=1):
        bias = flat_sd.get(prefix + ".bias")
        return F.conv2d(x, flat_sd[prefix + ".weight"], bias, padding=padding)

    def memblock(x, past, prefix):
        h = torch.cat([x, past], 1)
        h = F.relu(conv(h, prefix + ".conv.0"))
        h = F.relu(conv(h, prefix + ".conv.2"))
        h = conv(h, prefix + ".conv.4")
        skip = x
        if prefix + ".skip.weight" in flat_sd:
            skip = conv(x, prefix + ".skip", padding=0)
        return F.relu(h + skip)

    num_batch, num_frames = latent.shape[:2]
    x = latent.flatten(0, 1)
    x = torch.tanh(x / 3) * 3
    x = F.relu(conv(x, "decoder.1"))
    index = 3
    for time_up in (False, True, True):
        for _ in range(3):
            frames = x.reshape(num_batch, -1, *x.shape[1:])
            past = F.pad(frames, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1]
            x = memblock(x, past.flatten(0, 1), f"decoder.{index}")
            index += 1
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        index += 1
        weight = flat_sd[f"decoder.{index}.conv.weight"]
        num_channels = x.shape[1]
        if not time_up:
            weight = weight[-num_channels:]  # upstream's patch_tgrow_layers
        x = F.conv2d(x, weight).reshape(-1, num_channels, *x.shape[2:])
        index += 1
        x = conv(x, f"decoder.{index}")
        index += 1
    x = conv(F.relu(x), f"decoder.{index + 1}")
    video = x.reshape(num_batch, -1, *x.shape[1:]).clamp(0, 1)
    return video[:, 3:]


def _flat_lighttae_checkpoint(seed: int = 5) -> dict[str, torch.Tensor]:
    """Random weights in lighttae's on-disk layout, plus encoder keys that must be ignored."""
    decoder = _tiny_decoder(seed=seed)
    flat = {}
    for key, tensor in decoder.state_dict().items():
        flat[key.replace("decoder.blocks.", "decoder.")] = tensor.clone()
    first_tgrow = flat["decoder.7.conv.weight"]
    generator = torch.Generator().manual_seed(seed + 1)
    flat["decoder.7.conv.weight"] = torch.cat(
        [torch.randn(first_tgrow.shape, generator=generator), first_tgrow]
    )
    flat["encoder.0.weight"] = torch.randn(3, 3, 3, 3, generator=generator)
    return flat


# --- tests -------------------------------------------------------------------


def test_default_config_points_at_lighttae_and_refuses_to_download() -> None:
    config = TeahvVAEDecoderConfig()
    assert config.checkpoint_path == AVAILABLE_TAEHV_CHECKPOINT_PATHS["lighttae"]
    assert config.checkpoint_path.endswith("/lighttaew2_1.pth")
    assert config.state_dict_transform is lighttae_state_dict_transform
    with pytest.raises(FileNotFoundError, match=r"remote address.*checkpoints/lighttaew2_1\.pth"):
        config.setup()


def test_missing_local_checkpoint_names_the_path(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(f"TAEHV decoder checkpoint not found: '{missing}' does not exist"),
    ):
        _tiny_config(checkpoint_path=str(missing)).setup()


def test_output_shape_range_and_ratios() -> None:
    decoder = _tiny_decoder()
    assert decoder.spatial_compression_ratio == 8
    assert decoder.temporal_compression_ratio == 4
    latent = _latent(3, batch_shape=(2, 1))
    video = decoder(latent)
    assert video.shape == (2, 1, 1 + 4 * 2, 3, 24, 32)
    assert video.min() >= -1 and video.max() <= 1
    assert video.std() > 0.05  # not a constant image


LATENT_MEAN = (0.5, -1.0, 0.25, 2.0)
LATENT_STD = (2.0, 0.5, 3.0, 1.5)


def test_lighttae_checkpoint_matches_upstream_style_decode(tmp_path) -> None:
    """LightX2V decodes ``z * std + mean`` with every lighttae file: so must we."""
    flat = _flat_lighttae_checkpoint()
    path = tmp_path / "lighttaew2_1.pth"
    torch.save(flat, path)
    decoder = _tiny_config(
        checkpoint_path=str(path), latent_mean=LATENT_MEAN, latent_std=LATENT_STD
    ).setup()
    assert decoder.unnormalize_latent
    latent = _latent(4)
    raw = latent * torch.tensor(LATENT_STD).view(-1, 1, 1) + torch.tensor(LATENT_MEAN).view(
        -1, 1, 1
    )
    expected = _upstream_style_decode(flat, raw) * 2 - 1
    actual = decoder.eval()(latent)
    assert actual.shape == expected.shape == (2, 13, 3, 24, 32)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # the normalised latent as it is (what the decoder did before) is far off
    assert (actual - (_upstream_style_decode(flat, latent) * 2 - 1)).abs().max() > 0.05


def test_taew2_1_checkpoint_decodes_the_normalised_latent(tmp_path) -> None:
    """madebyollin's taew2_1 takes the DiT's latent as it is; an explicit field overrides the name."""
    flat = _flat_lighttae_checkpoint()
    torch.save(flat, tmp_path / "taew2_1.pth")
    decoder = _tiny_config(checkpoint_path=str(tmp_path / "taew2_1.pth")).setup().eval()
    assert not decoder.unnormalize_latent
    latent = _latent(4)
    expected = _upstream_style_decode(flat, latent) * 2 - 1
    torch.testing.assert_close(decoder(latent), expected, atol=1e-5, rtol=1e-5)
    renamed = tmp_path / "my_decoder.pth"
    torch.save(flat, renamed)
    forced = _tiny_config(
        checkpoint_path=str(renamed),
        unnormalize_latent=True,
        latent_mean=LATENT_MEAN,
        latent_std=LATENT_STD,
    ).setup()
    assert forced.unnormalize_latent


def test_lighttae_defaults_to_the_wan_latent_statistics(tmp_path) -> None:
    from flashdreams.recipes.taehv.model import checkpoint_takes_raw_latents
    from flashdreams.recipes.wan.autoencoder.vae import (
        WAN21_LATENT_MEAN,
        WAN21_LATENT_STD,
        WAN22_LATENT_MEAN,
    )

    assert checkpoint_takes_raw_latents(AVAILABLE_TAEHV_CHECKPOINT_PATHS["lighttae"])
    assert checkpoint_takes_raw_latents("/ckpt/lighttaew2_1.safetensors")
    assert not checkpoint_takes_raw_latents("/ckpt/taew2_1.pth")
    assert not checkpoint_takes_raw_latents(None)
    wan21 = _tiny_config(latent_channels=16, unnormalize_latent=True).setup()
    assert wan21._latent_mean.tolist() == pytest.approx(WAN21_LATENT_MEAN)
    assert wan21._latent_std.tolist() == pytest.approx(WAN21_LATENT_STD)
    wan22 = _tiny_config(latent_channels=48, unnormalize_latent=True).setup()
    assert wan22._latent_mean.tolist() == pytest.approx(WAN22_LATENT_MEAN)
    with pytest.raises(
        ValueError, match="only 16-channel .Wan 2.1. and 48-channel .Wan 2.2. latents have defaults"
    ):
        _tiny_config(unnormalize_latent=True).setup()


def test_lighttae_transform_layout() -> None:
    flat = _flat_lighttae_checkpoint()
    remapped = lighttae_state_dict_transform(flat)
    assert not any(key.startswith("encoder.") for key in remapped)
    assert all(key.startswith("decoder.blocks.") for key in remapped)
    # The stride-2 first TGrow keeps the output channels of its last time step.
    channels = CHANNELS[0]
    assert flat["decoder.7.conv.weight"].shape[0] == 2 * channels
    assert torch.equal(
        remapped["decoder.blocks.7.conv.weight"], flat["decoder.7.conv.weight"][channels:]
    )
    # The stride-2 later TGrows are left alone.
    assert torch.equal(remapped["decoder.blocks.13.conv.weight"], flat["decoder.13.conv.weight"])


@pytest.mark.parametrize("chunk_sizes", [(1, 2, 3), (3, 3), (1, 1, 1, 1, 1, 1)])
def test_chunked_decode_equals_one_shot(chunk_sizes) -> None:
    decoder = _tiny_decoder()
    latent = _latent(sum(chunk_sizes))
    one_shot = decoder(latent)

    cache = decoder.initialize_autoregressive_cache()
    assert isinstance(cache, TAEHVCache)
    pieces = []
    start = 0
    for ar_index, size in enumerate(chunk_sizes):
        chunk = decoder(latent[:, start : start + size], autoregressive_index=ar_index, cache=cache)
        assert chunk.shape[1] == decoder.get_output_temporal_size(ar_index, size)
        pieces.append(chunk)
        start += size
    streamed = torch.cat(pieces, dim=1)
    assert streamed.shape == one_shot.shape
    assert (streamed - one_shot).abs().max().item() <= 1e-5
    assert cache.num_decoded_latent_frames == sum(chunk_sizes)


def test_cache_carries_real_context() -> None:
    """A fresh cache for the second chunk must change the result (the memory matters)."""
    decoder = _tiny_decoder()
    latent = _latent(4)
    cache = decoder.initialize_autoregressive_cache()
    decoder(latent[:, :2], cache=cache)
    with_memory = decoder(latent[:, 2:], autoregressive_index=1, cache=cache)
    fresh = decoder.initialize_autoregressive_cache()
    fresh.num_decoded_latent_frames = 2  # skip the trim, but start from zero memory
    without_memory = decoder(latent[:, 2:], autoregressive_index=1, cache=fresh)
    assert (with_memory - without_memory).abs().max() > 1e-3


@pytest.mark.parametrize("num_latent_frames", [1, 2, 5])
def test_temporal_mappers_match_produced_frames(num_latent_frames) -> None:
    decoder = _tiny_decoder()
    cache = decoder.initialize_autoregressive_cache()
    latent = _latent(2 * num_latent_frames, batch_shape=(1,))
    first = decoder(latent[:, :num_latent_frames], autoregressive_index=0, cache=cache)
    second = decoder(latent[:, num_latent_frames:], autoregressive_index=1, cache=cache)
    assert first.shape[1] == 1 + 4 * (num_latent_frames - 1)
    assert second.shape[1] == 4 * num_latent_frames
    assert decoder.get_output_temporal_size(0, num_latent_frames) == first.shape[1]
    assert decoder.get_output_temporal_size(1, num_latent_frames) == second.shape[1]
    assert decoder.get_output_temporal_size(7, num_latent_frames) == second.shape[1]
    assert decoder.get_input_temporal_size(0, first.shape[1]) == num_latent_frames
    assert decoder.get_input_temporal_size(3, second.shape[1]) == num_latent_frames


def test_input_temporal_size_rejects_unreachable_counts() -> None:
    decoder = _tiny_decoder()
    with pytest.raises(ValueError, match=r"cannot produce 4 frames at AR step 0.*1 \+ 4 \* k"):
        decoder.get_input_temporal_size(0, 4)
    with pytest.raises(ValueError, match=r"cannot produce 5 frames at AR step 2.*4 \* k"):
        decoder.get_input_temporal_size(2, 5)


def test_bad_latent_shape_is_rejected() -> None:
    decoder = _tiny_decoder()
    with pytest.raises(ValueError, match=r"expects 4 latent channels at dim -3; got shape"):
        decoder(torch.zeros(1, 2, 5, 3, 4))


def test_stage_count_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"need 3 entries each \(got 2 and 3\)"):
        _tiny_config(decoder_time_upscale=(True, True)).setup()


def test_bfloat16_runs_and_keeps_input_dtype() -> None:
    torch.manual_seed(0)
    decoder = _tiny_config(dtype=torch.bfloat16).setup()
    video = decoder(_latent(2))
    assert video.dtype == torch.float32
    assert next(decoder.parameters()).dtype == torch.bfloat16


@torch.no_grad()
def test_compile_path_traces_without_graph_breaks():
    """The CUDA compile path (``use_cuda_graph=True`` by default) wraps the network as
    here but with inductor; traced with dynamo's eager backend and ``fullgraph=True``
    (a graph break raises), a streamed rollout equals the eager one."""
    decoder = _tiny_decoder()
    latents = [_latent(2, seed=seed, batch_shape=(1,)) for seed in (1, 2, 3)]
    cache = decoder.initialize_autoregressive_cache()
    expected = [decoder(latent, index, cache) for index, latent in enumerate(latents)]
    decoder._compile_checked = True
    decoder._compiled_network = torch.compile(
        decoder.decoder, backend="eager", fullgraph=True, dynamic=False
    )
    cache = decoder.initialize_autoregressive_cache()
    for index, latent in enumerate(latents):
        torch.testing.assert_close(
            decoder(latent, index, cache), expected[index], rtol=0, atol=1e-5
        )
