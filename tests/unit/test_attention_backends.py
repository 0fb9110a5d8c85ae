"""Attention backends on CPU: parity with torch SDPA, lse, masks, merges, registry errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flashdreams.core.attention.backends import (
    attention,
    attention_with_lse,
    get_attention_backend,
    list_attention_backends,
    select_attention_backend,
)
from flashdreams.core.attention.merge import AttentionAccumulator, merge_attention_partials


def qkv(num_q=9, num_kv=13, heads=3, head_dim=8, batch=2, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, num_q, heads, head_dim)] + [(batch, num_kv, heads, head_dim)] * 2
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def sdpa(q, k, v, mask=None):
    attn_mask = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
    ).transpose(1, 2)


def explicit_lse(q, k, mask=None):
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], -math.inf)
    return torch.logsumexp(scores, dim=-1)


def test_registry_lists_cpu_and_gpu_backends():
    assert {"math", "sdpa", "flash_attn", "torch_efficient", "cudnn"} <= set(
        list_attention_backends()
    )
    q = torch.zeros(1, 1, 1, 4)
    assert select_attention_backend(q, need_lse=True).name == "cpu_flash"
    assert select_attention_backend(q, need_lse=False).name == "sdpa"
    with pytest.raises(
        KeyError, match="unknown attention backend 'nope'; registered: cpu_flash, cudnn"
    ):
        get_attention_backend("nope")
    with pytest.raises(ValueError, match="attention backend 'flash_attn' runs on cuda, not cpu"):
        attention_with_lse(q, q, q, backend="flash_attn")
    with pytest.raises(
        ValueError, match="attention backend 'sdpa' does not return the log-sum-exp"
    ):
        attention_with_lse(q, q, q, backend="sdpa")


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_matches_sdpa_with_and_without_mask(backend):
    q, k, v = qkv()
    mask = torch.rand(2, 13, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[:, 0] = True
    assert (attention(q, k, v, backend=backend) - sdpa(q, k, v)).abs().max() <= 1e-6
    assert (attention(q, k, v, mask, backend=backend) - sdpa(q, k, v, mask)).abs().max() <= 1e-6


def test_cpu_flash_matches_sdpa_and_explicit_lse():
    q, k, v = qkv()
    out, lse = attention_with_lse(q, k, v, backend="cpu_flash")
    assert (out - sdpa(q, k, v)).abs().max() <= 1e-6
    assert (lse.double() - explicit_lse(q, k, None)).abs().max() <= 1e-5
    # A trailing-padding mask is served by slicing the keys off.
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[:, 9:] = False
    out, lse = attention_with_lse(q, k, v, mask, backend="cpu_flash")
    assert (out - sdpa(q, k, v, mask)).abs().max() <= 1e-6
    assert (lse.double() - explicit_lse(q, k, mask)).abs().max() <= 1e-5


def test_math_lse_and_fully_masked_rows():
    q, k, v = qkv()
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1] = False  # batch row 1 has no valid key
    out, lse = attention_with_lse(q, k, v, mask)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 9)
    assert (lse[0].double() - explicit_lse(q, k, mask)[0]).abs().max() <= 1e-5
    assert (out[0] - sdpa(q[:1], k[:1, :5], v[:1, :5])[0]).abs().max() <= 1e-6
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all()


def test_math_chunking_matches_unchunked(monkeypatch):
    import flashdreams.core.attention.backends as backends

    q, k, v = qkv(num_q=50, num_kv=20)
    full_out, full_lse = attention_with_lse(q, k, v)
    monkeypatch.setattr(backends, "_MATH_MAX_SCORE_ELEMENTS", 2 * 3 * 20 * 7)  # 7-query chunks
    out, lse = attention_with_lse(q, k, v)
    assert torch.allclose(out, full_out, atol=1e-6) and torch.allclose(lse, full_lse, atol=1e-6)


def test_bf16_inputs_return_bf16_output_and_fp32_lse():
    q, k, v = qkv(dtype=torch.bfloat16)
    out, lse = attention_with_lse(q, k, v)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert (out.float() - sdpa(q.float(), k.float(), v.float())).abs().max() <= 2e-2


def test_merge_of_partials_equals_full_attention():
    q, k, v = qkv(num_kv=12)
    splits = [(0, 4), (4, 5), (5, 12)]
    acc = AttentionAccumulator()
    for start, end in splits:
        acc.add(*attention_with_lse(q, k[:, start:end], v[:, start:end]))
    acc.add(*attention_with_lse(q, k[:, :0], v[:, :0]))  # an empty shard changes nothing
    assert (acc.result(torch.float32) - sdpa(q, k, v)).abs().max() <= 1e-6
    assert (acc.lse.double() - explicit_lse(q, k)).abs().max() <= 1e-5

    empty_out, empty_lse = attention_with_lse(q, k[:, :0], v[:, :0])
    out, lse = merge_attention_partials(empty_out, empty_lse, empty_out, empty_lse)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_shape_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"key_padding_mask must be bool \[B, Lk\] = \(2, 13\)"):
        attention(q, k, v, torch.ones(2, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="must agree on batch, heads and head dim"):
        attention(q[:, :, :2], k, v)
