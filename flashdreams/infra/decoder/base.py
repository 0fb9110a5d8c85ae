"""Decoder interfaces: streaming decoders with a per-rollout cache."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Generic

import torch.nn as nn
from typing_extensions import TypeVar

from flashdreams.infra.config import InstantiateConfig


@dataclass(kw_only=True)
class StreamingDecoderCache:
    """Per-rollout decoder state; empty by default, subclasses add fields."""


StreamingDecoderCacheT = TypeVar(
    "StreamingDecoderCacheT", bound=StreamingDecoderCache, default=StreamingDecoderCache
)


class StreamingDecoder(ABC, nn.Module, Generic[StreamingDecoderCacheT]):
    """Stateful decoder called once per AR step.

    The pipeline calls ``forward(input, autoregressive_index=0, cache=None)``.
    Stateless decoders return an empty :class:`StreamingDecoderCache` and
    ignore the index and cache.
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config

    @abstractmethod
    def initialize_autoregressive_cache(self, **context: Any) -> StreamingDecoderCacheT:
        """Return a fresh per-rollout cache of the decoder's own type."""


class StreamingVideoDecoder(StreamingDecoder[StreamingDecoderCacheT]):
    """Streaming latent -> pixel video decoder.

    Adds the compression ratios and the AR-aware temporal size mappers: AR 0
    usually yields one pixel frame for the first latent frame (causal
    padding), later steps ``temporal_compression_ratio`` frames per latent.
    """

    supports_row_slabs: bool = False
    """Whether ``initialize_autoregressive_cache(rows=...)`` makes the decoder decode one row
    slab of each frame exactly (parallel decode, :mod:`flashdreams.infra.decoder.row_parallel`)."""

    @property
    @abstractmethod
    def spatial_compression_ratio(self) -> int:
        """Pixel side / latent side."""

    @property
    @abstractmethod
    def temporal_compression_ratio(self) -> int:
        """Pixel frames per latent frame in steady state (AR >= 1)."""

    @abstractmethod
    def get_output_temporal_size(self, autoregressive_index: int, input_temporal_size: int) -> int:
        """Pixel frames produced from ``input_temporal_size`` latent frames at this AR step."""

    @abstractmethod
    def get_input_temporal_size(self, autoregressive_index: int, output_temporal_size: int) -> int:
        """Latent frames needed to produce ``output_temporal_size`` pixel frames at this AR step."""


@dataclass(kw_only=True)
class DecoderConfig(InstantiateConfig):
    """Base of every decoder config."""

    _target: type[StreamingDecoder] = field(default_factory=lambda: StreamingDecoder)
    """Decoder class built by ``setup()``."""
