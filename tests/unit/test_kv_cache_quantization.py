"""Quantised KV cache (int8 / fp8 e4m3, per token and head scales): bytes, reads, rollout error.

Rollout error bound, from measurement (tiny DiT, sink 1 + window 2 frames, 5 chunks, the
clean latents vs the full-precision cache on the same seed): int8 measured 1.1e-4 and
fp8 e4m3 4.9e-4 (3 mantissa bits: ~2% rms error per stored value against ~0.5% for
int8, diluted by the chunk's own unquantised K/V and by the softmax average). Bounds,
4x the measurement: 5e-4 for int8 and 2e-3 for fp8; a lost scale or a wrong token order
is O(1).
CP equality with quantised caches is in tests/distributed/test_wan_cp.py.
"""

from __future__ import annotations

import pytest
import torch
from test_quantization import tiny_rollout
from test_wan_transformer import _config

from flashdreams.core.attention import KVCache
from flashdreams.core.attention.kv_cache import dequantize, quantize_per_token_head


def _cache(quantization: str, dtype=torch.float32, head_dim=8, batch_size=1) -> KVCache:
    return KVCache(
        batch_size=batch_size,
        num_heads=2,
        head_dim=head_dim,
        chunk_size=3,
        window_size=6,
        sink_size=3,
        dtype=dtype,
        quantization=quantization,
    )


def _chunk(seed: int, batch_size: int = 1, head_dim: int = 8) -> torch.Tensor:
    return torch.randn(batch_size, 3, 2, head_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quantization", ["int8", "fp8_e4m3"])
def test_bytes_half_of_bf16_at_head_dim_128(quantization):
    quantized = _cache(quantization, head_dim=128).storage_bytes()
    bf16 = _cache("none", dtype=torch.bfloat16, head_dim=128).storage_bytes()
    fp32 = _cache("none", dtype=torch.float32, head_dim=128).storage_bytes()
    # K and V: 1 byte per element + one bf16 scale per 128 elements; the bool mask alike.
    num_elements = 2 * 1 * 12 * 2 * 128  # K and V, batch 1, capacity 3 + 6 + 3, 2 heads
    mask_bytes = 12
    assert quantized == num_elements * (1 + 2 / 128) + mask_bytes
    assert bf16 == num_elements * 2 + mask_bytes and fp32 == num_elements * 4 + mask_bytes
    assert quantized / bf16 < 0.51 and quantized / fp32 < 0.255


@pytest.mark.parametrize("quantization", ["int8", "fp8_e4m3"])
def test_reads_dequantised_tokens_in_order_through_eviction(quantization):
    """Committed tokens read back as their own quantise -> dequantise round trip; the
    staged chunk reads back exactly; eviction moves values and scales together."""
    cache = _cache(quantization, batch_size=2)
    chunks = [_chunk(seed, batch_size=2) for seed in range(6)]
    for index, chunk in enumerate(chunks):
        k_all, v_all, _ = cache.stage(chunk, -chunk)
        committed = chunks[:index]
        if len(committed) > 3:  # sink (1 chunk) + window (2 chunks)
            committed = committed[:1] + committed[-2:]
        expected = [
            dequantize(*quantize_per_token_head(c, quantization), c.dtype) for c in committed
        ]
        assert torch.equal(k_all, torch.cat([*expected, chunk], dim=1))
        assert torch.equal(v_all, -k_all)
        cache.commit(3)
    # batch rows of a slice read their rows of the values and scales
    view = cache.batch_slice(1, 2)
    k_view, _, _ = view.stage(chunks[0][1:], chunks[0][1:])
    k_full, _, _ = cache.stage(chunks[0], chunks[0])
    assert torch.equal(k_view, k_full[1:])


@pytest.mark.parametrize("quantization", ["int8", "fp8_e4m3"])
def test_round_trip_error_and_zero_tokens(quantization):
    x = torch.randn(4, 16, 2, 128, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 0.0  # an all-zero token keeps a finite scale and reads back as zero
    q, scale = quantize_per_token_head(x, quantization)
    back = dequantize(q, scale, torch.float32)
    assert torch.isfinite(back).all() and torch.equal(back[0, 0], x[0, 0])
    error = ((back - x).norm() / x.norm()).item()
    assert error < (0.01 if quantization == "int8" else 0.04), error


def test_unknown_mode_is_a_value_error():
    with pytest.raises(
        ValueError, match="KV cache quantization must be one of none, int8, fp8_e4m3; got 'int4'"
    ):
        _cache("int4")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of none, int8, fp8_e4m3"):
        _config(kv_cache_dtype="fp16")


def _rollout(kv_cache_dtype: str) -> tuple[torch.Tensor, int]:
    latents, cache = tiny_rollout(
        num_chunks=5, len_t=1, window_size_t=2, sink_size_t=1, kv_cache_dtype=kv_cache_dtype
    )
    return latents, cache.batched_network_cache.self_attention_storage_bytes()


@pytest.mark.parametrize(("kv_cache_dtype", "bound"), [("int8", 5e-4), ("fp8_e4m3", 2e-3)])
def test_rollout_error_vs_full_precision_cache(kv_cache_dtype, bound):
    reference, reference_bytes = _rollout("none")
    quantized, quantized_bytes = _rollout(kv_cache_dtype)
    error = ((quantized - reference).norm() / reference.norm()).item()
    print(
        f"kv_cache_dtype={kv_cache_dtype}: rollout error {error:.2e}, bytes {quantized_bytes / reference_bytes:.3f}x fp32"
    )
    assert 0 < error <= bound
    # tiny head dim 16: 1 + 2/16 bytes per element vs 4 (the bool mask adds a little)
    assert quantized_bytes / reference_bytes < 0.3
