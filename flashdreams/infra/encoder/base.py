"""Encoder interfaces: one-shot encoders and streaming (per-AR-step) encoders."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Generic

import torch.nn as nn
from typing_extensions import TypeVar

from flashdreams.infra.config import InstantiateConfig


class Encoder(nn.Module):
    """Stateless one-shot encoder (text, CLIP image, identity).

    Used as a transformer's context encoder with the call shape ``forward(input)``.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config


@dataclass(kw_only=True)
class StreamingEncoderCache:
    """Per-rollout encoder state; empty by default, subclasses add fields."""


StreamingEncoderCacheT = TypeVar(
    "StreamingEncoderCacheT", bound=StreamingEncoderCache, default=StreamingEncoderCache
)


class StreamingEncoder(ABC, nn.Module, Generic[StreamingEncoderCacheT]):
    """Stateful encoder called once per AR step.

    The pipeline calls ``forward(input, autoregressive_index=0, cache=None)``.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config

    @abstractmethod
    def initialize_autoregressive_cache(self, **context: Any) -> StreamingEncoderCacheT:
        """Return a fresh per-rollout cache of the encoder's own type."""


class StreamingVideoEncoder(StreamingEncoder[StreamingEncoderCacheT]):
    """Streaming pixel -> latent video encoder.

    Adds the compression ratios and the AR-aware temporal size mappers: AR 0
    usually takes ``1 + (T_lat - 1) * r`` pixel frames for ``T_lat`` latent
    frames (causal first frame), later steps ``T_lat * r``.
    """

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
        """Latent frames produced from ``input_temporal_size`` pixel frames at this AR step."""

    @abstractmethod
    def get_input_temporal_size(self, autoregressive_index: int, output_temporal_size: int) -> int:
        """Pixel frames needed to produce ``output_temporal_size`` latent frames at this AR step."""


@dataclass(kw_only=True)
class EncoderConfig(InstantiateConfig):
    """Base of every encoder config."""

    _target: type[nn.Module] = field(default_factory=lambda: Encoder)
    """Encoder class built by ``setup()``."""


class NullEncoder(Encoder):
    """Identity encoder: hands already-encoded tensors through unchanged."""

    def forward(self, input: Any, autoregressive_index: int = 0, cache: Any = None) -> Any:
        return input

    def initialize_autoregressive_cache(self, **context: Any) -> StreamingEncoderCache:
        """Identity needs no state; provided so it can sit in the pipeline's encoder slot."""
        return StreamingEncoderCache()


@dataclass(kw_only=True)
class NullEncoderConfig(EncoderConfig):
    """Config for :class:`NullEncoder`."""

    _target: type[NullEncoder] = field(default_factory=lambda: NullEncoder)
    """Always :class:`NullEncoder`."""
