"""Prompt switch between chunks (``recache`` / ``none``), the bounded commit history and
per-chunk controls, on tiny random-weight Wan pipelines (fp32, CPU).

The ``recache`` reference is built by hand from public pieces: a fresh cache
under the new prompt, the stored clean latents committed through
``finalize_kv_cache`` at their own chunk positions, then the next chunk drawn
from the same RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from test_wan_pipeline import tiny_text_encoder

from flashdreams.infra.diffusion.model import DiffusionModelConfig
from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
from flashdreams.infra.encoder import EncoderConfig, StreamingEncoderCache
from flashdreams.infra.encoder.base import Encoder
from flashdreams.infra.pipeline import StreamInferencePipelineConfig
from flashdreams.recipes.wan import (
    I2VCtrl,
    Wan21TransformerConfig,
    WanDiTNetworkTinyConfig,
    WanInferencePipelineConfig,
)

HEIGHT, WIDTH = 4, 6
TOL = 1e-5


def tiny_transformer(**overrides: Any) -> Wan21TransformerConfig:
    settings: dict[str, Any] = dict(
        network=WanDiTNetworkTinyConfig(),
        dtype=torch.float32,
        checkpoint_path=None,
        len_t=1,
        window_size_t=4,
        sink_size_t=0,
        compile_network=False,
        use_cuda_graph=False,
    )
    settings.update(overrides)
    return Wan21TransformerConfig(**settings)


def tiny_scheduler() -> FlowMatchSchedulerConfig:
    return FlowMatchSchedulerConfig(
        num_inference_steps=2, shift=5.0, denoising_timesteps=[1000, 500]
    )


def tiny_wan_pipeline(*, guidance_scale: float = 1.0, context_noise: int = 0, **transformer):
    config = WanInferencePipelineConfig(
        name="wan-tiny-switch",
        diffusion_model=DiffusionModelConfig(
            transformer=tiny_transformer(guidance_scale=guidance_scale, **transformer),
            scheduler=tiny_scheduler(),
            seed=0,
            context_noise=context_noise,
        ),
        text_encoder=tiny_text_encoder(),
        negative_prompt="blurry",
    )
    torch.manual_seed(0)
    return config.setup().eval()


def run_chunks(pipeline, cache, indices) -> list[torch.Tensor]:
    latents = []
    for index in indices:
        latents.append(pipeline.generate(index, cache))
        pipeline.finalize(index, cache)
    return latents


def rollout_with_switch(pipeline, *, num_before: int, recache: bool, **switch):
    """``num_before`` chunks of "a red ball", a switch, one more chunk.

    Returns ``(latents before, rng state at the switch, chunk after, cache)``."""
    pipeline.diffusion_model.rng.manual_seed(0)
    cache = pipeline.initialize_cache(
        ["a red ball"], height=HEIGHT, width=WIDTH, release_oneshot_encoders=False
    )
    before = run_chunks(pipeline, cache, range(num_before))
    rng_state = pipeline.diffusion_model.rng.get_state()
    pipeline.switch_prompt(cache, recache=recache, **switch)
    after = pipeline.generate(num_before, cache)
    return before, rng_state, after, cache


def hand_built_recache(pipeline, before, rng_state, kept_indices, *, prompt, next_index):
    """Fresh cache under the new conditioning, kept chunks committed at their positions,
    then chunk ``next_index`` from ``rng_state``."""
    model = pipeline.diffusion_model
    transformer = model.transformer
    cache = pipeline.initialize_cache([prompt], height=HEIGHT, width=WIDTH)
    transformer_cache = cache.transformer_cache
    counter = transformer_cache.batched_network_cache.num_committed_chunks
    timestep = torch.tensor(float(model.config.context_noise))
    for index in kept_indices:
        counter[0] = index
        clean = transformer.patchify_and_maybe_split_cp(before[index])
        transformer.finalize_kv_cache(clean, timestep, transformer_cache)
    counter[0] = next_index
    model.rng.set_state(rng_state)
    latent, _ = model.generate(next_index, transformer_cache)
    return latent


@pytest.mark.parametrize(
    "guidance_scale, switch, reference_negative",
    [
        (1.0, dict(text="a blue cube"), None),
        (3.0, dict(text="a blue cube", negative_prompt="dark"), "dark"),
        (3.0, dict(negative_prompt="dark"), "dark"),
    ],
    ids=["prompt", "prompt+negative", "negative-only"],
)
def test_recache_equals_hand_built_reference_and_differs_from_none(
    guidance_scale, switch, reference_negative
):
    pipeline = tiny_wan_pipeline(guidance_scale=guidance_scale)
    before, rng_state, recached, _ = rollout_with_switch(
        pipeline, num_before=3, recache=True, **switch
    )
    _, _, text_only, _ = rollout_with_switch(pipeline, num_before=3, recache=False, **switch)
    pipeline.config.negative_prompt = reference_negative or pipeline.config.negative_prompt
    reference = hand_built_recache(
        pipeline,
        before,
        rng_state,
        [0, 1, 2],
        prompt=switch.get("text", "a red ball"),
        next_index=3,
    )
    assert (recached - reference).abs().max().item() <= TOL
    # The switch is real, and re-caching the history changes the next chunk measurably.
    assert (text_only - recached).abs().max().item() > 1e-3


def test_recache_with_the_same_prompt_and_full_window_changes_nothing():
    pipeline = tiny_wan_pipeline()
    _, _, after_recache, _ = rollout_with_switch(
        pipeline, num_before=3, recache=True, text="a red ball"
    )
    cache = pipeline.initialize_cache(["a red ball"], height=HEIGHT, width=WIDTH)
    pipeline.diffusion_model.rng.manual_seed(0)
    plain = run_chunks(pipeline, cache, range(4))[-1]
    assert (after_recache - plain).abs().max().item() <= TOL


def test_recache_with_sink_and_evicted_window():
    """Sink 1 frame, window 2 frames, 5 chunks of 1 frame: the cache holds chunks 0 | 3 4,
    and ``context_noise > 0``: the re-noised latents are replayed as committed."""
    pipeline = tiny_wan_pipeline(window_size_t=2, sink_size_t=1, context_noise=100)
    before, rng_state, recached, cache = rollout_with_switch(
        pipeline, num_before=5, recache=True, text="a blue cube"
    )
    history = cache.transformer_cache.history
    assert [chunk.chunk_index for chunk in history.chunks] == [0, 3, 4]
    committed = {chunk.chunk_index: chunk.latent for chunk in history.chunks}
    # Reference: the same latents as committed, at positions 0, 3, 4.
    model = pipeline.diffusion_model
    transformer = model.transformer
    reference_cache = pipeline.initialize_cache(["a blue cube"], height=HEIGHT, width=WIDTH)
    transformer_cache = reference_cache.transformer_cache
    counter = transformer_cache.batched_network_cache.num_committed_chunks
    for index in (0, 3, 4):
        counter[0] = index
        transformer.finalize_kv_cache(committed[index], torch.tensor(100.0), transformer_cache)
    counter[0] = 5
    model.rng.set_state(rng_state)
    reference, _ = model.generate(5, transformer_cache)
    assert (recached - reference).abs().max().item() <= TOL
    _, _, text_only, _ = rollout_with_switch(
        pipeline, num_before=5, recache=False, text="a blue cube"
    )
    assert (text_only - recached).abs().max().item() > 1e-3
    assert len(before) == 5


def test_commit_history_is_bounded_by_sink_and_window():
    pipeline = tiny_wan_pipeline(window_size_t=2, sink_size_t=1)
    cache = pipeline.initialize_cache(["a red ball"], height=HEIGHT, width=WIDTH)
    history = cache.transformer_cache.history
    sizes = []
    for index in range(8):
        run_chunks(pipeline, cache, [index])
        sizes.append(history.storage_bytes())
    assert [chunk.chunk_index for chunk in history.chunks] == [0, 6, 7]
    assert sizes[2:] == [sizes[2]] * 6


def test_switch_errors_name_the_value():
    pipeline = tiny_wan_pipeline()
    cache = pipeline.initialize_cache(["a red ball"], height=HEIGHT, width=WIDTH)
    with pytest.raises(ValueError, match=r"cannot switch to an empty prompt: '  '"):
        pipeline.switch_prompt(cache, "  ")
    with pytest.raises(ValueError, match=r"negative_prompt='dark' was given but guidance_scale"):
        pipeline.switch_prompt(cache, negative_prompt="dark")
    pipeline.generate(0, cache)
    with pytest.raises(RuntimeError, match=r"between generate\(0\) and finalize\(0\)"):
        pipeline.switch_prompt(cache, "a blue cube")


# ------------------------------------------------------------ per-chunk controls
class ScalarControlEncoder(Encoder):
    """Test encoder: a float control -> an I2V payload pinning the chunk to that value."""

    def forward(self, input: float, autoregressive_index: int = 0, cache: Any = None) -> I2VCtrl:
        shape = (1, 1, 16, HEIGHT, WIDTH)  # [*batch, T, C, H, W]
        return I2VCtrl(latent=torch.full(shape, float(input)), mask=torch.ones(shape))

    def initialize_autoregressive_cache(self, **context: Any) -> StreamingEncoderCache:
        return StreamingEncoderCache()


@dataclass(kw_only=True)
class ScalarControlEncoderConfig(EncoderConfig):
    _target: type[ScalarControlEncoder] = field(default_factory=lambda: ScalarControlEncoder)


def test_control_of_chunk_k_reaches_the_encoder_at_step_k():
    config = StreamInferencePipelineConfig(
        name="control-test",
        diffusion_model=DiffusionModelConfig(
            transformer=tiny_transformer(stamp_image_latent=True),
            scheduler=tiny_scheduler(),
            seed=0,
        ),
        encoder=ScalarControlEncoderConfig(),
    )
    torch.manual_seed(0)
    pipeline = config.setup().eval()
    text = torch.randn(1, 8, 32)

    def rollout(controls):
        cache = pipeline.initialize_cache(
            transformer_context=dict(height=HEIGHT, width=WIDTH, text_embeddings=text)
        )
        chunks = []
        for index, control in enumerate(controls):
            chunks.append(pipeline.generate(index, cache, input=control))
            pipeline.finalize(index, cache)
        return chunks

    chunks = rollout([0.5, -1.0, 2.0])
    for chunk, value in zip(chunks, [0.5, -1.0, 2.0], strict=True):
        assert torch.allclose(chunk, torch.full_like(chunk, value))
    changed = rollout([0.5, 3.0, 2.0])
    assert torch.equal(changed[0], chunks[0])
    assert torch.allclose(changed[1], torch.full_like(changed[1], 3.0))
