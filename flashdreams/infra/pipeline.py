"""Streaming inference pipeline: encode -> diffuse -> decode, one AR step at a time."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Generic

import torch
import torch.nn as nn
from loguru import logger

from flashdreams.core.distributed.plan import ParallelPlan
from flashdreams.infra.config import InstantiateConfig
from flashdreams.infra.decoder import (
    DecoderConfig,
    StreamingDecoder,
    StreamingDecoderCacheT,
    StreamingVideoDecoder,
)
from flashdreams.infra.diffusion.model import DiffusionModel, DiffusionModelConfig, FinalState
from flashdreams.infra.diffusion.transformer import TransformerCacheT
from flashdreams.infra.encoder import EncoderConfig, StreamingEncoder, StreamingEncoderCacheT
from flashdreams.infra.profiler import EventProfiler


@dataclass(kw_only=True)
class StreamInferencePipelineConfig(InstantiateConfig):
    """Config for the streaming inference pipeline.

    ``encoder=None`` means no per-AR-step control input (pure T2V);
    ``decoder=None`` returns the clean latent unchanged.
    """

    _target: type[StreamInferencePipeline] = field(default_factory=lambda: StreamInferencePipeline)
    """Pipeline class built by ``setup()``."""
    name: str
    """Stable slug of this pipeline variant; ``flashdreams-run <name>`` selects it."""
    diffusion_model: DiffusionModelConfig
    """Transformer + scheduler config."""
    decoder: DecoderConfig | None = None
    """Optional streaming decoder, called as ``decoder(input, autoregressive_index, cache)``."""
    encoder: EncoderConfig | None = None
    """Optional per-AR-step streaming encoder; one-shot encoders belong to the transformer."""
    enable_sync_and_profile: bool = False
    """Time every stage of every AR step (synchronizes the device once per step)."""


@dataclass(kw_only=True)
class StreamInferencePipelineCache(
    Generic[StreamingEncoderCacheT, TransformerCacheT, StreamingDecoderCacheT]
):
    """Per-rollout state threaded through ``generate`` / ``finalize``."""

    transformer_cache: TransformerCacheT
    """Long-lived transformer AR cache (always present)."""
    encoder_cache: StreamingEncoderCacheT | None = None
    """Encoder AR cache; ``None`` exactly when the pipeline has no encoder."""
    decoder_cache: StreamingDecoderCacheT | None = None
    """Decoder AR cache; ``None`` exactly when the pipeline has no decoder."""
    final_state: FinalState[TransformerCacheT] | None = None
    """State of the latest ``generate``, consumed by ``finalize``."""
    autoregressive_index: int | None = None
    """AR index of the latest ``generate``."""
    decoded_autoregressive_index: int | None = None
    """AR index of the latest ``decode_latent`` (decodes run in AR order, one per step)."""
    event_profiler: EventProfiler | None = None
    """Profiler of the current AR step (profiling only)."""


class StreamInferencePipeline(
    nn.Module, Generic[StreamingEncoderCacheT, TransformerCacheT, StreamingDecoderCacheT]
):
    """End-to-end streaming pipeline.

    Example::

        cache = pipeline.initialize_cache(transformer_context={...})
        for i in range(num_chunks):
            video = pipeline.generate(i, cache)
            pipeline.finalize(i, cache)

    ``generate`` is ``generate_latent`` followed by ``decode_latent``. A caller
    may call the two halves itself, e.g. to decode chunk ``i`` on another
    thread while ``finalize(i)`` and ``generate_latent(i + 1)`` run.
    """

    encoder: StreamingEncoder[StreamingEncoderCacheT] | None
    decoder: StreamingDecoder[StreamingDecoderCacheT] | None
    diffusion_model: DiffusionModel[TransformerCacheT]

    def __init__(
        self, config: StreamInferencePipelineConfig, parallel: ParallelPlan | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.load_times: dict[str, float] = {}
        """Component name -> seconds its construction (checkpoint load included) took."""
        self.encoder = self._timed_setup("encoder", config.encoder)
        self.decoder = self._timed_setup("decoder", config.decoder)
        self.diffusion_model = self._timed_setup(
            "diffusion_model", config.diffusion_model, parallel=parallel
        )

    def _timed_setup(self, name: str, component: Any, **kwargs: Any) -> Any:
        """``component.setup(**kwargs)`` (``None`` for no component), timed in ``load_times``."""
        if component is None:
            return None
        started = time.perf_counter()
        built = component.setup(**kwargs)
        self.load_times[name] = time.perf_counter() - started
        return built

    @property
    def device(self) -> torch.device:
        return self.diffusion_model.device

    @property
    def spatial_compression_ratio(self) -> int:
        """Pixel side / latent side of the video decoder (1 without one)."""
        if isinstance(self.decoder, StreamingVideoDecoder):
            return int(self.decoder.spatial_compression_ratio)
        return 1

    @property
    def spatial_patch_size(self) -> tuple[int, int]:
        """The transformer's ``(height, width)`` patch size, in latent cells."""
        return self.diffusion_model.transformer.spatial_patch_size

    def clean_latent(self, cache: StreamInferencePipelineCache) -> torch.Tensor | None:
        """This rank's (patchified, possibly sharded) clean latent of the latest ``generate``;
        ``None`` once it was finalized. No communication."""
        final_state = cache.final_state
        return None if final_state is None else final_state.clean_latent

    def gather_clean_latent(self, cache: StreamInferencePipelineCache) -> torch.Tensor | None:
        """The latest clean latent ``[*batch, T, C, H, W]`` gathered on the output rank,
        ``None`` elsewhere. Collective under context parallelism: every rank calls it."""
        local = self.clean_latent(cache)
        if local is None:
            return None
        return self.diffusion_model.transformer.unpatchify_and_maybe_gather_cp(local)

    def initialize_cache(
        self,
        transformer_context: dict[str, Any] | None = None,
        encoder_context: dict[str, Any] | None = None,
        decoder_context: dict[str, Any] | None = None,
    ) -> StreamInferencePipelineCache[
        StreamingEncoderCacheT, TransformerCacheT, StreamingDecoderCacheT
    ]:
        """Fresh per-rollout cache; each context dict goes to that component's
        ``initialize_autoregressive_cache`` as keyword arguments."""
        transformer = self.diffusion_model.transformer
        return StreamInferencePipelineCache(
            transformer_cache=transformer.initialize_autoregressive_cache(
                **(transformer_context or {})
            ),
            encoder_cache=(
                self.encoder.initialize_autoregressive_cache(**(encoder_context or {}))
                if self.encoder is not None
                else None
            ),
            decoder_cache=(
                self.decoder.initialize_autoregressive_cache(**(decoder_context or {}))
                if self.decoder is not None
                else None
            ),
        )

    @torch.no_grad()
    def switch_conditioning(
        self,
        cache: StreamInferencePipelineCache[
            StreamingEncoderCacheT, TransformerCacheT, StreamingDecoderCacheT
        ],
        *,
        recache: bool = True,
        **transformer_context: Any,
    ) -> None:
        """Give the transformer new conditioning between two AR steps.

        Allowed right after ``initialize_cache`` or after ``finalize(i)``, not
        between ``generate(i)`` and ``finalize(i)``. ``transformer_context``
        is what the transformer's ``switch_conditioning`` takes (for Wan:
        ``text_embeddings`` / ``negative_text_embeddings``); ``recache=True``
        rebuilds the transformer's AR cache under it.
        """
        if cache.final_state is not None:
            raise RuntimeError(
                f"switch_conditioning between generate({cache.autoregressive_index}) and "
                f"finalize({cache.autoregressive_index}): finalize the chunk first"
            )
        self.diffusion_model.transformer.switch_conditioning(
            cache.transformer_cache, recache=recache, **transformer_context
        )

    @torch.no_grad()
    def generate(
        self,
        autoregressive_index: int,
        cache: StreamInferencePipelineCache[
            StreamingEncoderCacheT, TransformerCacheT, StreamingDecoderCacheT
        ],
        input: Any = None,
    ) -> torch.Tensor:
        """Produce one chunk.

        ``autoregressive_index`` must be 0 right after ``initialize_cache`` and
        the previous index + 1 afterwards. ``input`` is required exactly when
        an encoder is configured. Returns decoded output, or the unpatchified
        clean latent without a decoder.
        """
        clean_latent = self._generate_latent(autoregressive_index, cache, input)
        if self.decoder is None or clean_latent is None:
            # ``None``: a context-parallel rank that does not hold the gathered latent.
            return clean_latent
        output = self.decode_latent(clean_latent, autoregressive_index, cache)
        if cache.event_profiler is not None:
            cache.event_profiler.record("decode")
        return output

    @torch.no_grad()
    def generate_latent(
        self,
        autoregressive_index: int,
        cache: StreamInferencePipelineCache[
            StreamingEncoderCacheT, TransformerCacheT, StreamingDecoderCacheT
        ],
        input: Any = None,
    ) -> torch.Tensor | None:
        """Encode and denoise one chunk without decoding it; the first half of ``generate``.

        Same ordering and ``input`` rules as ``generate``. Returns the
        unpatchified clean latent ``[*batch, T, C, H, W]``; under context
        parallelism only the rank that holds the gathered latent gets it, the
        others get ``None``. The tensor is freshly allocated: ``finalize`` and
        later steps do not write into it. Profiling records ``encode`` and
        ``diffuse`` but no ``decode`` stage.
        """
        return self._generate_latent(autoregressive_index, cache, input)

    def _generate_latent(
        self,
        autoregressive_index: int,
        cache: StreamInferencePipelineCache[
            StreamingEncoderCacheT, TransformerCacheT, StreamingDecoderCacheT
        ],
        input: Any,
    ) -> torch.Tensor | None:
        previous = cache.autoregressive_index
        expected = 0 if previous is None else previous + 1
        if autoregressive_index != expected:
            raise ValueError(
                f"AR step out of order: the previous step was {previous}, so the next "
                f"autoregressive_index must be {expected}, got {autoregressive_index}"
            )
        if input is not None and self.encoder is None:
            raise ValueError(
                "input was given but the pipeline has no encoder; configure "
                "StreamInferencePipelineConfig.encoder (NullEncoderConfig() passes "
                "an already-encoded tensor through)"
            )
        if input is None and self.encoder is not None:
            raise ValueError(
                f"the pipeline has an encoder ({type(self.encoder).__name__}) but no input "
                f"was given for AR step {autoregressive_index}"
            )
        cache.autoregressive_index = autoregressive_index
        cache.final_state = None

        profiler: EventProfiler | None = None
        cache.event_profiler = None
        if self.config.enable_sync_and_profile:
            profiler = EventProfiler(use_cuda=self.device.type == "cuda")
            cache.event_profiler = profiler

        if self.encoder is not None:
            input = self.encoder(
                input=input, autoregressive_index=autoregressive_index, cache=cache.encoder_cache
            )
            if profiler is not None:
                profiler.record("encode")

        clean_latent, final_state = self.diffusion_model.generate(
            autoregressive_index=autoregressive_index,
            cache=cache.transformer_cache,
            input=input,
        )
        cache.final_state = final_state
        if profiler is not None:
            profiler.record("diffuse")
        return clean_latent

    @torch.no_grad()
    def decode_latent(
        self,
        latent: torch.Tensor,
        autoregressive_index: int,
        cache: StreamInferencePipelineCache[
            StreamingEncoderCacheT, TransformerCacheT, StreamingDecoderCacheT
        ],
    ) -> torch.Tensor:
        """Decode the clean latent of AR step ``autoregressive_index``; the second half of ``generate``.

        ``latent`` is what ``generate_latent`` returned for that step. The
        decoder cache is sequential, so steps are decoded in order, each once,
        and never ahead of ``generate_latent``. Without a decoder the latent is
        returned unchanged. Touches only the decoder and ``cache.decoder_cache``
        (never the transformer or the profiler), so one other thread may decode
        step ``i`` while this thread runs ``finalize(i)`` and later steps.
        """
        previous = cache.decoded_autoregressive_index
        expected = 0 if previous is None else previous + 1
        if autoregressive_index != expected:
            raise ValueError(
                f"decode out of order: the previous decoded step was {previous}, so the next "
                f"decode_latent must be for AR step {expected}, got {autoregressive_index}"
            )
        generated = cache.autoregressive_index
        if generated is None or autoregressive_index > generated:
            raise ValueError(
                f"decode_latent({autoregressive_index}) called before generate_latent"
                f"({autoregressive_index}): the latest generated AR step is {generated}"
            )
        cache.decoded_autoregressive_index = autoregressive_index
        if self.decoder is None:
            return latent
        return self.decoder(
            input=latent, autoregressive_index=autoregressive_index, cache=cache.decoder_cache
        )

    @torch.no_grad()
    def finalize(
        self,
        autoregressive_index: int,
        cache: StreamInferencePipelineCache[
            StreamingEncoderCacheT, TransformerCacheT, StreamingDecoderCacheT
        ],
    ) -> dict[str, float] | None:
        """Write the latest chunk into the transformer's AR cache.

        ``autoregressive_index`` must equal the latest ``generate``'s. Returns
        ``None`` without profiling, else this step's stats:
        ``<stage>_ms``, ``total_ms``, ``total_ms_wo_finalize`` and, on CUDA,
        ``mem_alloc_gib``, ``mem_reserved_gib``, ``mem_peak_gib``.
        """
        if cache.final_state is None:
            raise RuntimeError(
                f"finalize({autoregressive_index}) called before generate(): there is no "
                "generated chunk on this cache to write into the KV cache"
            )
        if cache.autoregressive_index != autoregressive_index:
            raise ValueError(
                f"autoregressive_index mismatch: the latest generate() ran AR step "
                f"{cache.autoregressive_index} but finalize() was called with {autoregressive_index}"
            )
        self.diffusion_model.finalize(final_state=cache.final_state)
        cache.final_state = None
        if not self.config.enable_sync_and_profile:
            return None
        profiler = cache.event_profiler
        if profiler is None:
            raise RuntimeError("profiling is on but generate() recorded no profiler on this cache")
        profiler.record("finalize")
        stats_ms = profiler.sync_and_summarize()
        cache.event_profiler = None

        total_ms = sum(stats_ms.values())
        stats: dict[str, float] = {f"{stage}_ms": ms for stage, ms in stats_ms.items()}
        stats["total_ms"] = total_ms
        stats["total_ms_wo_finalize"] = total_ms - stats_ms.get("finalize", 0.0)
        memory_text = ""
        if torch.cuda.is_available():
            device = torch.cuda.current_device()
            gib = float(1024**3)
            stats["mem_alloc_gib"] = torch.cuda.memory_allocated(device) / gib
            stats["mem_reserved_gib"] = torch.cuda.memory_reserved(device) / gib
            stats["mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / gib
            memory_text = (
                f" | GPU mem alloc {stats['mem_alloc_gib']:.3f} GiB reserved "
                f"{stats['mem_reserved_gib']:.3f} GiB peak {stats['mem_peak_gib']:.3f} GiB"
            )
        stages_text = " ".join(f"{stage} {ms:.3f} ms" for stage, ms in stats_ms.items())
        logger.info(
            f"AR {autoregressive_index} {stages_text} | total(w/o finalize) "
            f"{stats['total_ms_wo_finalize']:.3f} ms total {total_ms:.3f} ms{memory_text}"
        )
        return stats
