"""WanDiTNetwork: streaming with the KV cache equals masked full-sequence passes, fusing, errors."""

from __future__ import annotations

import pytest
import torch

from flashdreams.recipes.wan.transformer import (
    WanDiTNetwork,
    WanDiTNetwork1pt3BConfig,
    WanDiTNetwork14BConfig,
    WanDiTNetworkTI2V5BConfig,
    WanDiTNetworkTinyConfig,
)
from flashdreams.recipes.wan.transformer.impl.rope import WanRope

LEN_T = 2  # latent frames per chunk
GRID = (2, 2)  # token grid of one frame (latent 4x4, patch 2x2)
TOKENS_PER_CHUNK = LEN_T * GRID[0] * GRID[1]
T_NOISY = 700.0
T_CONTEXT = 25.0


def _network(**overrides) -> WanDiTNetwork:
    torch.manual_seed(0)
    return WanDiTNetwork(WanDiTNetworkTinyConfig(**overrides)).eval()


def _rope(network: WanDiTNetwork) -> WanRope:
    return WanRope(
        head_dim=network.config.head_dim, num_height_tokens=GRID[0], num_width_tokens=GRID[1]
    )


def _chunks(
    network: WanDiTNetwork, num_chunks: int, seed: int = 1
) -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    d_in = network.config.in_dim * network.patch_volume
    chunks = [
        torch.randn(2, TOKENS_PER_CHUNK, d_in, generator=generator) for _ in range(num_chunks)
    ]
    text = torch.randn(2, 7, network.config.text_dim, generator=generator)
    return chunks, text


def _stream(network, chunks, text, *, window, sink, relative=False):
    """Commit chunks 0..n-2 at the context timestep, return the flow of chunk n-1."""
    rope = _rope(network)
    cache = network.initialize_cache(
        chunk_size=TOKENS_PER_CHUNK, window_size=window, sink_size=sink, text_embeddings=text
    )

    def call(x, t, index, commit):
        if relative:
            return network(
                x, torch.tensor(t), cache, None, index, commit=commit, relative_rope=rope.relative
            )
        return network(
            x, torch.tensor(t), cache, rope.chunk_freqs(index * LEN_T, LEN_T), index, commit=commit
        )

    for index, clean in enumerate(chunks[:-1]):
        call(clean, T_NOISY, index, commit=False)  # a denoising step must not change the cache
        call(clean, T_CONTEXT, index, commit=True)
    return call(chunks[-1], T_NOISY, len(chunks) - 1, commit=False), cache


def _full_pass(network, chunks, text, mask):
    """One pass over [clean chunks | noisy last chunk] with per-token timesteps and a mask."""
    x = torch.cat(chunks, dim=1)
    num_tokens = x.shape[1]
    t = torch.full((2, num_tokens), T_CONTEXT)
    t[:, -TOKENS_PER_CHUNK:] = T_NOISY
    cache = network.initialize_cache(
        chunk_size=num_tokens, window_size=0, sink_size=0, text_embeddings=text
    )
    freqs = _rope(network).chunk_freqs(0, LEN_T * len(chunks))
    out = network(x, t, cache, freqs, block_extra_kwargs={"self_attn_mask": mask})
    return out[:, -TOKENS_PER_CHUNK:]


def _mask(num_chunks: int, *, window: int | None, sink: int) -> torch.Tensor:
    """Query chunk j sees itself, the first ``sink`` tokens and the last ``window`` tokens before it."""
    n = num_chunks * TOKENS_PER_CHUNK
    chunk_of = torch.arange(n) // TOKENS_PER_CHUNK
    position = torch.arange(n)
    query_start = (chunk_of * TOKENS_PER_CHUNK)[:, None]
    same_chunk = chunk_of[:, None] == chunk_of[None, :]
    earlier = position[None, :] < query_start
    in_sink = position[None, :] < sink
    in_window = position[None, :] >= query_start - (n if window is None else window)
    return same_chunk | (earlier & (in_sink | in_window))


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True])
def test_streaming_equals_block_causal_full_pass(fused):
    network = _network()
    if fused:
        network.update_parameters_after_loading_checkpoint()
    chunks, text = _chunks(network, 4)
    for i in range(1, 5):
        streamed, _ = _stream(network, chunks[:i], text, window=10 * TOKENS_PER_CHUNK, sink=0)
        full = _full_pass(network, chunks[:i], text, _mask(i, window=None, sink=0))
        torch.testing.assert_close(streamed, full, rtol=0, atol=1e-5)


@torch.no_grad()
def test_sink_and_window_equal_masked_full_pass():
    network = _network()
    num_chunks = 6
    sink, window = TOKENS_PER_CHUNK, 2 * TOKENS_PER_CHUNK
    chunks, text = _chunks(network, num_chunks, seed=3)
    streamed, cache = _stream(network, chunks, text, window=window, sink=sink)
    assert cache.blocks[0].self_kv.num_filled == sink + window
    full = _full_pass(network, chunks, text, _mask(num_chunks, window=window, sink=sink))
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-5)
    # and the restriction matters: the unrestricted causal pass differs
    unrestricted = _full_pass(network, chunks, text, _mask(num_chunks, window=None, sink=0))
    assert (unrestricted - streamed).abs().max() > 1e-4


@torch.no_grad()
def test_relative_rope_equals_absolute_until_eviction():
    absolute = _network()
    relative = _network(apply_rope_before_kvcache=False)
    relative.load_state_dict(absolute.state_dict())
    chunks, text = _chunks(absolute, 3)
    big = 10 * TOKENS_PER_CHUNK
    out_abs, _ = _stream(absolute, chunks, text, window=big, sink=0)
    out_rel, _ = _stream(relative, chunks, text, window=big, sink=0, relative=True)
    torch.testing.assert_close(out_rel, out_abs, rtol=0, atol=1e-5)
    # RoPE scores depend on position differences only, so without a sink the two modes
    # still agree after the window rolls (a shift of every position changes nothing) ...
    more, _ = _chunks(absolute, 4, seed=9)
    window = 2 * TOKENS_PER_CHUNK
    late_rel, cache = _stream(relative, more, text, window=window, sink=0, relative=True)
    late_abs, _ = _stream(absolute, more, text, window=window, sink=0)
    assert cache.blocks[0].self_kv.num_filled == window
    torch.testing.assert_close(late_rel, late_abs, rtol=0, atol=1e-5)
    # ... while with a sink the relative mode closes the gap between sink and window
    sink = TOKENS_PER_CHUNK
    late_rel, _ = _stream(relative, more, text, window=TOKENS_PER_CHUNK, sink=sink, relative=True)
    late_abs, _ = _stream(absolute, more, text, window=TOKENS_PER_CHUNK, sink=sink)
    assert torch.isfinite(late_rel).all() and (late_rel - late_abs).abs().max() > 1e-4


@torch.no_grad()
def test_fused_and_unfused_agree_and_state_dict_keys():
    network = _network()
    chunks, text = _chunks(network, 2)
    before, _ = _stream(network, chunks, text, window=32, sink=0)
    assert "blocks.0.self_attn.q.weight" in network.state_dict()
    network.update_parameters_after_loading_checkpoint()
    network.update_parameters_after_loading_checkpoint()  # idempotent
    after, _ = _stream(network, chunks, text, window=32, sink=0)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    keys = network.state_dict()
    assert "blocks.0.self_attn.qkv.weight" in keys and "blocks.0.self_attn.q.weight" not in keys


def test_patchify_roundtrip_and_pattern():
    network = _network()
    x = torch.randn(3, 4, 16, 6, 8)  # [B, T, C, H, W]
    tokens = network.patchify_and_maybe_split_cp(x)
    assert tokens.shape == (3, 4 * 3 * 4, 16 * 4)
    # token (t=1, h=2, w=3) holds channels-major (c kh kw) of that patch
    token = tokens[0, 1 * 12 + 2 * 4 + 3].reshape(16, 2, 2)
    torch.testing.assert_close(token, x[0, 1, :, 4:6, 6:8])
    back = network.unpatchify_and_maybe_gather_cp(3, 4, tokens)
    assert torch.equal(back, x)


def test_patchify_rejects_indivisible_latent():
    network = _network()
    with pytest.raises(ValueError, match=r"not divisible by the patch size \(1, 2, 2\)"):
        network.patchify_and_maybe_split_cp(torch.randn(1, 2, 16, 5, 4))


def test_wrong_text_width_and_length_raise():
    network = _network()
    with pytest.raises(
        ValueError, match="text embeddings have width 31, but the network expects text_dim=32"
    ):
        network.initialize_cache(4, 0, 0, torch.randn(1, 5, 31))
    with pytest.raises(ValueError, match="text embeddings have 33 tokens, more than text_len=32"):
        network.initialize_cache(4, 0, 0, torch.randn(1, 33, 32))


def test_image_embeddings_rules():
    network = _network()
    with pytest.raises(ValueError, match="no image cross-attention"):
        network.initialize_cache(4, 0, 0, torch.randn(1, 5, 32), torch.randn(1, 3, 32))
    i2v = _network(cross_attn_enable_img=True)
    with pytest.raises(ValueError, match="image embeddings are required"):
        i2v.initialize_cache(4, 0, 0, torch.randn(1, 5, 32))
    with pytest.raises(
        ValueError, match="image embeddings have width 8, but the network expects img_dim=32"
    ):
        i2v.initialize_cache(4, 0, 0, torch.randn(1, 5, 32), torch.randn(1, 3, 8))


def test_bad_timestep_shape_raises():
    network = _network()
    cache = network.initialize_cache(8, 0, 0, torch.randn(2, 5, 32))
    x = torch.randn(2, 8, 64)
    freqs = _rope(network).chunk_freqs(0, 2)
    with pytest.raises(ValueError, match="timesteps must be per-sample"):
        network(x, torch.zeros(2, 3, 8), cache, freqs)


def test_linear_patch_embedding_and_padding_mask_channel():
    network = _network(patch_embedding_type="linear", concat_padding_mask=True)
    assert network.patch_embedding.in_features == 17 * 4
    cache = network.initialize_cache(8, 0, 0, torch.randn(1, 5, 32))
    out = network(torch.randn(1, 8, 64), torch.tensor(3.0), cache, _rope(network).chunk_freqs(0, 2))
    assert out.shape == (1, 8, 64)


def test_set_context_parallel_group_stores_on_blocks():
    from flashdreams.core.attention.context_parallel import ContextParallelSelfAttention
    from flashdreams.core.distributed import ContextParallelMesh, ParallelDims

    network = _network()
    mesh = ContextParallelMesh(
        parallel_dims=ParallelDims(2), rank=0, cp_group=None, ulysses_group=None, ring_group=None
    )
    strategy = ContextParallelSelfAttention(mesh)
    network.set_context_parallel_group(strategy)
    assert all(block.self_attn.context_parallel is strategy for block in network.blocks)
    assert network.cp_mesh is mesh
    network.set_context_parallel_group()
    assert all(block.self_attn.context_parallel is None for block in network.blocks)
    with pytest.raises(ValueError, match=r"^set_context_parallel_group takes None, .*got object$"):
        network.set_context_parallel_group(object())


def test_presets_match_published_sizes():
    small, large, ti2v = (
        WanDiTNetwork1pt3BConfig(),
        WanDiTNetwork14BConfig(),
        WanDiTNetworkTI2V5BConfig(),
    )
    assert (small.dim, small.ffn_dim, small.num_heads, small.num_layers) == (1536, 8960, 12, 30)
    assert (large.dim, large.ffn_dim, large.num_heads, large.num_layers) == (5120, 13824, 40, 40)
    assert (ti2v.dim, ti2v.ffn_dim, ti2v.num_heads, ti2v.num_layers) == (3072, 14336, 24, 30)
    assert (ti2v.in_dim, ti2v.out_dim, ti2v.cross_attn_enable_img) == (48, 48, False)
    for config in (small, large, ti2v):
        assert config.patch_size == (1, 2, 2) and config.text_len == 512 and config.text_dim == 4096
        assert config.patch_embedding_type == "conv3d" and config.cp_method == "ring"
        assert config.apply_rope_before_kvcache and config.eps == 1e-6 and config.freq_dim == 256


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"dim \(30\) must be divisible by num_heads \(4\)"):
        WanDiTNetworkTinyConfig(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="cp_method must be 'ring' or 'ulysses'"):
        WanDiTNetworkTinyConfig(cp_method="both")


def test_attention_backend_serves_every_self_and_cross_attention_call(monkeypatch):
    """``attention_backend`` reaches every attention call of the network (one entry point),
    and an unknown name fails at config time with the registered names."""
    import dataclasses

    from flashdreams.core.attention import backends

    calls = []
    math_backend = backends.get_attention_backend("math")

    def counting(q, k, v, key_padding_mask):
        calls.append(k.shape[1])
        return math_backend.fn(q, k, v, key_padding_mask)

    counting_backend = dataclasses.replace(math_backend, name="counting_math", fn=counting)
    monkeypatch.setitem(backends._REGISTRY, "counting_math", counting_backend)
    counted = _network(attention_backend="counting_math")
    reference = _network()
    text = torch.randn(1, 5, 32)
    x = torch.randn(1, 8, 64)
    freqs = _rope(counted).chunk_freqs(0, 2)
    outs = []
    for network in (counted, reference):
        cache = network.initialize_cache(8, 8, 0, text)
        outs.append(network(x, torch.tensor(3.0), cache, freqs))
    # two blocks: self-attention over the 8 chunk tokens, cross-attention over 32 text tokens
    assert calls == [8, 32, 8, 32]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"^attention_backend must be one of auto, .*got 'fast'$"):
        WanDiTNetworkTinyConfig(attention_backend="fast")
