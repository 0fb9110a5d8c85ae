"""Wan VAE: streaming == one shot, temporal mappers, checkpoints, key layout, errors (tiny random weights)."""

from __future__ import annotations

import pytest
import torch
from loguru import logger
from safetensors.torch import save_file

from flashdreams.recipes.wan.autoencoder import (
    Wan22TI2V5BVAEDecoderConfig,
    Wan22TI2V5BVAEEncoderConfig,
    WanVAEDecoderConfig,
    WanVAEEncoderConfig,
    patchify_video,
    unpatchify_video,
)

TINY = dict(
    checkpoint_path=None,
    dtype=torch.float32,
    base_dim=8,
    dim_mult=(1, 2, 2, 2),
    num_res_blocks=1,
    use_cuda_graph=False,
)
WAN21 = (
    WanVAEEncoderConfig,
    WanVAEDecoderConfig,
    dict(z_dim=4, latent_mean=(0.1,) * 4, latent_std=(2.0,) * 4),
)
WAN22 = (Wan22TI2V5BVAEEncoderConfig, Wan22TI2V5BVAEDecoderConfig, dict(decoder_base_dim=16))
LAYOUTS = {"wan21": WAN21, "wan22_ti2v_5b": WAN22}


def _build(config_class, **overrides):
    torch.manual_seed(0)
    if config_class in (Wan22TI2V5BVAEEncoderConfig, WanVAEEncoderConfig):
        overrides.pop("decoder_base_dim", None)
    return config_class(**{**TINY, **overrides}).setup().eval()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@torch.no_grad()
def test_streaming_decode_equals_one_shot_and_frame_counts_match_mappers(layout):
    _, decoder_class, extra = LAYOUTS[layout]
    decoder = _build(decoder_class, **extra)
    side = decoder.spatial_compression_ratio
    latent = torch.randn(1, 5, decoder.config.z_dim, 2, 3)
    one_shot = decoder(latent)
    cache = decoder.initialize_autoregressive_cache()
    splits = [(0, 2), (2, 3), (3, 5)]
    chunks = [decoder(latent[:, a:b], i, cache) for i, (a, b) in enumerate(splits)]
    error = (torch.cat(chunks, dim=1) - one_shot).abs().max().item()
    assert error <= 1e-5, f"{layout}: streamed decode differs from one shot by {error:.3e}"
    counts = [c.shape[1] for c in chunks]
    assert counts == [decoder.get_output_temporal_size(i, b - a) for i, (a, b) in enumerate(splits)]
    assert counts == [5, 4, 8]
    assert [decoder.get_input_temporal_size(i, n) for i, n in enumerate(counts)] == [2, 1, 2]
    assert one_shot.shape == (1, 17, 3, 2 * side, 3 * side)
    assert one_shot.abs().max() <= 1.0


@pytest.mark.parametrize("layout", list(LAYOUTS))
@torch.no_grad()
def test_streaming_encode_equals_one_shot_and_frame_counts_match_mappers(layout):
    encoder_class, _, extra = LAYOUTS[layout]
    encoder = _build(encoder_class, **extra)
    side = encoder.spatial_compression_ratio
    video = torch.rand(1, 13, 3, 2 * side, side) * 2 - 1
    one_shot = encoder(video)
    cache = encoder.initialize_autoregressive_cache()
    splits = [(0, 5), (5, 9), (9, 13)]
    chunks = [encoder(video[:, a:b], i, cache) for i, (a, b) in enumerate(splits)]
    error = (torch.cat(chunks, dim=1) - one_shot).abs().max().item()
    assert error <= 1e-5, f"{layout}: streamed encode differs from one shot by {error:.3e}"
    counts = [c.shape[1] for c in chunks]
    assert counts == [encoder.get_output_temporal_size(i, b - a) for i, (a, b) in enumerate(splits)]
    assert counts == [2, 1, 1]
    assert [encoder.get_input_temporal_size(i, n) for i, n in enumerate(counts)] == [5, 4, 4]
    assert one_shot.shape == (1, 4, encoder.config.z_dim, 2, 1)


@torch.no_grad()
def test_the_cache_really_carries_state():
    decoder = _build(WanVAEDecoderConfig, **WAN21[2])
    latent = torch.randn(1, 2, 4, 2, 2)
    cache = decoder.initialize_autoregressive_cache()
    decoder(latent[:, :1], 0, cache)
    continued = decoder(latent[:, 1:], 1, cache)
    # A fresh cache treats the same latent frame as the start of a video (one frame out).
    fresh = decoder(latent[:, 1:], 1, None)
    assert continued.shape[1] == 4 and fresh.shape[1] == 1
    assert (continued[:, -1] - fresh[:, -1]).abs().max() > 1e-3


def test_compression_ratios():
    assert _build(WanVAEDecoderConfig, **WAN21[2]).spatial_compression_ratio == 8
    assert _build(WanVAEEncoderConfig, **WAN21[2]).temporal_compression_ratio == 4
    decoder = _build(Wan22TI2V5BVAEDecoderConfig, **WAN22[2])
    assert (decoder.spatial_compression_ratio, decoder.temporal_compression_ratio) == (16, 4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@torch.no_grad()
def test_batch_dims_are_kept_and_batch_items_are_independent(layout):
    encoder_class, decoder_class, extra = LAYOUTS[layout]
    encoder, decoder = _build(encoder_class, **extra), _build(decoder_class, **extra)
    side = encoder.spatial_compression_ratio
    video = torch.rand(2, 3, 5, 3, side, side) * 2 - 1  # [2, 3, T, 3, H, W]
    latent = encoder(video)
    assert latent.shape == (2, 3, 2, encoder.config.z_dim, 1, 1)
    torch.testing.assert_close(latent[1, 2], encoder(video[1, 2]), rtol=0, atol=1e-5)
    decoded = decoder(latent)
    assert decoded.shape == video.shape
    torch.testing.assert_close(decoded[0, 1], decoder(latent[0, 1]), rtol=0, atol=1e-5)


def test_patchify_is_width_offset_first_and_inverts():
    video = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(1, 2, 1, 4, 4)
    packed = patchify_video(video, 2)
    assert packed.shape == (1, 8, 1, 2, 2)
    # channel index = c * 4 + r * 2 + q, with q the height offset and r the width offset
    for c in range(2):
        for q in range(2):
            for r in range(2):
                torch.testing.assert_close(
                    packed[0, c * 4 + r * 2 + q, 0], video[0, c, 0, q::2, r::2]
                )
    assert torch.equal(unpatchify_video(packed, 2), video)


def test_original_wan_key_layout():
    encoder = _build(WanVAEEncoderConfig, **WAN21[2])
    decoder = _build(WanVAEDecoderConfig, **WAN21[2])
    encoder_keys, decoder_keys = set(encoder.state_dict()), set(decoder.state_dict())
    assert {
        "encoder.conv1.weight",
        "encoder.downsamples.0.residual.0.gamma",
        "encoder.downsamples.0.residual.2.weight",
        "encoder.downsamples.2.shortcut.weight",
        "encoder.downsamples.3.time_conv.weight",  # Resample 'downsample3d' of stage 1
        "encoder.middle.1.to_qkv.weight",
        "encoder.head.2.weight",
        "conv1.weight",
    } <= encoder_keys
    assert {
        "conv2.weight",
        "decoder.conv1.weight",
        "decoder.middle.0.residual.6.bias",
        "decoder.upsamples.2.resample.1.weight",
        "decoder.upsamples.5.time_conv.weight",
        "decoder.head.0.gamma",
    } <= decoder_keys
    assert not any(k.startswith(("decoder.", "conv2.")) for k in encoder_keys)
    wan22 = _build(Wan22TI2V5BVAEDecoderConfig, **WAN22[2])
    assert "decoder.upsamples.0.upsamples.2.resample.1.weight" in wan22.state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@torch.no_grad()
def test_original_layout_checkpoint_round_trip(tmp_path, suffix):
    encoder = _build(WanVAEEncoderConfig, **WAN21[2])
    decoder = _build(WanVAEDecoderConfig, **WAN21[2])
    torch.manual_seed(1)
    for module in (encoder, decoder):
        for param in module.parameters():
            param.add_(0.05 * torch.randn_like(param))
    full = {**encoder.state_dict(), **decoder.state_dict()}  # one file, like Wan2.1_VAE.pth
    path = tmp_path / f"vae{suffix}"
    if suffix == ".pth":
        torch.save(full, path)
    else:
        save_file({k: v.contiguous() for k, v in full.items()}, str(path))
    overrides = {**TINY, **WAN21[2], "checkpoint_path": str(path)}
    loaded_encoder = WanVAEEncoderConfig(**overrides).setup().eval()
    loaded_decoder = WanVAEDecoderConfig(**overrides).setup().eval()
    video = torch.rand(1, 5, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(loaded_encoder(video), encoder(video), rtol=0, atol=0)
    latent = torch.randn(1, 2, 4, 1, 1)
    torch.testing.assert_close(loaded_decoder(latent), decoder(latent), rtol=0, atol=0)


def test_checkpoint_with_wrong_shapes_is_refused(tmp_path):
    small = _build(WanVAEDecoderConfig, **WAN21[2])
    path = tmp_path / "vae.pth"
    torch.save(small.state_dict(), path)
    with pytest.raises(ValueError, match=r"shape mismatch for 'conv2.weight'"):
        WanVAEDecoderConfig(**{**TINY, "checkpoint_path": str(path)}).setup()  # z_dim 16


def test_encoder_refuses_wrong_frame_counts():
    encoder = _build(WanVAEEncoderConfig, **WAN21[2])
    with pytest.raises(
        ValueError, match=r"got 4 frames; the first chunk of a video needs 1 \+ 4 \* k"
    ):
        encoder(torch.zeros(1, 4, 3, 8, 8))
    cache = encoder.initialize_autoregressive_cache()
    encoder(torch.zeros(1, 1, 3, 8, 8), 0, cache)
    with pytest.raises(ValueError, match=r"got 5 frames; later chunks need 4 \* k"):
        encoder(torch.zeros(1, 5, 3, 8, 8), 1, cache)
    with pytest.raises(ValueError, match=r"frame size \(8, 12\) must be divisible by .* 8"):
        encoder(torch.zeros(1, 1, 3, 8, 12))
    with pytest.raises(
        ValueError, match=r"cannot take 4 frames at AR step 0: it needs 1 \+ 4 \* k"
    ):
        encoder.get_output_temporal_size(0, 4)


def test_decoder_refuses_bad_inputs():
    decoder = _build(WanVAEDecoderConfig, **WAN21[2])
    with pytest.raises(
        ValueError, match=r"cannot produce 8 frames at AR step 0: the count must be 1 \+ 4 \* k"
    ):
        decoder.get_input_temporal_size(0, 8)
    with pytest.raises(
        ValueError, match=r"cannot produce 9 frames at AR step 1: the count must be 4 \* k"
    ):
        decoder.get_input_temporal_size(1, 9)
    with pytest.raises(
        ValueError,
        match=r"expects a latent \[\.\.\., Tl, 4, Hl, Wl\]; got shape \(1, 2, 16, 1, 1\)",
    ):
        decoder(torch.zeros(1, 2, 16, 1, 1))


def test_remote_default_checkpoint_says_where_to_put_the_file():
    with pytest.raises(
        FileNotFoundError, match=r"remote address .* \./checkpoints/Wan2\.1_VAE\.pth"
    ):
        WanVAEDecoderConfig(dtype=torch.float32).setup()
    with pytest.raises(
        FileNotFoundError,
        match=r"remote address .* \./checkpoints/diffusion_pytorch_model\.safetensors",
    ):
        Wan22TI2V5BVAEEncoderConfig(dtype=torch.float32).setup()
    with pytest.raises(FileNotFoundError, match=r"Wan VAE encoder checkpoint not found"):
        WanVAEEncoderConfig(checkpoint_path="/nonexistent/vae.pth").setup()


def test_config_errors():
    with pytest.raises(
        ValueError, match=r"latent_mean and latent_std need z_dim=8 entries; got 16 and 16"
    ):
        _build(WanVAEDecoderConfig, z_dim=8)
    with pytest.raises(
        ValueError, match=r"temporal_downsample needs len\(dim_mult\) - 1 = 3 entries; got 2"
    ):
        _build(WanVAEEncoderConfig, temporal_downsample=(True, True))


def test_reference_defaults():
    encoder, decoder = WanVAEEncoderConfig(), WanVAEDecoderConfig()
    assert (encoder.base_dim, encoder.z_dim, encoder.patch_size, encoder.is_residual) == (
        96,
        16,
        1,
        False,
    )
    assert decoder.decoder_base_dim is None and decoder.dtype == torch.bfloat16
    assert (decoder.use_cuda_graph, decoder.use_compile) == (True, False)
    assert decoder.checkpoint_path.endswith("lightx2v/Autoencoders/resolve/main/Wan2.1_VAE.pth")
    assert len(decoder.latent_mean) == len(decoder.latent_std) == 16
    wan22 = Wan22TI2V5BVAEDecoderConfig()
    assert (wan22.base_dim, wan22.decoder_base_dim, wan22.z_dim, wan22.patch_size) == (
        160,
        256,
        48,
        2,
    )
    assert wan22.is_residual and len(wan22.latent_mean) == len(wan22.latent_std) == 48
    assert wan22.latent_mean[0] == -0.2289 and wan22.latent_std[-1] == 0.7744


@torch.no_grad()
def test_cuda_graph_and_compile_are_skipped_on_cpu_with_one_log_line():
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(str(message)), level="INFO")
    try:
        decoder = _build(
            WanVAEDecoderConfig, **{**WAN21[2], "use_cuda_graph": True, "use_compile": True}
        )
        latent = torch.randn(1, 2, 4, 1, 1)
        decoder(latent)
        decoder(latent)
    finally:
        logger.remove(sink)
    skipped = [m for m in messages if "use_compile/use_cuda_graph need CUDA" in m]
    assert len(skipped) == 1, messages


def test_wan21_diffusers_transform_passes_the_original_layout_through():
    """The conf sets this transform so either layout loads: original keys must be untouched."""
    from flashdreams.recipes.wan import wan21_diffusers_vae_state_dict_transform

    torch.manual_seed(0)
    decoder = WanVAEDecoderConfig(checkpoint_path=None, dtype=torch.float32, base_dim=8).setup()
    encoder = WanVAEEncoderConfig(checkpoint_path=None, dtype=torch.float32, base_dim=8).setup()
    original = {**decoder.state_dict(), **encoder.state_dict()}
    assert wan21_diffusers_vae_state_dict_transform(original).keys() == original.keys()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@torch.no_grad()
def test_cpu_fast_path_equals_torch_default_convolutions(layout):
    """oneDNN convs on channels-last activations == torch's own conv dispatch (mkldnn off)."""
    encoder_class, decoder_class, extra = LAYOUTS[layout]
    decoder = _build(decoder_class, **extra)
    encoder = _build(encoder_class, **extra)
    latent = torch.randn(1, 3, decoder.config.z_dim, 4, 6)
    video = torch.rand(1, 5, 3, 32, 48) * 2 - 1
    fast_decoded, fast_encoded = decoder(latent), encoder(video)
    with torch.backends.mkldnn.flags(enabled=False):
        slow_decoded, slow_encoded = decoder(latent), encoder(video)
    assert fast_decoded.shape == slow_decoded.shape and fast_encoded.shape == slow_encoded.shape
    assert (fast_decoded - slow_decoded).abs().max().item() <= 1e-5
    assert (fast_encoded - slow_encoded).abs().max().item() <= 1e-5
    assert (fast_decoded - slow_decoded).abs().max().item() > 0  # two different kernels ran


@pytest.mark.parametrize("shape", [(1, 8, 3, 5, 6), (1, 8, 5, 6), (2, 4, 4, 7, 9)])
def test_onednn_convolution_matches_torch_in_both_layouts(shape):
    from flashdreams.recipes.wan.autoencoder.layers import convolution

    torch.manual_seed(0)
    x = torch.randn(shape)
    weight = torch.randn(6, shape[1], *([3] * (len(shape) - 2)))
    bias = torch.randn(6)
    padding = (0, 1, 1) if len(shape) == 5 else (1, 1)
    stride = (1,) * (len(shape) - 2)
    conv = torch.nn.functional.conv3d if len(shape) == 5 else torch.nn.functional.conv2d
    expected = conv(x, weight, bias, stride, padding)
    channels_last = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    with torch.no_grad():
        plain = convolution(x, weight, bias, stride, padding)
        last = convolution(x.contiguous(memory_format=channels_last), weight, bias, stride, padding)
    assert last.is_contiguous(memory_format=channels_last)
    # sums of 27 * C products of unit normals: compare relative to their size
    tolerance = 1e-6 * expected.abs().max().item()
    assert (plain - expected).abs().max().item() <= tolerance
    assert (last - expected).abs().max().item() <= tolerance


# --- the CUDA compile path (use_cuda_graph=True by default) traces as one graph ------------


def _traced_stream_matches_eager(model, network_name: str, chunks) -> None:
    """Stream ``chunks`` eagerly, then with ``network_name`` wrapped the way ``_network``
    wraps it on CUDA, but with dynamo's eager backend and ``fullgraph=True`` (any graph
    break raises: a break would split the compiled VAE into many small graphs, each
    recompiled per shape until dynamo's limit leaves the rest eager)."""
    cache = model.initialize_autoregressive_cache()
    expected = [model(chunk, index, cache) for index, chunk in enumerate(chunks)]
    model._compile_checked = True
    model._compiled = torch.compile(
        getattr(model, network_name), backend="eager", fullgraph=True, dynamic=False
    )
    cache = model.initialize_autoregressive_cache()
    for index, chunk in enumerate(chunks):
        torch.testing.assert_close(model(chunk, index, cache), expected[index], rtol=0, atol=1e-5)


@torch.no_grad()
def test_decoder_compile_path_traces_without_graph_breaks():
    encoder_config, decoder_config, overrides = WAN21
    decoder = _build(decoder_config, **overrides)
    generator = torch.Generator().manual_seed(1)
    latents = list(torch.randn(3, 1, 2, 4, 4, 4, generator=generator))  # 3 chunks, 2 frames
    _traced_stream_matches_eager(decoder, "decoder", latents)


@torch.no_grad()
def test_encoder_compile_path_traces_without_graph_breaks():
    encoder_config, decoder_config, overrides = WAN21
    encoder = _build(encoder_config, **overrides)
    generator = torch.Generator().manual_seed(1)
    frames = torch.rand(1, 9, 3, 32, 32, generator=generator) * 2 - 1
    _traced_stream_matches_eager(encoder, "encoder", [frames[:, :1], frames[:, 1:5], frames[:, 5:]])


def test_cudnn_benchmark_is_scoped_to_the_vae_calls():
    """The VAE autotunes cuDNN for its own calls and leaves the process-wide flag alone."""
    from flashdreams.recipes.wan.autoencoder.vae import _cudnn_benchmark

    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        with _cudnn_benchmark(torch.device("cuda")):
            assert torch.backends.cudnn.benchmark
        assert not torch.backends.cudnn.benchmark
        with _cudnn_benchmark(torch.device("cpu")):
            assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = previous
