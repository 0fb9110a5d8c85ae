"""KVCache (sink + rolling window, preallocated) and the attend entry point."""

from __future__ import annotations

import pytest
import torch

from flashdreams.core.attention import KVCache, attend


def _cache(**overrides):
    kwargs = dict(batch_size=1, num_heads=1, head_dim=2, chunk_size=2, window_size=4, sink_size=2)
    kwargs.update(overrides)
    return KVCache(**kwargs)


def _chunk(start: int, n: int = 2) -> torch.Tensor:
    """K/V whose first feature is the global token index."""
    values = torch.arange(start, start + n, dtype=torch.float32)
    return values[None, :, None, None].expand(1, n, 1, 2).clone()


def test_sink_and_window_keep_first_and_latest_tokens():
    cache = _cache()
    addresses = (cache.k.data_ptr(), cache.v.data_ptr())
    bytes_before = cache.storage_bytes()
    for step in range(6):  # 12 tokens through a sink of 2 + window of 4
        k_all, _, _ = cache.stage(_chunk(2 * step), _chunk(2 * step))
        assert k_all.shape[1] == min(2 * step, 6) + 2
        cache.commit(2)
    held = cache.k[0, : cache.num_filled, 0, 0].tolist()
    assert held == [0.0, 1.0, 8.0, 9.0, 10.0, 11.0]
    assert cache.is_full and cache.counters.num_committed == 12
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == addresses
    assert cache.storage_bytes() == bytes_before


def test_stage_without_commit_does_not_write():
    cache = _cache()
    cache.stage(_chunk(0), _chunk(0))
    cache.commit(2)
    cache.stage(_chunk(100), _chunk(100))  # a denoising step
    k_all, _, _ = cache.stage(_chunk(2), _chunk(2))  # the next step overwrites the same slot
    assert k_all[0, :, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert cache.num_filled == 2


def test_sink_not_multiple_of_chunk():
    cache = _cache(sink_size=3, window_size=0)
    for step in range(4):
        cache.stage(_chunk(2 * step), _chunk(2 * step))
        cache.commit(2)
    assert cache.k[0, :3, 0, 0].tolist() == [0.0, 1.0, 2.0]


def test_invalid_sizes_raise():
    with pytest.raises(ValueError, match="chunk_size must be positive, got 0"):
        _cache(chunk_size=0)
    with pytest.raises(ValueError, match="window_size and sink_size must be >= 0"):
        _cache(window_size=-1)


def test_batch_slice_shares_storage_and_counters():
    cache = _cache(batch_size=2)
    view = cache.batch_slice(1, 2)
    view.stage(torch.ones(1, 2, 1, 2), torch.ones(1, 2, 1, 2))
    view.commit(2)
    assert cache.num_filled == 2
    assert cache.k[1, :2].eq(1).all() and cache.k[0, :2].eq(0).all()


def test_self_attention_with_cache_equals_attention_over_concatenation():
    torch.manual_seed(0)
    cache = _cache(num_heads=2, head_dim=4, chunk_size=3, window_size=6, sink_size=0)
    history_k, history_v = [], []
    for _ in range(3):
        q, k, v = (torch.randn(1, 3, 2, 4) for _ in range(3))
        out = attend(q, k, v, kv_cache=cache, commit=True)
        keys = torch.cat(history_k + [k], dim=1)
        values = torch.cat(history_v + [v], dim=1)
        torch.testing.assert_close(out, attend(q, keys, values), rtol=0, atol=1e-6)
        history_k.append(k)
        history_v.append(v)


def test_key_valid_mask_excludes_padding_keys():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 1, 4) for _ in range(3))
    valid = torch.tensor([True, True, True, False])
    out = attend(q, k, v, key_valid_mask=valid)
    expected = attend(q, k[:, :3], v[:, :3])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_relative_rope_rotates_concatenated_keys_from_cache_start():
    calls = []

    def rope(x, start, stop):
        calls.append((x.shape[1], start, stop))
        return x

    cache = _cache(head_dim=2, chunk_size=2, window_size=2, sink_size=0)
    for _ in range(3):
        q = k = v = torch.randn(1, 2, 1, 2)
        attend(q, k, v, kv_cache=cache, commit=True, relative_rope=rope)
    # keys: [cache | current] from 0; queries: the tail of that sequence
    assert calls == [(2, 0, 2), (2, 0, 2), (4, 0, 4), (2, 2, 4), (4, 0, 4), (2, 2, 4)]
