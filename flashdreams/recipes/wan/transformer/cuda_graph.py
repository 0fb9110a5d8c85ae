"""CUDA-graph replay of the network forward once the KV cache is in steady state.

While the cache fills, attention lengths change every AR step, so those calls
run eagerly through :meth:`CUDAGraphWrapper.drain`. Once the window is full
every call of a given kind (denoise / commit) has the same shapes and the same
storage addresses, and is captured once and replayed afterwards. Inputs that
change between calls are copied into static buffers before each replay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any

import torch


class CUDAGraphWrapper:
    """Capture ``fn(*tensors, **static_kwargs)`` per key after warm-up, then replay.

    Args:
        fn: the callable to run (e.g. the network forward); its tensor
            arguments are passed positionally, everything else as keywords
            that must stay identical for a given key.
        warmup_iters: eager calls per key before capture (lets lazy init,
            autotuning and allocator caches settle).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], warmup_iters: int = 2) -> None:
        self.fn = fn
        self.warmup_iters = warmup_iters
        self._warmup_counts: dict[Hashable, int] = {}
        self._graphs: dict[Hashable, tuple[Any, list[torch.Tensor | None], torch.Tensor]] = {}
        self.capture_s = 0.0
        """Seconds spent capturing graphs so far (start-up cost reported in ``stats.json``)."""

    def drain(self, *tensors: torch.Tensor | None, **static_kwargs: Any) -> torch.Tensor:
        """Eager path, used while shapes still change."""
        return self.fn(*tensors, **static_kwargs)

    def reset(self) -> None:
        """Drop every captured graph (e.g. when a new rollout allocates new caches)."""
        self._graphs.clear()
        self._warmup_counts.clear()

    def __call__(
        self, key: Hashable, *tensors: torch.Tensor | None, **static_kwargs: Any
    ) -> torch.Tensor:
        entry = self._graphs.get(key)
        if entry is None:
            count = self._warmup_counts.get(key, 0)
            if count < self.warmup_iters:
                self._warmup_counts[key] = count + 1
                side_stream = torch.cuda.Stream()
                side_stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side_stream):
                    out = self.fn(*tensors, **static_kwargs)
                torch.cuda.current_stream().wait_stream(side_stream)
                return out
            started = time.perf_counter()
            static_inputs = [None if t is None else t.clone() for t in tensors]
            graph = torch.cuda.CUDAGraph()
            # thread_local: a decode running on the overlap worker thread may
            # allocate while we capture; that must not invalidate the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_output = self.fn(*static_inputs, **static_kwargs)
            self.capture_s += time.perf_counter() - started
            entry = (graph, static_inputs, static_output)
            self._graphs[key] = entry
        graph, static_inputs, static_output = entry
        for static, value in zip(static_inputs, tensors, strict=True):
            if static is not None and value is not None:
                static.copy_(value)
        graph.replay()
        return static_output.clone()
