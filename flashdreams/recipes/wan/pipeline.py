"""Wan inference pipeline (Wan 2.1 / 2.2, T2V and I2V): prompt (+ first frame) -> pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from flashdreams.core.distributed.plan import ParallelPlan
from flashdreams.infra.pipeline import (
    StreamInferencePipeline,
    StreamInferencePipelineCache,
    StreamInferencePipelineConfig,
)
from flashdreams.recipes.wan.encoders import CLIPImageEncoderConfig, UMT5TextEncoderConfig

if TYPE_CHECKING:
    from flashdreams.recipes.wan.transformer import Wan21Transformer, Wan22Transformer


@dataclass(kw_only=True)
class WanInferencePipelineConfig(StreamInferencePipelineConfig):
    """Config for the Wan inference pipeline.

    The inherited ``encoder`` slot selects the mode: ``None`` for T2V, a
    :class:`~flashdreams.recipes.wan.i2v_encoder.WanI2VCtrlEncoderConfig` for I2V.
    """

    _target: type[WanInferencePipeline] = field(default_factory=lambda: WanInferencePipeline)
    """Always :class:`WanInferencePipeline`."""
    text_encoder: UMT5TextEncoderConfig | None = field(default_factory=UMT5TextEncoderConfig)
    """One-shot prompt encoder (UMT5-XXL for every Wan model)."""
    image_encoder: CLIPImageEncoderConfig | None = None
    """One-shot CLIP encoder of the first frame; only for networks with image cross-attention (Wan 2.1 I2V 14B)."""
    negative_prompt: str = ""
    """Prompt of the unconditional branch when the transformer's ``guidance_scale > 1``."""


@dataclass(kw_only=True)
class WanInferencePipelineCache(StreamInferencePipelineCache):
    """Per-rollout state of the Wan pipeline: the inherited caches plus the I2V first frame."""

    image: torch.Tensor | None = None
    """First-frame pixels ``[*batch, 1, 3, H, W]`` in [-1, 1] (I2V only); encoded per AR step."""


class WanInferencePipeline(StreamInferencePipeline):
    """Wan 2.1 / 2.2 pipeline for T2V and I2V.

    Example::

        cache = pipeline.initialize_cache(text=["A cat surfing."], height=60, width=104)
        video = pipeline.generate(0, cache)      # [*batch, T, 3, H, W] in [-1, 1]
        pipeline.finalize(0, cache)
    """

    def __init__(
        self, config: WanInferencePipelineConfig, parallel: ParallelPlan | None = None
    ) -> None:
        super().__init__(config, parallel)
        self.config: WanInferencePipelineConfig = config
        self.text_encoder = None
        self.image_encoder = None

    # ------------------------------------------------------------------ encoders
    def _load_oneshot_encoders(self) -> None:
        device = self.device
        if self.text_encoder is None and self.config.text_encoder is not None:
            encoder = self._timed_setup("text_encoder", self.config.text_encoder)
            self.text_encoder = encoder.to(device).eval()
        if self.image_encoder is None and self.config.image_encoder is not None:
            encoder = self._timed_setup("image_encoder", self.config.image_encoder)
            self.image_encoder = encoder.to(device).eval()

    def release_oneshot_encoders(self) -> None:
        """Drop the text and image encoders; the next ``initialize_cache`` rebuilds them. Idempotent."""
        self.text_encoder = None
        self.image_encoder = None

    # ------------------------------------------------------------------ rollout
    @property
    def transformer(self) -> Wan21Transformer | Wan22Transformer:
        """The Wan transformer (2.1, or 2.2 with its two branches)."""
        return self.diffusion_model.transformer  # type: ignore[return-value]

    @property
    def _batch_shape(self) -> tuple[int, ...]:
        return self.transformer.batch_shape

    @property
    def _guidance_scale(self) -> float:
        return self.transformer.guidance_scale

    def _latent_size_from_image(
        self, image: torch.Tensor, height: int | None, width: int | None
    ) -> tuple[int, int]:
        batch_shape = self._batch_shape
        expected_prefix = (*batch_shape, 1, 3)
        if image.dim() != len(batch_shape) + 4 or tuple(image.shape[:-2]) != expected_prefix:
            raise ValueError(
                f"image must have shape [*batch_shape, 1, 3, H, W] = "
                f"[{', '.join(map(str, expected_prefix))}, H, W], got {list(image.shape)}"
            )
        ratio = self._spatial_compression_ratio()
        pixel_height, pixel_width = image.shape[-2:]
        if pixel_height % ratio or pixel_width % ratio:
            raise ValueError(
                f"image size {pixel_height}x{pixel_width} is not a multiple of the VAE's "
                f"spatial compression ratio {ratio}"
            )
        derived = (pixel_height // ratio, pixel_width // ratio)
        given = (
            height if height is not None else derived[0],
            width if width is not None else derived[1],
        )
        if given != derived:
            raise ValueError(
                f"image size {pixel_height}x{pixel_width} does not match the latent size "
                f"{given[0]}x{given[1]} x spatial compression {ratio} "
                f"(= {given[0] * ratio}x{given[1] * ratio} pixels)"
            )
        return derived

    def _spatial_compression_ratio(self) -> int:
        for codec in (self.decoder, self.encoder):
            if codec is not None and hasattr(codec, "spatial_compression_ratio"):
                return int(codec.spatial_compression_ratio)
        raise ValueError("cannot derive the latent size from an image: no VAE encoder or decoder")

    @torch.no_grad()
    def initialize_cache(
        self,
        text: list[str],
        image: torch.Tensor | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        release_oneshot_encoders: bool = True,
    ) -> WanInferencePipelineCache:
        """Encode the prompts (and the first frame for I2V) and build a fresh rollout cache.

        ``height`` / ``width`` are latent sizes: required for T2V, derived from
        ``image`` for I2V. ``len(text)`` must equal the transformer's batch size.
        """
        if isinstance(text, str):
            text = [text]
        num_prompts = math.prod(self._batch_shape)
        if len(text) != num_prompts:
            raise ValueError(
                f"got {len(text)} prompt(s) but the transformer's batch_shape "
                f"{self._batch_shape} needs {num_prompts}"
            )
        if image is not None and self.encoder is None:
            raise ValueError(
                "an image was given but this is a T2V pipeline (no I2V encoder is configured); "
                "use an I2V pipeline or drop the image"
            )
        if image is None and self.encoder is not None:
            raise ValueError(
                "this is an I2V pipeline: pass the first frame as image=[*batch, 1, 3, H, W] in [-1, 1]"
            )
        if image is not None:
            height, width = self._latent_size_from_image(image, height, width)
        elif height is None or width is None:
            raise ValueError(
                "T2V needs the latent height and width: initialize_cache(text, height=..., width=...)"
            )

        device = self.device
        dtype = self.diffusion_model.dtype
        transformer_context: dict[str, Any] = dict(
            height=height, width=width, text_embeddings=self._encode_text(list(text))
        )
        if self._guidance_scale > 1.0:
            transformer_context["negative_text_embeddings"] = self._encode_text(
                [self.config.negative_prompt] * num_prompts
            )
        if image is not None:
            image = image.to(device)
            if self.image_encoder is not None:
                flat_image = image.reshape(num_prompts, *image.shape[-3:])
                image_embeddings = self.image_encoder(flat_image).to(device=device, dtype=dtype)
                transformer_context["image_embeddings"] = image_embeddings.reshape(
                    *self._batch_shape, *image_embeddings.shape[1:]
                )
        encoder_context = {}
        if self.encoder is not None:
            encoder_context["num_latent_frames"] = self._num_latent_frames_per_chunk()
        base_cache = super().initialize_cache(
            transformer_context=transformer_context, encoder_context=encoder_context
        )
        if release_oneshot_encoders:
            self.release_oneshot_encoders()
        return WanInferencePipelineCache(
            transformer_cache=base_cache.transformer_cache,
            encoder_cache=base_cache.encoder_cache,
            decoder_cache=base_cache.decoder_cache,
            image=image,
        )

    @torch.no_grad()
    def switch_prompt(
        self,
        cache: WanInferencePipelineCache,
        text: list[str] | str | None = None,
        *,
        negative_prompt: str | None = None,
        recache: bool = True,
    ) -> None:
        """Switch the prompt(s) of a running rollout at the next chunk boundary.

        ``text`` replaces the prompts (one per batch entry), ``negative_prompt``
        the CFG negative prompt; ``None`` keeps either. ``recache=True``
        recomputes the self-attention KV cache under the new text by replaying
        the cached chunks' latents through the commit pass
        (:meth:`~flashdreams.recipes.wan.transformer.Wan21Transformer.switch_conditioning`);
        ``False`` only changes the cross-attention text. The text encoder must
        still be loaded (``initialize_cache(..., release_oneshot_encoders=False)``)
        or is rebuilt here.
        """
        if isinstance(text, str):
            text = [text]
        num_prompts = math.prod(self._batch_shape)
        context: dict[str, torch.Tensor] = {}
        if text is not None:
            if len(text) != num_prompts:
                raise ValueError(
                    f"got {len(text)} prompt(s) but the transformer's batch_shape "
                    f"{self._batch_shape} needs {num_prompts}"
                )
            for prompt in text:
                if not prompt.strip():
                    raise ValueError(f"cannot switch to an empty prompt: {prompt!r}")
            context["text_embeddings"] = self._encode_text(list(text))
        if negative_prompt is not None:
            if self._guidance_scale == 1.0:
                raise ValueError(
                    f"negative_prompt={negative_prompt!r} was given but guidance_scale=1.0 "
                    "disables CFG"
                )
            context["negative_text_embeddings"] = self._encode_text([negative_prompt] * num_prompts)
        self.switch_conditioning(cache, recache=recache, **context)

    def _encode_text(self, text: list[str]) -> torch.Tensor:
        """``[*batch_shape, text_len, text_dim]`` embeddings of one prompt per batch entry."""
        self._load_oneshot_encoders()
        if self.text_encoder is None:
            raise ValueError(
                "WanInferencePipelineConfig.text_encoder is None: cannot encode prompts"
            )
        embeddings = self.text_encoder(text).to(
            device=self.device, dtype=self.diffusion_model.dtype
        )
        return embeddings.reshape(*self._batch_shape, *embeddings.shape[1:])

    def _num_latent_frames_per_chunk(self) -> int:
        return self.transformer.len_t

    @torch.no_grad()
    def generate(  # type: ignore[override]
        self, autoregressive_index: int, cache: WanInferencePipelineCache, input: Any = None
    ) -> torch.Tensor | None:
        """Generate one decoded chunk ``[*batch, T, 3, H, W]`` in [-1, 1].

        ``input`` is this AR step's control for the encoder; ``None`` gives the
        I2V encoder the first frame. Under context parallelism only rank 0
        decodes; other ranks return ``None``.
        """
        return super().generate(autoregressive_index, cache, input=self._control(cache, input))

    @torch.no_grad()
    def generate_latent(  # type: ignore[override]
        self, autoregressive_index: int, cache: WanInferencePipelineCache, input: Any = None
    ) -> torch.Tensor | None:
        """Denoise one chunk without decoding it: the clean latent ``[*batch, T, C, H, W]``.

        ``decode_latent(latent, autoregressive_index, cache)`` turns it into
        what ``generate`` returns. Under context parallelism only rank 0 gets
        the latent; other ranks return ``None``. ``input`` as in :meth:`generate`.
        """
        return super().generate_latent(
            autoregressive_index, cache, input=self._control(cache, input)
        )

    def _control(self, cache: WanInferencePipelineCache, input: Any) -> Any:
        """The encoder input of one AR step: the given control, else the I2V first frame."""
        if input is not None or self.encoder is None:
            return input
        return cache.image
