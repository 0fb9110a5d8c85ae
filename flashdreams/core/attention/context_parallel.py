"""Context-parallel self-attention with a streaming KV cache (ring, Ulysses, USP).

The tokens of each chunk are split over the ``N = U * R`` ranks of a
:class:`~flashdreams.core.distributed.ContextParallelMesh` with
:func:`~flashdreams.core.distributed.split_tokens`: every rank holds ``S =
ceil(L / N)`` slots, padding sits at the end of the sequence. Rank ``r =
ring_index * U + ulysses_index`` holds global slots ``[r*S, (r+1)*S)``.

One self-attention call on a rank::

    q, k, v            [B, S, H, D]        this rank's slots (RoPE already applied)
    Ulysses seq->head  [B, U*S, H/U, D]    the slots of the rank's Ulysses group,
                                           i.e. its "block" [g*U*S, (g+1)*U*S)
    drop padding keys  [B, n, H/U, D]      n real tokens of the block (n <= U*S)
    cache stage        [B, cached + n, ...] the rank's KV cache holds only real
                                           tokens of its block, for its H/U heads
    ring over R groups                     keys of the other blocks; LSE merge
    Ulysses head->seq  [B, S, H, D]

Because the cache never holds padding, no key mask is needed anywhere, and
the union of the caches of one ring is exactly the single-rank cache. The
per-rank sink / window budgets (:meth:`ChunkTokenLayout.cached_count`) count
the block's tokens among the first ``sink`` / last ``window`` global tokens,
so each rank evicts exactly the tokens the single-rank cache evicts. Padded
query rows compute garbage that is dropped when the latent is gathered.

Legend: ``B`` batch, ``L`` tokens per chunk (global), ``N`` CP ranks, ``U``
Ulysses degree, ``R`` ring degree, ``S`` slots per rank, ``H`` heads, ``D``
head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from flashdreams.core.attention.backends import attention
from flashdreams.core.attention.kv_cache import KVCache
from flashdreams.core.attention.ring import ring_attention
from flashdreams.core.attention.ulysses import ulysses_head_to_seq, ulysses_seq_to_head
from flashdreams.core.distributed.comm_stats import CommStats
from flashdreams.core.distributed.mesh import ContextParallelMesh
from flashdreams.core.distributed.parallel_dims import ParallelDims
from flashdreams.core.distributed.sharding import slots_per_rank

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from flashdreams.core.attention import RelativeRope


def _overlap(start: int, stop: int, lo: int, hi: int) -> int:
    """Length of ``[start, stop) ∩ [lo, hi)``."""
    return max(0, min(stop, hi) - max(start, lo))


@dataclass(frozen=True)
class ChunkTokenLayout:
    """Where one chunk's tokens live on this rank, for a given mesh."""

    num_tokens: int
    """``L``: tokens per chunk, all ranks together."""
    num_slots: int
    """``S = ceil(L / N)``: token slots per rank (real tokens plus padding)."""
    block_start: int
    """First chunk position of this rank's attention block (its Ulysses group's slots)."""
    block_stop: int
    """End of the block's real tokens (``<= block_start + U*S``; padding is excluded)."""

    @classmethod
    def for_block(
        cls, num_tokens: int, *, cp_degree: int, ulysses_degree: int, ring_index: int
    ) -> ChunkTokenLayout:
        """Layout of the block held by the ranks at ``ring_index`` of the mesh."""
        if num_tokens <= 0:
            raise ValueError(f"a chunk needs at least one token, got {num_tokens}")
        num_slots = slots_per_rank(num_tokens, cp_degree)
        block_slots = ulysses_degree * num_slots
        start = min(ring_index * block_slots, num_tokens)
        stop = min(start + block_slots, num_tokens)
        return cls(num_tokens=num_tokens, num_slots=num_slots, block_start=start, block_stop=stop)

    @classmethod
    def for_mesh(cls, num_tokens: int, mesh: ContextParallelMesh) -> ChunkTokenLayout:
        """Layout of this rank's block."""
        return cls.for_block(
            num_tokens,
            cp_degree=mesh.cp_degree,
            ulysses_degree=mesh.ulysses_degree,
            ring_index=mesh.ring_rank,
        )

    @property
    def num_block_tokens(self) -> int:
        """Real tokens of this rank's block in one chunk."""
        return self.block_stop - self.block_start

    def cached_count(self, num_global_tokens: int, *, from_end: bool) -> int:
        """Tokens of this block among the first (or last) ``num_global_tokens`` tokens
        of a sequence of whole chunks.

        ``from_end=False`` sizes the sink (the first tokens ever written),
        ``from_end=True`` the rolling window (the last tokens before a chunk
        boundary).
        """
        whole_chunks, remainder = divmod(num_global_tokens, self.num_tokens)
        if from_end:
            lo, hi = self.num_tokens - remainder, self.num_tokens
        else:
            lo, hi = 0, remainder
        partial = _overlap(self.block_start, self.block_stop, lo, hi)
        return whole_chunks * self.num_block_tokens + partial


class ContextParallelKVCache(KVCache):
    """A :class:`KVCache` holding the real tokens of this rank's block only.

    ``chunk_size``, ``window_size`` and ``sink_size`` are this rank's budgets
    (see :meth:`ChunkTokenLayout.cached_count`); ``layout`` says how a chunk is
    split. Heads are the rank's ``H / U``. ``ring_budgets`` lists ``(tokens per
    chunk, capacity)`` of every block of the ring, so each rank knows every
    shard length without asking (:meth:`ring_shard_lengths`).
    """

    def __init__(
        self, *, layout: ChunkTokenLayout, ring_budgets: list[tuple[int, int]], **kwargs: Any
    ) -> None:
        # A block may hold no real token (tiny chunks on many ranks): keep one
        # slot so the buffers exist; nothing is ever staged into it.
        kwargs["chunk_size"] = max(1, kwargs["chunk_size"])
        super().__init__(**kwargs)
        self.layout = layout
        self.ring_budgets = ring_budgets
        self.num_committed_chunks = [0]  # shared with batch slices

    def batch_slice(self, start: int, stop: int) -> ContextParallelKVCache:
        view = ContextParallelKVCache._view(self, start, stop)
        view.layout = self.layout
        view.ring_budgets = self.ring_budgets
        view.num_committed_chunks = self.num_committed_chunks
        return view  # type: ignore[return-value]

    def _with_buffers(self, buffers: list[torch.Tensor]) -> ContextParallelKVCache:
        part = super()._with_buffers(buffers)
        part.num_committed_chunks = list(self.num_committed_chunks)
        return part  # type: ignore[return-value]

    def can_batch_with(self, other: KVCache) -> bool:
        return (
            super().can_batch_with(other)
            and isinstance(other, ContextParallelKVCache)
            and self.ring_budgets == other.ring_budgets
            and self.ring_shard_lengths() == other.ring_shard_lengths()
        )

    def commit(self, num_new: int) -> None:
        super().commit(num_new)
        self.num_committed_chunks[0] += 1

    def reset(self) -> None:
        super().reset()
        self.num_committed_chunks[0] = 0

    def ring_shard_lengths(self) -> list[int]:
        """Keys each ring rank attends with for the staged chunk: cached + current."""
        num_chunks = self.num_committed_chunks[0]
        return [
            min(num_chunks * per_chunk, capacity) + per_chunk
            for per_chunk, capacity in self.ring_budgets
        ]


class ContextParallelSelfAttention:
    """Ring / Ulysses / USP self-attention over a :class:`ContextParallelMesh`.

    Built once from the mesh and handed to the network; it holds the process
    groups, so nothing in ``forward`` looks up ranks or globals.

    Args:
        mesh: the CP mesh (``cp_degree > 1``).
        backend: attention backend name or ``"auto"``.
        overlap: ring only: overlap the next K/V transfer with compute.
        comm_stats: optional counter of the bytes each exchange sends (benchmarks).
    """

    def __init__(
        self,
        mesh: ContextParallelMesh,
        *,
        backend: str = "auto",
        overlap: bool = True,
        comm_stats: CommStats | None = None,
    ) -> None:
        assert mesh.cp_degree > 1, "ContextParallelSelfAttention needs more than one rank"
        self.mesh = mesh
        self.backend = backend
        self.overlap = overlap
        self.comm_stats = comm_stats

    @property
    def supports_relative_rope(self) -> bool:
        """Cache-relative RoPE needs the whole sequence in one cache: pure Ulysses only."""
        return self.mesh.ring_degree == 1

    def local_num_heads(self, num_heads: int) -> int:
        """Heads each rank attends over (``H / U``)."""
        return num_heads // self.mesh.ulysses_degree

    def make_kv_cache(
        self,
        *,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        chunk_size: int,
        window_size: int,
        sink_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        quantization: str = "none",
    ) -> ContextParallelKVCache:
        """This rank's cache for a rollout whose chunks have ``chunk_size`` tokens (global).

        ``window_size`` and ``sink_size`` are global token counts, as for the
        single-rank :class:`KVCache`; they are turned into this rank's share.
        """
        mesh = self.mesh
        ring_budgets = []
        for ring_index in range(mesh.ring_degree):
            block = ChunkTokenLayout.for_block(
                chunk_size,
                cp_degree=mesh.cp_degree,
                ulysses_degree=mesh.ulysses_degree,
                ring_index=ring_index,
            )
            capacity = block.cached_count(window_size, from_end=True) + block.cached_count(
                sink_size, from_end=False
            )
            ring_budgets.append((block.num_block_tokens, capacity))
        layout = ChunkTokenLayout.for_mesh(chunk_size, mesh)
        return ContextParallelKVCache(
            layout=layout,
            ring_budgets=ring_budgets,
            batch_size=batch_size,
            num_heads=self.local_num_heads(num_heads),
            head_dim=head_dim,
            chunk_size=layout.num_block_tokens,
            window_size=layout.cached_count(window_size, from_end=True),
            sink_size=layout.cached_count(sink_size, from_end=False),
            device=device,
            dtype=dtype,
            quantization=quantization,
        )

    def self_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        kv_cache: KVCache | None,
        commit: bool = False,
        relative_rope: RelativeRope | None = None,
    ) -> torch.Tensor:
        """Attention of this rank's slots over ``[cache | chunk]`` of every rank.

        Args:
            q, k, v: this rank's ``S`` slots ``[B, S, H, D]``.
            kv_cache: this layer's :class:`ContextParallelKVCache`.
            commit: keep the chunk's K/V in the cache afterwards.
            relative_rope: cache-relative RoPE (pure Ulysses only).

        Returns:
            ``[B, S, H, D]``; rows of padding slots hold unspecified values.
        """
        if not isinstance(kv_cache, ContextParallelKVCache):
            raise ValueError(
                "context-parallel self-attention needs the caches built by "
                "initialize_cache() after set_context_parallel_group(); got "
                f"{type(kv_cache).__name__}"
            )
        layout = kv_cache.layout
        if q.shape[1] != layout.num_slots:
            raise ValueError(
                f"expected {layout.num_slots} token slots on this rank for a {layout.num_tokens}-"
                f"token chunk, got {q.shape[1]}"
            )
        mesh, stats = self.mesh, self.comm_stats
        if mesh.ulysses_group is not None:
            # [B, S, H, D] -> [B, U*S, H/U, D]
            q = ulysses_seq_to_head(q, mesh.ulysses_group, stats)
            k = ulysses_seq_to_head(k, mesh.ulysses_group, stats)
            v = ulysses_seq_to_head(v, mesh.ulysses_group, stats)
        num_real = layout.num_block_tokens
        k_all, v_all, _ = kv_cache.stage(k[:, :num_real], v[:, :num_real])
        if relative_rope is not None:
            if not self.supports_relative_rope:
                raise NotImplementedError(
                    "cache-relative RoPE (apply_rope_before_kvcache=False) needs pure Ulysses "
                    "context parallelism (ring degree 1)"
                )
            num_keys = k_all.shape[1]
            k_all = relative_rope(k_all, 0, num_keys)
            start = num_keys - num_real
            q = relative_rope(q, start, start + q.shape[1])
        if mesh.ring_group is not None:
            out = ring_attention(
                q,
                k_all,
                v_all,
                None,
                mesh.ring_group,
                overlap=self.overlap,
                shard_lens=kv_cache.ring_shard_lengths(),
                backend=self.backend,
                comm_stats=stats,
            )
        else:
            out = attention(q, k_all, v_all, None, backend=self.backend)
        if mesh.ulysses_group is not None:
            # [B, U*S, H/U, D] -> [B, S, H, D]
            out = ulysses_head_to_seq(out, mesh.ulysses_group, stats)
        if commit:
            kv_cache.commit(num_real)
        return out


def mesh_from_group(
    group: ProcessGroup, cp_method: str, num_heads: int | None = None
) -> ContextParallelMesh:
    """A one-level mesh over ``group``: all ranks in one ring or one Ulysses group.

    This is what a bare process group given to ``set_context_parallel_group``
    means; build a :class:`ContextParallelMesh` for USP instead.
    """
    import torch.distributed as dist

    world_size = dist.get_world_size(group)
    dims = ParallelDims.from_cp_method(world_size, cp_method, num_heads=num_heads)  # type: ignore[arg-type]
    enabled = world_size > 1
    return ContextParallelMesh(
        parallel_dims=dims,
        rank=dist.get_rank(group),
        cp_group=group if enabled else None,
        ulysses_group=group if enabled and dims.ulysses_degree > 1 else None,
        ring_group=group if enabled and dims.ring_degree > 1 else None,
    )


def make_context_parallel(
    cp: ContextParallelSelfAttention | ContextParallelMesh | ProcessGroup | None,
    *,
    cp_method: str = "ring",
    num_heads: int | None = None,
    backend: str = "auto",
) -> ContextParallelSelfAttention | None:
    """Normalise what ``set_context_parallel_group`` accepts.

    * ``None`` or a one-rank mesh / group -> ``None`` (local attention);
    * a :class:`ContextParallelMesh` -> :class:`ContextParallelSelfAttention`
      with ``backend``;
    * a ``torch.distributed.ProcessGroup`` -> a ring or Ulysses mesh over it
      (``cp_method``), then as above;
    * a :class:`ContextParallelSelfAttention` is used as it is.
    """
    if cp is None or isinstance(cp, ContextParallelSelfAttention):
        return cp
    import torch.distributed as dist

    if isinstance(cp, dist.ProcessGroup):
        cp = mesh_from_group(cp, cp_method, num_heads)
    if not isinstance(cp, ContextParallelMesh):
        raise ValueError(
            "set_context_parallel_group takes None, a ProcessGroup, a ContextParallelMesh or a "
            f"ContextParallelSelfAttention; got {type(cp).__name__}"
        )
    if cp.cp_degree == 1:
        return None
    if num_heads is not None and num_heads % cp.ulysses_degree != 0:
        # Re-validate through ParallelDims for its message listing the valid degrees.
        ParallelDims(cp.cp_degree, ulysses_degree=cp.ulysses_degree, num_heads=num_heads)
    return ContextParallelSelfAttention(cp, backend=backend)
