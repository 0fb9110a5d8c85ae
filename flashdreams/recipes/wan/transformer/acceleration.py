"""How a Wan network is executed: eager, ``torch.compile`` per block, or CUDA-graph replay.

The policy is decided once, on the first call (when the device is known):

* CPU: eager, or blocks compiled when ``compile_network_on_cpu``;
* CUDA: blocks compiled when ``compile_network``; CUDA graphs when
  ``use_cuda_graph`` and there is no context parallelism (ring / Ulysses
  exchange shard lengths on the host, which a graph cannot replay).

With graphs, AR steps whose KV cache is still filling run eagerly through
:meth:`CUDAGraphWrapper.drain`; steady-state steps are captured once per
``(commit, shapes)`` key and replayed. The chunk counter of the network cache
advances in one place, :meth:`NetworkExecutor.__call__`, after every commit.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger

from flashdreams.recipes.wan.transformer.cuda_graph import CUDAGraphWrapper
from flashdreams.recipes.wan.transformer.impl.network import WanDiTNetwork, WanDiTNetworkCache


@dataclass(frozen=True)
class AccelerationPolicy:
    """The acceleration switches of a transformer config."""

    compile_network: bool
    """``torch.compile`` the blocks on CUDA."""
    compile_network_on_cpu: bool
    """Also compile the blocks on CPU."""
    use_cuda_graph: bool
    """Replay steady-state AR steps from CUDA graphs."""
    cuda_graph_warmup_iters: int
    """Eager calls per graph key before capture."""
    capture_from_chunk: int
    """First AR step whose KV cache is full before the step (steady state)."""


class NetworkExecutor:
    """Runs a :class:`WanDiTNetwork` under an :class:`AccelerationPolicy`."""

    def __init__(
        self, network: WanDiTNetwork, policy: AccelerationPolicy, *, context_parallel: bool
    ) -> None:
        self.network = network
        self.policy = policy
        self.context_parallel = context_parallel
        self._resolved = False
        self.graph: CUDAGraphWrapper | None = None
        # The network cache the captured graphs point into (weak: a finished rollout's
        # cache may be freed; an id() could then be reused by the next rollout's).
        self._graph_cache_ref: weakref.ref[WanDiTNetworkCache] | None = None

    def reset_graphs(self) -> None:
        """Drop the captured CUDA graphs (after a change they would not see, e.g. of the
        run-time LoRA terms); the next steady-state chunks capture them again."""
        if self.graph is not None:
            self.graph.reset()

    def _resolve(self, device: torch.device) -> None:
        if self._resolved:
            return
        self._resolved = True
        policy = self.policy
        if device.type == "cpu" and policy.compile_network_on_cpu:
            logger.info("Wan21Transformer: compiling the network blocks for CPU (torch.compile)")
            self.network.compile_blocks(dynamic=False)
            return
        if device.type != "cuda":
            if policy.compile_network or policy.use_cuda_graph:
                logger.info(
                    f"Wan21Transformer: compile_network={policy.compile_network} and "
                    f"use_cuda_graph={policy.use_cuda_graph} are skipped on {device.type}; "
                    "running the network eagerly"
                )
            return
        if policy.compile_network:
            self.network.compile_blocks(dynamic=False)
        if policy.use_cuda_graph and self.context_parallel:
            logger.info(
                "Wan21Transformer: use_cuda_graph is skipped under context parallelism "
                "(ring / Ulysses exchange shard lengths on the host)"
            )
        elif policy.use_cuda_graph:
            self.graph = CUDAGraphWrapper(self._graph_call, policy.cuda_graph_warmup_iters)

    def _graph_call(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        rope_freqs: torch.Tensor | None,
        *,
        cache: WanDiTNetworkCache,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Network call with the per-call tensors first, as :class:`CUDAGraphWrapper` expects."""
        return self.network(x, t, cache, rope_freqs, eager_mode=False, **kwargs)

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cache: WanDiTNetworkCache,
        rope_freqs: torch.Tensor | None,
        *,
        commit: bool,
        relative_rope: Any,
        block_extra_kwargs: dict[str, Any] | None,
    ) -> torch.Tensor:
        """One network forward over the current chunk; advances the chunk counter on commit."""
        self._resolve(x.device)
        chunk_index = cache.chunk_index
        kwargs = dict(
            cache=cache,
            current_chunk_idx=chunk_index,
            commit=commit,
            relative_rope=relative_rope,
            block_extra_kwargs=block_extra_kwargs,
        )
        steady = cache.is_steady_state and chunk_index >= self.policy.capture_from_chunk
        if self.graph is None:
            out = self._graph_call(x, t, rope_freqs, **kwargs)
        elif not steady or block_extra_kwargs:
            out = self.graph.drain(x, t, rope_freqs, **kwargs)
        else:
            if self._graph_cache_ref is None or self._graph_cache_ref() is not cache:
                # A new rollout: graphs captured on another cache replay its addresses.
                self.graph.reset()
                self._graph_cache_ref = weakref.ref(cache)
            key = (commit, tuple(x.shape), tuple(t.shape))
            out = self.graph(key, x, t, rope_freqs, **kwargs)
        if commit:
            cache.num_committed_chunks[0] += 1
        return out
