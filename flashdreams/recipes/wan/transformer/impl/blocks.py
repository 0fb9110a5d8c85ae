"""Building blocks of the Wan DiT (parameter names follow the original Wan checkpoints).

Shape legend::

    B  batch               L  tokens of the current chunk (this rank)
    C  model dim (dim)     H  heads, D = C / H head dim
    Lt text tokens         Li image tokens
    Le 1 (one timestep per sample) or L (one per token)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from flashdreams.core.attention import KVCache, RelativeRope, attend
from flashdreams.recipes.wan.transformer.impl.rope import apply_rope

if TYPE_CHECKING:
    from flashdreams.core.attention.context_parallel import ContextParallelSelfAttention


def _modulation_init(num_vectors: int, dim: int) -> torch.Tensor:
    """``[1, num_vectors, dim]`` AdaLN modulation, N(0, 1 / dim); left empty on the meta device.

    Any computing op on the meta device (even ``randn``) makes torch import its Python
    reference kernels (and sympy) on first use, ~1.5 s of a checkpoint load that fills
    every parameter anyway.
    """
    if torch.get_default_device().type == "meta":  # in empty_init(): the checkpoint fills it
        return torch.empty(1, num_vectors, dim)
    return torch.randn(1, num_vectors, dim) / dim**0.5


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, result cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class WanRMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32, with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        # mean of squares from the L2 norm: one reduction pass, no [..., C] temporary
        mean_square = torch.linalg.vector_norm(x_float, dim=-1, keepdim=True).square_()
        inv_rms = mean_square.div_(x.shape[-1]).add_(self.eps).rsqrt_()
        # the product is a fresh tensor (also after the cast), so scale it in place
        return (x_float * inv_rms).type_as(x).mul_(self.weight)


def sinusoidal_timestep_embedding(timesteps: torch.Tensor, freq_dim: int) -> torch.Tensor:
    """Float timesteps ``[N]`` -> ``[N, freq_dim]`` = ``[cos | sin]`` of ``t * 10000**(-i/half)``, fp32."""
    half = freq_dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    inv_freq = torch.exp(exponent / half)
    angles = timesteps.float()[:, None] * inv_freq[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


@dataclass
class WanBlockCache:
    """Per-block rollout state: the self-attention KV cache and the cross-attention K/V."""

    self_kv: KVCache
    """Sink + rolling-window cache of this block's self-attention."""
    cross_k: torch.Tensor
    """Text keys ``[B, Lt, H, D]`` (normalised), computed once per rollout."""
    cross_v: torch.Tensor
    """Text values ``[B, Lt, H, D]``."""
    img_k: torch.Tensor | None = None
    """CLIP image keys ``[B, Li, H, D]`` (I2V networks only)."""
    img_v: torch.Tensor | None = None
    """CLIP image values ``[B, Li, H, D]``."""

    def batch_slice(self, start: int, stop: int) -> WanBlockCache:
        """View of batch rows ``[start:stop]`` sharing storage and KV bookkeeping."""

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start:stop]

        return WanBlockCache(
            self_kv=self.self_kv.batch_slice(start, stop),
            cross_k=self.cross_k[start:stop],
            cross_v=self.cross_v[start:stop],
            img_k=cut(self.img_k),
            img_v=cut(self.img_v),
        )

    def can_batch_with(self, other: WanBlockCache) -> bool:
        """Same-shaped caches at the same point of their rollouts (see :meth:`concat`)."""

        def same_shape(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
            return (a is None) == (b is None) and (a is None or a.shape[1:] == b.shape[1:])

        return (
            self.self_kv.can_batch_with(other.self_kv)
            and same_shape(self.cross_k, other.cross_k)
            and same_shape(self.img_k, other.img_k)
        )

    @classmethod
    def concat(cls, caches: Sequence[WanBlockCache]) -> WanBlockCache:
        """One cache over the batch rows of ``caches`` in order (new storage)."""

        def cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if tensors[0] is None else torch.cat(tensors, dim=0)

        return WanBlockCache(
            self_kv=type(caches[0].self_kv).concat([cache.self_kv for cache in caches]),
            cross_k=torch.cat([cache.cross_k for cache in caches], dim=0),
            cross_v=torch.cat([cache.cross_v for cache in caches], dim=0),
            img_k=cat([cache.img_k for cache in caches]),
            img_v=cat([cache.img_v for cache in caches]),
        )

    def split_rows(self, ranges: Sequence[tuple[int, int]]) -> list[WanBlockCache]:
        """Caches over the batch rows of each range (views; own KV bookkeeping)."""
        return [
            WanBlockCache(
                self_kv=self_kv,
                cross_k=self.cross_k[start:stop],
                cross_v=self.cross_v[start:stop],
                img_k=None if self.img_k is None else self.img_k[start:stop],
                img_v=None if self.img_v is None else self.img_v[start:stop],
            )
            for self_kv, (start, stop) in zip(self.self_kv.split_rows(ranges), ranges, strict=True)
        ]


class WanSelfAttention(nn.Module):
    """Self-attention with QK RMSNorm (over all heads) and RoPE.

    Parameters load as separate ``q`` / ``k`` / ``v`` projections;
    :meth:`fuse_qkv` replaces them with one ``qkv`` projection after loading.
    """

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)
        self.qkv: nn.Linear | None = None
        self.context_parallel: ContextParallelSelfAttention | None = None
        """Context-parallel strategy (set by ``WanDiTNetwork.set_context_parallel_group``)."""
        self.attention_backend = "auto"
        """Attention backend name (``WanDiTNetworkConfig.attention_backend``)."""
        self.attention_entry: Callable[..., torch.Tensor] = attend
        """The attention entry point; :meth:`WanDiTNetwork.compile_blocks` swaps in a
        copy that ``torch.compile`` leaves eager (it owns the KV-cache bookkeeping)."""

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Replace ``q``, ``k``, ``v`` with one projection (idempotent)."""
        if self.qkv is not None:
            return
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight])
        bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        # Built on the meta device and given the concatenated tensors: no initialisation
        # of a weight that is overwritten at once, no third copy.
        fused = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=self.q.weight.requires_grad)
        fused.bias = nn.Parameter(bias, requires_grad=self.q.bias.requires_grad)
        del self.q, self.k, self.v
        self.qkv = fused

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None,
        rope_freqs: torch.Tensor | None,
        *,
        commit: bool = False,
        relative_rope: RelativeRope | None = None,
        attention_mask: torch.Tensor | None = None,
        key_valid_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.qkv is not None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        # [B, L, C] -> [B, L, H, D]
        q = self.norm_q(q).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(k).unflatten(-1, (self.num_heads, -1))
        v = v.unflatten(-1, (self.num_heads, -1))
        if rope_freqs is not None:
            q = apply_rope(q, rope_freqs)
            k = apply_rope(k, rope_freqs)
        out = self.attention_entry(
            q,
            k,
            v,
            backend=self.attention_backend,
            kv_cache=kv_cache,
            commit=commit,
            context_parallel=self.context_parallel,
            key_valid_mask=key_valid_mask,
            relative_rope=relative_rope,
            attention_mask=attention_mask,
        )
        return self.o(out.flatten(-2))


class WanCrossAttention(nn.Module):
    """Cross-attention to the text tokens, plus the CLIP image tokens for I2V networks."""

    def __init__(self, dim: int, num_heads: int, eps: float, enable_img: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)
        self.enable_img = enable_img
        self.attention_backend = "auto"
        """Attention backend name (``WanDiTNetworkConfig.attention_backend``)."""
        if enable_img:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = WanRMSNorm(dim, eps)

    def context_kv(
        self, text_context: torch.Tensor, img_context: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """K/V of the (embedded) context, computed once per rollout; ``[B, Lt|Li, H, D]``."""
        heads = (self.num_heads, -1)
        k = self.norm_k(self.k(text_context)).unflatten(-1, heads)
        v = self.v(text_context).unflatten(-1, heads)
        if not self.enable_img:
            return k, v, None, None
        assert img_context is not None
        k_img = self.norm_k_img(self.k_img(img_context)).unflatten(-1, heads)
        v_img = self.v_img(img_context).unflatten(-1, heads)
        return k, v, k_img, v_img

    def forward(self, x: torch.Tensor, cache: WanBlockCache) -> torch.Tensor:
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        out = attend(q, cache.cross_k, cache.cross_v, backend=self.attention_backend)
        if self.enable_img:
            out = out + attend(q, cache.img_k, cache.img_v, backend=self.attention_backend)
        return self.o(out.flatten(-2))


class WanBlock(nn.Module):
    """One DiT block: AdaLN-modulated self-attention, cross-attention, AdaLN-modulated FFN."""

    def __init__(
        self,
        *,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        cross_attn_norm: bool,
        enable_img: bool,
        eps: float,
    ) -> None:
        super().__init__()
        self.norm1 = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, num_heads, eps)
        self.norm3 = (
            WanLayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        )
        self.cross_attn = WanCrossAttention(dim, num_heads, eps, enable_img)
        self.norm2 = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim)
        )
        self.modulation = nn.Parameter(_modulation_init(6, dim))

    def forward(
        self,
        x: torch.Tensor,
        time_modulation: torch.Tensor,
        cache: WanBlockCache,
        rope_freqs: torch.Tensor | None,
        *,
        commit: bool = False,
        relative_rope: RelativeRope | None = None,
        self_attn_mask: torch.Tensor | None = None,
        key_valid_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``[B, L, C]``, ``time_modulation`` ``[B, Le, 6, C]`` -> ``[B, L, C]``."""
        # [1, 6, C] + [B, Le, 6, C] -> six [B, Le, C] (fp32)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (
            self.modulation.float() + time_modulation.float()
        ).unbind(dim=2)
        # The norm outputs and projection outputs below are fresh tensors owned here, so
        # the modulation and gating update them in place instead of allocating [B, L, C]
        # temporaries; the residual stream x itself is never written in place.
        normed = self.norm1(x).float().mul_(1 + scale_sa).add_(shift_sa).type_as(x)
        attn = self.self_attn(
            normed,
            cache.self_kv,
            rope_freqs,
            commit=commit,
            relative_rope=relative_rope,
            attention_mask=self_attn_mask,
            key_valid_mask=key_valid_mask,
        )
        x = torch.addcmul(x.float(), attn.float(), gate_sa).type_as(x)
        x = self.cross_attn(self.norm3(x), cache).add_(x)
        normed = self.norm2(x).float().mul_(1 + scale_ff).add_(shift_ff).type_as(x)
        x = torch.addcmul(x.float(), self._ffn(normed).float(), gate_ff).type_as(x)
        return x

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        """``self.ffn`` with the GELU applied in place on the hidden activations."""
        up, activation, down = self.ffn
        hidden = up(x)
        torch.ops.aten.gelu_(hidden, approximate=activation.approximate)
        return down(hidden)


class WanHead(nn.Module):
    """Output head: AdaLN-modulated LayerNorm and a projection to patch channels."""

    def __init__(self, dim: int, out_features: int, eps: float) -> None:
        super().__init__()
        self.norm = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(_modulation_init(2, dim))

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, L, C]``, ``time_embedding`` ``[B, Le, C]`` -> ``[B, L, out_features]``."""
        # [1, 2, C] + [B, Le, 1, C] -> two [B, Le, C]
        shift, scale = (self.modulation.float() + time_embedding.float()[:, :, None]).unbind(dim=2)
        return self.head((self.norm(x).float() * (1 + scale) + shift).type_as(x))


class WanImageProjection(nn.Module):
    """CLIP image tokens -> model dim (LayerNorm, MLP with exact GELU, LayerNorm)."""

    def __init__(self, img_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            WanLayerNorm(img_dim),
            nn.Linear(img_dim, img_dim),
            nn.GELU(),
            nn.Linear(img_dim, dim),
            WanLayerNorm(dim),
        )

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        return self.proj(image_embeddings)
