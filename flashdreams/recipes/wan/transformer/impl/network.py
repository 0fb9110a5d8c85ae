"""The Wan diffusion transformer (Wan 2.1 / 2.2 DiT) as a streaming network.

Shape legend::

    ...  batch dims          B  their product
    T, C, H, W  latent frames, channels, height, width (unpatchified, time before channel)
    kt, kh, kw  patch size   L = (T/kt) (H/kh) (W/kw) tokens, frame-major
    D_in = in_dim * kt * kh * kw, D_out = out_dim * kt * kh * kw
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from flashdreams.core.attention import KVCache, RelativeRope, attend
from flashdreams.core.attention.backends import list_attention_backends
from flashdreams.core.distributed.sharding import gather_tokens, split_tokens
from flashdreams.infra.config import InstantiateConfig
from flashdreams.recipes.wan.transformer.impl.blocks import (
    WanBlock,
    WanBlockCache,
    WanHead,
    WanImageProjection,
    sinusoidal_timestep_embedding,
)

if TYPE_CHECKING:
    from flashdreams.core.attention.context_parallel import ContextParallelSelfAttention
    from flashdreams.core.distributed.mesh import ContextParallelMesh

PATCHIFY_PATTERN = "... (t kt) c (h kh) (w kw) -> ... (t h w) (c kt kh kw)"
UNPATCHIFY_PATTERN = "... (t h w) (c kt kh kw) -> ... (t kt) c (h kh) (w kw)"


def _cp_axes(
    process_groups: list[Any] | None, cp_dims: list[int | None] | None
) -> list[tuple[Any, int]]:
    """``(group, token dim)`` for every non-``None`` group; Wan splits the token axis only."""
    if not process_groups:
        return []
    dims = list(cp_dims) if cp_dims is not None else [None] * len(process_groups)
    if len(dims) != len(process_groups):
        raise ValueError(
            f"cp_dims has {len(dims)} entries but process_groups has {len(process_groups)}"
        )
    axes = []
    for group, dim in zip(process_groups, dims, strict=True):
        if group is None:
            continue
        if dim not in (None, -2):
            raise ValueError(
                f"Wan shards the flattened T*H*W token axis (dim -2); got cp_dims entry {dim}"
            )
        axes.append((group, -2))
    return axes


@dataclass(kw_only=True)
class WanDiTNetworkConfig(InstantiateConfig):
    """Configuration for the Wan DiT network (defaults: Wan 2.1 1.3B)."""

    _target: type[WanDiTNetwork] = field(default_factory=lambda: WanDiTNetwork)
    """Always :class:`WanDiTNetwork`."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Patch size ``(kt, kh, kw)`` over (frames, height, width)."""
    text_len: int = 512
    """Text tokens the network attends to; shorter embeddings are zero-padded to this length."""
    in_dim: int = 16
    """Input latent channels (36 = 16 noise + 4 mask + 16 image latent for Wan 2.1 I2V)."""
    dim: int = 1536
    """Hidden size of the transformer."""
    ffn_dim: int = 8960
    """Hidden size of the feed-forward layers."""
    freq_dim: int = 256
    """Size of the sinusoidal timestep embedding."""
    text_dim: int = 4096
    """Width of the text embeddings (UMT5-XXL: 4096)."""
    out_dim: int = 16
    """Output latent channels."""
    num_heads: int = 12
    """Attention heads."""
    num_layers: int = 30
    """Transformer blocks."""
    cross_attn_norm: bool = True
    """Apply an affine LayerNorm before cross-attention."""
    cross_attn_enable_img: bool = False
    """If True, build image cross-attention and the CLIP image projection (I2V)."""
    eps: float = 1e-6
    """Epsilon of the normalisation layers."""
    concat_padding_mask: bool = False
    """Append a padding-mask channel (all ones: no padding) to the input; the patch
    embedding then takes ``in_dim + 1`` channels."""
    patch_embedding_type: Literal["linear", "conv3d"] = "conv3d"
    """Type of patch embedding: ``"linear"`` (flattened patch MLP) or ``"conv3d"``
    (strided conv; stored as a Conv3d weight, applied as a matmul on patchified tokens)."""
    apply_rope_before_kvcache: bool = True
    """True: cache keys rotated at absolute positions. False: cache unrotated keys and
    rotate relative to the cache start, so rollouts can run past the trained length."""
    cp_method: Literal["ring", "ulysses"] = "ring"
    """Context-parallel attention method used when a CP group is set."""
    img_dim: int = 1280
    """Width of the CLIP image embeddings (open-clip ViT-H/14: 1280); used when
    ``cross_attn_enable_img``."""
    attention_backend: str = "auto"
    """Attention kernel of every self-, cross- and context-parallel attention call: a name
    from ``flashdreams.core.attention.backends.list_attention_backends()`` (``math``,
    ``sdpa``, ``cpu_flash``, ``torch_efficient``, ``flash_attn``, ``cudnn``, ``te_fused``:
    transformer-engine, CUDA and the ``[gpu]`` extra, no ring CP) or ``"auto"``
    (torch SDPA locally; the fastest backend returning the log-sum-exp for ring attention).
    A backend that cannot serve a call (device, dtype, no log-sum-exp for ring) raises
    ``ValueError`` saying why."""

    def __post_init__(self) -> None:
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.patch_embedding_type not in ("linear", "conv3d"):
            raise ValueError(
                f"patch_embedding_type must be 'linear' or 'conv3d', got {self.patch_embedding_type!r}"
            )
        if self.cp_method not in ("ring", "ulysses"):
            raise ValueError(f"cp_method must be 'ring' or 'ulysses', got {self.cp_method!r}")
        backends = ["auto", *list_attention_backends()]
        if self.attention_backend not in backends:
            raise ValueError(
                f"attention_backend must be one of {', '.join(backends)}; "
                f"got {self.attention_backend!r}"
            )
        self.patch_size = tuple(self.patch_size)  # type: ignore[assignment]

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(kw_only=True)
class WanDiTNetwork1pt3BConfig(WanDiTNetworkConfig):
    """Configuration for the 1.3B Wan DiT network."""


@dataclass(kw_only=True)
class WanDiTNetwork14BConfig(WanDiTNetworkConfig):
    """Configuration for the 14B Wan DiT network."""

    dim: int = 5120
    """Hidden size of the transformer."""
    ffn_dim: int = 13824
    """Hidden size of the feed-forward layers."""
    num_heads: int = 40
    """Attention heads."""
    num_layers: int = 40
    """Transformer blocks."""


@dataclass(kw_only=True)
class WanDiTNetworkTI2V5BConfig(WanDiTNetworkConfig):
    """Configuration for the Wan 2.2 TI2V 5B DiT network (48-channel latents, no CLIP branch)."""

    in_dim: int = 48
    """Input latent channels (the Wan 2.2 16x VAE has 48)."""
    dim: int = 3072
    """Hidden size (24 heads x 128)."""
    ffn_dim: int = 14336
    """Hidden size of the feed-forward layers."""
    out_dim: int = 48
    """Output latent channels."""
    num_heads: int = 24
    """Attention heads."""
    num_layers: int = 30
    """Transformer blocks."""


@dataclass(kw_only=True)
class WanDiTNetworkTinyConfig(WanDiTNetworkConfig):
    """Tiny random-weight Wan DiT for CPU tests: 2 layers, 2 heads, dim 32."""

    text_len: int = 32
    """Text tokens."""
    dim: int = 32
    """Hidden size."""
    ffn_dim: int = 64
    """Hidden size of the feed-forward layers."""
    freq_dim: int = 32
    """Size of the sinusoidal timestep embedding."""
    text_dim: int = 32
    """Width of the text embeddings."""
    num_heads: int = 2
    """Attention heads."""
    num_layers: int = 2
    """Transformer blocks."""
    img_dim: int = 32
    """Width of the image embeddings."""


@dataclass
class WanDiTNetworkCache:
    """Per-rollout state of a :class:`WanDiTNetwork`: one :class:`WanBlockCache` per block."""

    blocks: list[WanBlockCache]
    """Caches of the blocks, in order."""
    chunk_size: int
    """Tokens per chunk (all CP ranks together)."""
    window_size: int
    """Rolling-window tokens."""
    sink_size: int
    """Sink tokens."""
    num_committed_chunks: list[int] = field(default_factory=lambda: [0])
    """Chunks written so far (a one-element list, shared with batch slices)."""

    @property
    def chunk_index(self) -> int:
        """Index of the chunk being generated (= chunks already committed)."""
        return self.num_committed_chunks[0]

    @property
    def is_steady_state(self) -> bool:
        """Whether every self-attention cache is full (shapes no longer change)."""
        return all(block.self_kv.is_full for block in self.blocks)

    def batch_slice(self, start: int, stop: int) -> WanDiTNetworkCache:
        """View of batch rows ``[start:stop]`` sharing storage and bookkeeping."""
        return WanDiTNetworkCache(
            blocks=[block.batch_slice(start, stop) for block in self.blocks],
            chunk_size=self.chunk_size,
            window_size=self.window_size,
            sink_size=self.sink_size,
            num_committed_chunks=self.num_committed_chunks,
        )

    def can_batch_with(self, other: WanDiTNetworkCache) -> bool:
        """Whether ``other`` is at the same chunk of a same-shaped rollout (see :meth:`concat`)."""
        return (
            (self.chunk_size, self.window_size, self.sink_size, self.chunk_index)
            == (other.chunk_size, other.window_size, other.sink_size, other.chunk_index)
            and len(self.blocks) == len(other.blocks)
            and all(a.can_batch_with(b) for a, b in zip(self.blocks, other.blocks, strict=True))
        )

    @classmethod
    def concat(cls, caches: Sequence[WanDiTNetworkCache]) -> WanDiTNetworkCache:
        """One cache running the rollouts of ``caches`` as one batch, rows in order (new
        storage); they must :meth:`can_batch_with` each other."""
        first = caches[0]
        assert all(first.can_batch_with(other) for other in caches[1:])
        return WanDiTNetworkCache(
            blocks=[
                WanBlockCache.concat(list(blocks)) for blocks in zip(*(c.blocks for c in caches))
            ],
            chunk_size=first.chunk_size,
            window_size=first.window_size,
            sink_size=first.sink_size,
            num_committed_chunks=[first.chunk_index],
        )

    def split_rows(self, ranges: Sequence[tuple[int, int]]) -> list[WanDiTNetworkCache]:
        """Caches over the batch rows of each range: views of this storage, each with its
        own bookkeeping (stepping one no longer moves the others)."""
        per_block = [block.split_rows(ranges) for block in self.blocks]
        return [
            WanDiTNetworkCache(
                blocks=[parts[i] for parts in per_block],
                chunk_size=self.chunk_size,
                window_size=self.window_size,
                sink_size=self.sink_size,
                num_committed_chunks=[self.chunk_index],
            )
            for i in range(len(ranges))
        ]

    def self_attention_storage_bytes(self) -> int:
        """Bytes held by the self-attention KV caches of all blocks."""
        return sum(block.self_kv.storage_bytes() for block in self.blocks)


class WanDiTNetwork(nn.Module):
    """Wan diffusion backbone for text-to-video and image-to-video, chunk by chunk.

    Parameter names follow the original Wan checkpoints; load diffusers
    ``WanTransformer3DModel`` weights through
    :func:`~flashdreams.recipes.wan.transformer.checkpoint.wan_diffusers_state_dict_transform`.
    """

    def __init__(self, config: WanDiTNetworkConfig) -> None:
        super().__init__()
        self.config = config
        kt, kh, kw = config.patch_size
        patch_volume = kt * kh * kw
        in_channels = config.in_dim + (1 if config.concat_padding_mask else 0)
        if config.patch_embedding_type == "conv3d":
            self.patch_embedding: nn.Module = nn.Conv3d(
                in_channels, config.dim, kernel_size=config.patch_size, stride=config.patch_size
            )
        else:
            self.patch_embedding = nn.Linear(in_channels * patch_volume, config.dim)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, config.dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(config.dim, config.dim),
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(config.freq_dim, config.dim), nn.SiLU(), nn.Linear(config.dim, config.dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(config.dim, 6 * config.dim))
        self.blocks = nn.ModuleList(
            [
                WanBlock(
                    dim=config.dim,
                    ffn_dim=config.ffn_dim,
                    num_heads=config.num_heads,
                    cross_attn_norm=config.cross_attn_norm,
                    enable_img=config.cross_attn_enable_img,
                    eps=config.eps,
                )
                for _ in range(config.num_layers)
            ]
        )
        self.head = WanHead(config.dim, config.out_dim * patch_volume, config.eps)
        if config.cross_attn_enable_img:
            self.img_emb = WanImageProjection(config.img_dim, config.dim)
        # The original head emits channels as (kt kh kw c); once fused it emits (c kt kh kw).
        self._head_channels_first = False
        self.context_parallel: ContextParallelSelfAttention | None = None
        for block in self.blocks:
            block.self_attn.attention_backend = config.attention_backend
            block.cross_attn.attention_backend = config.attention_backend

    # ----------------------------------------------------------------- setup
    @property
    def patch_volume(self) -> int:
        return math.prod(self.config.patch_size)

    def set_context_parallel_group(self, cp_group: Any = None) -> None:
        """Set the context-parallel group used by every block's self-attention.

        Accepts ``None`` (local attention, the default), a
        ``torch.distributed.ProcessGroup`` (all its ranks form one ring or one
        Ulysses group, per ``config.cp_method``), a
        :class:`~flashdreams.core.distributed.ContextParallelMesh` (ring,
        Ulysses or USP), or a ready
        :class:`~flashdreams.core.attention.context_parallel.ContextParallelSelfAttention`.
        Groups and meshes become one such strategy, shared by the blocks. Call
        before :meth:`initialize_cache`: the caches are laid out for it.
        Nothing in ``forward`` reads ranks.
        """
        from flashdreams.core.attention.context_parallel import make_context_parallel

        strategy = make_context_parallel(
            cp_group,
            cp_method=self.config.cp_method,
            num_heads=self.config.num_heads,
            backend=self.config.attention_backend,
        )
        if (
            strategy is not None
            and not self.config.apply_rope_before_kvcache
            and not strategy.supports_relative_rope
        ):
            raise NotImplementedError(
                "apply_rope_before_kvcache=False (cache-relative RoPE) is not supported with "
                "ring or USP context parallelism: each rank caches a strided share of the "
                "sequence; use cp_method='ulysses' (ring degree 1) or absolute RoPE"
            )
        self.context_parallel = strategy
        for block in self.blocks:
            block.self_attn.context_parallel = strategy

    @property
    def cp_mesh(self) -> ContextParallelMesh | None:
        """The :class:`~flashdreams.core.distributed.ContextParallelMesh` in use, or ``None``."""
        return None if self.context_parallel is None else self.context_parallel.mesh

    @torch.no_grad()
    def update_parameters_after_loading_checkpoint(self) -> None:
        """Fuse what is known at load time into the weights; call once after loading.

        * self-attention ``q`` / ``k`` / ``v`` -> one ``qkv`` projection;
        * output head rows reordered from ``(kt kh kw c)`` to ``(c kt kh kw)``
          so the output needs no channel permute.

        Idempotent. The state dict afterwards uses ``qkv`` keys.
        """
        for block in self.blocks:
            block.self_attn.fuse_qkv()
        if not self._head_channels_first:
            out_dim = self.config.out_dim
            head = self.head.head
            # rows (k c) -> (c k), k = kt*kh*kw patch positions
            order = torch.arange(head.out_features, device=head.weight.device)
            order = order.reshape(self.patch_volume, out_dim).t().reshape(-1)
            head.weight.copy_(head.weight[order])
            head.bias.copy_(head.bias[order])
            self._head_channels_first = True

    def compile_blocks(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` every block in place; the self-attention entry point stays eager.

        The entry point reads and advances the KV cache through Python ints that
        change on every chunk while the window fills; traced into a graph they
        force a recompile per chunk (until dynamo's limit, after which it runs
        eagerly for good) or symbolic shapes. Left out, each block sees the same
        shapes on every chunk, and all blocks share one compiled graph (their
        parameters are graph inputs). ``compile_kwargs`` go to ``torch.compile``.
        """
        eager_entry = torch.compiler.disable(attend)
        for block in self.blocks:
            block.self_attn.attention_entry = eager_entry
            block.compile(**compile_kwargs)

    def keep_modulation_in_fp32(self) -> None:
        """Keep the time embedding and modulation tables in fp32 (upstream does) after ``.to(dtype)``."""
        self.time_embedding.float()
        self.time_projection.float()
        self.head.modulation.data = self.head.modulation.data.float()
        for block in self.blocks:
            block.modulation.data = block.modulation.data.float()

    # ------------------------------------------------------------- patchify
    def patchify_and_maybe_split_cp(
        self,
        x: torch.Tensor,
        process_groups: list[Any] | None = None,
        cp_dims: list[int | None] | None = None,
    ) -> torch.Tensor:
        """``[..., T, C, H, W]`` -> ``[..., L, C*kt*kh*kw]`` (pattern :data:`PATCHIFY_PATTERN`).

        Each non-``None`` group of ``process_groups`` then splits the token axis
        (``cp_dims`` entries must be ``None`` or ``-2``: Wan shards the flattened
        ``T*H*W`` tokens) with :func:`~flashdreams.core.distributed.split_tokens`:
        ``ceil(L / N)`` slots per rank, zero padding at the end of the sequence.
        """
        from einops import rearrange

        kt, kh, kw = self.config.patch_size
        _, _, height, width = x.shape[-4:]
        if x.shape[-4] % kt or height % kh or width % kw:
            raise ValueError(
                f"latent (T, H, W) = {tuple(x.shape[-4:-3]) + (height, width)} is not divisible "
                f"by the patch size {self.config.patch_size}"
            )
        tokens = rearrange(x, PATCHIFY_PATTERN, kt=kt, kh=kh, kw=kw)
        for group, dim in _cp_axes(process_groups, cp_dims):
            import torch.distributed as dist

            tokens = split_tokens(tokens, dim, dist.get_rank(group), dist.get_world_size(group))
        return tokens

    def unpatchify_and_maybe_gather_cp(
        self,
        pH: int,
        pW: int,
        x: torch.Tensor,
        process_groups: list[Any] | None = None,
        cp_dims: list[int | None] | None = None,
        *,
        num_tokens: int | None = None,
    ) -> torch.Tensor | None:
        """``[..., L, C*kt*kh*kw]`` -> ``[..., T, C, H, W]`` (pattern :data:`UNPATCHIFY_PATTERN`).

        ``pH`` / ``pW`` are the token-grid height / width (``H / kh``, ``W / kw``).
        With groups, the shards are first gathered on rank 0 of each group (a
        gather, not an all-gather; innermost split first) and the padding is
        stripped to ``num_tokens`` (default: no padding). Other ranks get ``None``.
        """
        from einops import rearrange

        axes = _cp_axes(process_groups, cp_dims)
        for index, (group, dim) in enumerate(reversed(axes)):
            import torch.distributed as dist

            world_size = dist.get_world_size(group)
            outermost = index == len(axes) - 1
            full = x.shape[dim] * world_size
            target = num_tokens if (outermost and num_tokens is not None) else full
            x = gather_tokens(x, dim, target, group, dst=0)
            if x is None:
                return None
        kt, kh, kw = self.config.patch_size
        return rearrange(x, UNPATCHIFY_PATTERN, h=pH, w=pW, kt=kt, kh=kh, kw=kw)

    # ---------------------------------------------------------------- cache
    def embed_text(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """``[..., Lt, text_dim]`` -> ``[B, text_len, dim]`` (zero-padded to ``text_len`` first)."""
        config = self.config
        if text_embeddings.shape[-1] != config.text_dim:
            raise ValueError(
                f"text embeddings have width {text_embeddings.shape[-1]}, but the network "
                f"expects text_dim={config.text_dim} (shape [..., text_len, {config.text_dim}])"
            )
        if text_embeddings.ndim < 2:
            raise ValueError(
                f"text embeddings must be [..., Lt, text_dim], got {tuple(text_embeddings.shape)}"
            )
        num_tokens = text_embeddings.shape[-2]
        if num_tokens > config.text_len:
            raise ValueError(
                f"text embeddings have {num_tokens} tokens, more than text_len={config.text_len}"
            )
        text = text_embeddings.reshape(-1, num_tokens, config.text_dim)
        if num_tokens < config.text_len:
            text = F.pad(text, (0, 0, 0, config.text_len - num_tokens))
        weight = self.text_embedding[0].weight
        return self.text_embedding(text.to(weight.dtype))

    def embed_image(
        self, img_embeddings: torch.Tensor | None, batch_size: int
    ) -> torch.Tensor | None:
        config = self.config
        if not config.cross_attn_enable_img:
            if img_embeddings is not None:
                raise ValueError(
                    "image embeddings were given, but this network has no image cross-attention "
                    "(cross_attn_enable_img=False)"
                )
            return None
        if img_embeddings is None:
            raise ValueError(
                "this network has image cross-attention (cross_attn_enable_img=True): "
                "image embeddings are required"
            )
        if img_embeddings.shape[-1] != config.img_dim:
            raise ValueError(
                f"image embeddings have width {img_embeddings.shape[-1]}, but the network "
                f"expects img_dim={config.img_dim}"
            )
        image = img_embeddings.reshape(-1, *img_embeddings.shape[-2:])
        if image.shape[0] != batch_size:
            raise ValueError(
                f"image embeddings have batch {image.shape[0]} but text embeddings have {batch_size}"
            )
        return self.img_emb(image.to(self.img_emb.proj[1].weight.dtype))

    @torch.no_grad()
    def initialize_cache(
        self,
        chunk_size: int,
        window_size: int,
        sink_size: int,
        text_embeddings: torch.Tensor,
        img_embeddings: torch.Tensor | None = None,
        kv_cache_quantization: str = "none",
    ) -> WanDiTNetworkCache:
        """Build the per-block caches of a rollout.

        Args:
            chunk_size: tokens appended per self-attention update (``L``, all
                CP ranks together).
            window_size: rolling-window size in tokens (all ranks together).
            sink_size: sink tokens kept from the start of the rollout (all ranks together).
            text_embeddings: ``[..., Lt, text_dim]`` (UMT5: ``[..., 512, 4096]``).
            img_embeddings: ``[..., Li, img_dim]`` for I2V networks (CLIP: ``[..., 257, 1280]``).
            kv_cache_quantization: storage of the self-attention caches (``"none"``,
                ``"int8"``, ``"fp8_e4m3"``; see :class:`~flashdreams.core.attention.KVCache`).

        Returns:
            Caches with preallocated self-attention K/V and the cross-attention
            K/V of the context, computed here once.
        """
        text_context = self.embed_text(text_embeddings)
        batch_size = text_context.shape[0]
        img_context = self.embed_image(img_embeddings, batch_size)
        reference = self.blocks[0].self_attn.o.weight
        # With context parallelism each rank caches its share of the chunk (see
        # flashdreams.core.attention.context_parallel); sizes stay global here.
        make_kv_cache = (
            KVCache if self.context_parallel is None else self.context_parallel.make_kv_cache
        )
        caches = []
        for block in self.blocks:
            cross_k, cross_v, img_k, img_v = block.cross_attn.context_kv(text_context, img_context)
            kv = make_kv_cache(
                batch_size=batch_size,
                num_heads=self.config.num_heads,
                head_dim=self.config.head_dim,
                chunk_size=chunk_size,
                window_size=window_size,
                sink_size=sink_size,
                device=reference.device,
                dtype=reference.dtype,
                quantization=kv_cache_quantization,
            )
            caches.append(WanBlockCache(kv, cross_k, cross_v, img_k, img_v))
        return WanDiTNetworkCache(
            blocks=caches, chunk_size=chunk_size, window_size=window_size, sink_size=sink_size
        )

    # -------------------------------------------------------------- forward
    def _embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.concat_padding_mask:
            # (c kt kh kw) layout: the extra channel's features come last
            ones = torch.ones(*x.shape[:-1], self.patch_volume, dtype=x.dtype, device=x.device)
            x = torch.cat([x, ones], dim=-1)
        if isinstance(self.patch_embedding, nn.Conv3d):
            # A stride == kernel Conv3d on (c kt kh kw) tokens is a matmul with the flat kernel.
            weight = self.patch_embedding.weight.flatten(1)
            return F.linear(x, weight, self.patch_embedding.bias)
        return self.patch_embedding(x)

    def _time_embeddings(
        self, timesteps: torch.Tensor, batch_shape: torch.Size, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(time_embedding [B, Le, C], time_modulation [B, Le, 6, C])``."""
        batch_size = math.prod(batch_shape)
        if timesteps.ndim == len(batch_shape) + 1 and timesteps.shape[-1] == num_tokens:
            per_sample = timesteps.expand(*batch_shape, num_tokens).reshape(batch_size, num_tokens)
        elif timesteps.ndim <= len(batch_shape):
            try:
                per_sample = timesteps.expand(batch_shape).reshape(batch_size, 1)
            except RuntimeError:
                per_sample = None
            if per_sample is None:
                raise ValueError(
                    f"timesteps of shape {tuple(timesteps.shape)} do not broadcast to the batch "
                    f"shape {tuple(batch_shape)}"
                )
        else:
            raise ValueError(
                f"timesteps must be per-sample (broadcastable to {tuple(batch_shape)}) or "
                f"per-token ({tuple(batch_shape) + (num_tokens,)}), got {tuple(timesteps.shape)}"
            )
        weight = self.time_embedding[0].weight
        sinusoid = sinusoidal_timestep_embedding(per_sample.flatten(), self.config.freq_dim)
        time_embedding = self.time_embedding(sinusoid.to(weight.dtype))
        time_modulation = self.time_projection(time_embedding)
        # [B*Le, C] -> [B, Le, C]; [B*Le, 6C] -> [B, Le, 6, C]
        time_embedding = time_embedding.reshape(batch_size, per_sample.shape[1], -1)
        time_modulation = time_modulation.reshape(batch_size, per_sample.shape[1], 6, -1)
        return time_embedding, time_modulation

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        cache: WanDiTNetworkCache,
        rope_freqs: torch.Tensor | None,
        current_chunk_idx: int = 0,
        eager_mode: bool = True,
        block_extra_kwargs: dict[str, Any] | None = None,
        *,
        commit: bool = False,
        relative_rope: RelativeRope | None = None,
    ) -> torch.Tensor:
        """Run one forward over the current chunk.

        Args:
            x: tokens ``[..., L, D_in]`` (layout ``... (t h w) (c kt kh kw)``).
            timesteps: per-sample (broadcastable to ``[...]``) or per-token ``[..., L]``
                float timesteps in ``[0, 1000]``.
            cache: caches from :meth:`initialize_cache` (batch ``B`` must match).
            rope_freqs: complex ``[L, 1, head_dim/2]`` freqs of the chunk's absolute
                positions (``apply_rope_before_kvcache=True``), or ``None`` when
                ``relative_rope`` rotates relative to the cache.
            current_chunk_idx: index of this chunk; must equal ``cache.chunk_index``.
            eager_mode: run the Python bookkeeping after a committing forward
                (CUDA-graph replays do it outside the graph instead).
            block_extra_kwargs: forwarded to every block (``self_attn_mask``,
                ``key_valid_mask``).
            commit: write this chunk's K/V into the caches (context-noise pass).
            relative_rope: cache-relative RoPE callback (``apply_rope_before_kvcache=False``).

        Returns:
            ``[..., L, D_out]`` with ``D_out = out_dim * kt * kh * kw`` (layout ``(c kt kh kw)``).
        """
        assert current_chunk_idx == cache.chunk_index, (current_chunk_idx, cache.chunk_index)
        batch_shape = x.shape[:-2]
        num_tokens = x.shape[-2]
        batch_size = math.prod(batch_shape)
        hidden = self._embed_patches(x.reshape(batch_size, num_tokens, x.shape[-1]))
        time_embedding, time_modulation = self._time_embeddings(timesteps, batch_shape, num_tokens)
        extra = block_extra_kwargs or {}
        for block, block_cache in zip(self.blocks, cache.blocks, strict=True):
            hidden = block(
                hidden,
                time_modulation,
                block_cache,
                rope_freqs,
                commit=commit,
                relative_rope=relative_rope,
                **extra,
            )
        out = self.head(hidden, time_embedding)
        if not self._head_channels_first:
            # (kt kh kw c) -> (c kt kh kw)
            out = out.unflatten(-1, (self.patch_volume, self.config.out_dim)).transpose(-1, -2)
            out = out.flatten(-2)
        if commit and eager_mode:
            cache.num_committed_chunks[0] += 1
        return out.reshape(*batch_shape, num_tokens, out.shape[-1])
