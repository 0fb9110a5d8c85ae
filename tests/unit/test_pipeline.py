"""StreamInferencePipeline, DiffusionModel and EventProfiler with toy components."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

from flashdreams.infra.decoder import (
    DecoderConfig,
    StreamingDecoderCache,
    StreamingVideoDecoder,
)
from flashdreams.infra.diffusion.model import DiffusionModel, DiffusionModelConfig
from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
from flashdreams.infra.diffusion.transformer import (
    Transformer,
    TransformerAutoregressiveCache,
    TransformerConfig,
)
from flashdreams.infra.encoder import NullEncoderConfig
from flashdreams.infra.pipeline import StreamInferencePipelineConfig
from flashdreams.infra.profiler import EventProfiler

NUM_TOKENS, NUM_CHANNELS = 6, 3


@dataclass(kw_only=True)
class ToyCache(TransformerAutoregressiveCache):
    history: list = field(default_factory=list)
    started: list = field(default_factory=list)
    finalized: list = field(default_factory=list)
    finalize_timesteps: list = field(default_factory=list)

    def start(self, autoregressive_index: int) -> None:
        self.started.append(autoregressive_index)

    def finalize(self, autoregressive_index: int) -> None:
        self.finalized.append(autoregressive_index)


class ToyTransformer(Transformer[ToyCache]):
    """A two-parameter flow predictor whose output depends on the cached history."""

    def __init__(self, config):
        super().__init__(config)
        self.weight = nn.Parameter(torch.tensor(0.3))
        self.context_weight = nn.Parameter(torch.tensor(0.7))

    @property
    def latent_shape(self):
        return (1, NUM_TOKENS, NUM_CHANNELS)

    def initialize_autoregressive_cache(self, **context):
        return ToyCache()

    def predict_flow(self, noisy_latent, timestep, cache, input=None):
        context = torch.stack(cache.history).mean() if cache.history else torch.tensor(0.0)
        flow = self.weight * noisy_latent + self.context_weight * context
        if input is not None:
            flow = flow + input
        return flow

    def finalize_kv_cache(self, noisy_latent, timestep, cache, input=None):
        cache.history.append(noisy_latent.mean())
        cache.finalize_timesteps.append(float(timestep))

    def patchify_and_maybe_split_cp(self, x):
        return x.reshape(1, NUM_TOKENS, NUM_CHANNELS)

    def unpatchify_and_maybe_gather_cp(self, x):
        return x.reshape(1, NUM_TOKENS // 2, 2, NUM_CHANNELS)


@dataclass(kw_only=True)
class ToyTransformerConfig(TransformerConfig):
    _target: type = field(default_factory=lambda: ToyTransformer)


@dataclass(kw_only=True)
class ToyDecoderCache(StreamingDecoderCache):
    num_frames_seen: int = 0


class ToyDecoder(StreamingVideoDecoder[ToyDecoderCache]):
    """Repeats each latent frame twice (once for the first frame of AR 0)."""

    spatial_compression_ratio = 1
    temporal_compression_ratio = 2

    def initialize_autoregressive_cache(self, **context):
        return ToyDecoderCache()

    def forward(self, input, autoregressive_index=0, cache=None):
        frames = input.repeat_interleave(2, dim=1)
        if autoregressive_index == 0:
            frames = frames[:, 1:]
        cache.num_frames_seen += input.shape[1]
        return torch.tanh(frames)

    def get_output_temporal_size(self, autoregressive_index, input_temporal_size):
        return 2 * input_temporal_size - (1 if autoregressive_index == 0 else 0)

    def get_input_temporal_size(self, autoregressive_index, output_temporal_size):
        return (output_temporal_size + (1 if autoregressive_index == 0 else 0)) // 2


@dataclass(kw_only=True)
class ToyDecoderConfig(DecoderConfig):
    _target: type = field(default_factory=lambda: ToyDecoder)


def make_pipeline(*, seed=0, encoder=None, decoder=None, profile=False, context_noise=0):
    config = StreamInferencePipelineConfig(
        name="toy",
        diffusion_model=DiffusionModelConfig(
            transformer=ToyTransformerConfig(),
            scheduler=FlowMatchSchedulerConfig(num_inference_steps=4, shift=5.0),
            seed=seed,
            context_noise=context_noise,
        ),
        encoder=encoder,
        decoder=decoder,
        enable_sync_and_profile=profile,
    )
    return config.setup()


def rollout(pipeline, num_steps, inputs=None):
    cache = pipeline.initialize_cache()
    outputs, stats = [], []
    for index in range(num_steps):
        control = None if inputs is None else inputs[index]
        outputs.append(pipeline.generate(index, cache, input=control))
        stats.append(pipeline.finalize(index, cache))
    return outputs, stats, cache


def test_rollout_without_encoder_or_decoder_with_profiling():
    pipeline = make_pipeline(profile=True)
    outputs, stats, cache = rollout(pipeline, 3)
    assert [tuple(o.shape) for o in outputs] == [(1, 3, 2, 3)] * 3
    assert cache.encoder_cache is None and cache.decoder_cache is None
    tc = cache.transformer_cache
    assert tc.started == [0, 1, 2] and tc.finalized == [0, 1, 2]
    assert tc.finalize_timesteps == [0.0, 0.0, 0.0]
    for step_stats in stats:
        assert set(step_stats) == {"diffuse_ms", "finalize_ms", "total_ms", "total_ms_wo_finalize"}
        assert step_stats["total_ms"] == pytest.approx(
            step_stats["diffuse_ms"] + step_stats["finalize_ms"]
        )
        assert step_stats["total_ms_wo_finalize"] == pytest.approx(step_stats["diffuse_ms"])
    # The cached history feeds later steps, so AR steps differ.
    assert not torch.allclose(outputs[1], outputs[2])


def test_rollout_is_deterministic_per_seed_and_matches_a_hand_loop():
    first, _, _ = rollout(make_pipeline(seed=7), 2)
    second, _, _ = rollout(make_pipeline(seed=7), 2)
    other, _, _ = rollout(make_pipeline(seed=8), 2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], other[0])

    # Hand-rolled equivalent of AR step 0: same seed, same scheduler, same predictor.
    pipeline = make_pipeline(seed=7)
    model = pipeline.diffusion_model
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn((1, NUM_TOKENS, NUM_CHANNELS), generator=generator)
    cache = ToyCache()
    clean = model.scheduler.sample(
        initial_noise=noise,
        predict_flow=lambda x, t: model.transformer.predict_flow(x, t, cache),
        rng=generator,
    )
    torch.testing.assert_close(first[0], clean.reshape(1, 3, 2, 3), rtol=0, atol=0)


def test_rollout_with_encoder_and_decoder():
    pipeline = make_pipeline(encoder=NullEncoderConfig(), decoder=ToyDecoderConfig(), profile=True)
    controls = [torch.full((1, NUM_TOKENS * NUM_CHANNELS), 0.1 * i) for i in range(3)]
    outputs, stats, cache = rollout(pipeline, 3, controls)
    decoder = pipeline.decoder
    # AR 0 loses one frame to causal padding; later steps give 2 per latent frame.
    assert (
        [o.shape[1] for o in outputs]
        == [
            decoder.get_output_temporal_size(0, 3),
            decoder.get_output_temporal_size(1, 3),
            decoder.get_output_temporal_size(2, 3),
        ]
        == [5, 6, 6]
    )
    assert cache.decoder_cache.num_frames_seen == 9
    assert all(o.abs().max() <= 1 for o in outputs)
    for step_stats in stats:
        assert {"encode_ms", "diffuse_ms", "decode_ms", "finalize_ms"} <= set(step_stats)
    # The encoded control reaches the transformer.
    no_control, _, _ = rollout(
        make_pipeline(encoder=NullEncoderConfig(), decoder=ToyDecoderConfig()),
        1,
        [torch.zeros(1, NUM_TOKENS * NUM_CHANNELS)],
    )
    with_control, _, _ = rollout(
        make_pipeline(encoder=NullEncoderConfig(), decoder=ToyDecoderConfig()),
        1,
        [torch.ones(1, NUM_TOKENS * NUM_CHANNELS)],
    )
    assert not torch.allclose(no_control[0], with_control[0])


def test_profiling_off_returns_none():
    _, stats, _ = rollout(make_pipeline(profile=False), 2)
    assert stats == [None, None]


def test_context_noise_renoises_before_the_cache_update():
    _, _, cache = rollout(make_pipeline(context_noise=250), 2)
    assert cache.transformer_cache.finalize_timesteps == [250.0, 250.0]


def test_ar_step_must_start_at_zero():
    pipeline = make_pipeline()
    cache = pipeline.initialize_cache()
    with pytest.raises(
        ValueError,
        match=r"AR step out of order: the previous step was None, so the next "
        r"autoregressive_index must be 0, got 1",
    ):
        pipeline.generate(1, cache)


def test_ar_step_must_advance_by_one():
    pipeline = make_pipeline()
    cache = pipeline.initialize_cache()
    pipeline.generate(0, cache)
    pipeline.finalize(0, cache)
    with pytest.raises(
        ValueError, match=r"previous step was 0, so the next autoregressive_index must be 1, got 2"
    ):
        pipeline.generate(2, cache)


def test_finalize_before_generate():
    pipeline = make_pipeline()
    cache = pipeline.initialize_cache()
    with pytest.raises(RuntimeError, match=r"finalize\(0\) called before generate\(\)"):
        pipeline.finalize(0, cache)


def test_finalize_index_must_match_generate():
    pipeline = make_pipeline()
    cache = pipeline.initialize_cache()
    pipeline.generate(0, cache)
    with pytest.raises(
        ValueError, match=r"latest generate\(\) ran AR step 0 but finalize\(\) was called with 1"
    ):
        pipeline.finalize(1, cache)


def test_finalize_twice_for_one_generate_is_refused():
    pipeline = make_pipeline()
    cache = pipeline.initialize_cache()
    pipeline.generate(0, cache)
    pipeline.finalize(0, cache)
    with pytest.raises(RuntimeError, match=r"called before generate"):
        pipeline.finalize(0, cache)


def test_input_without_encoder_is_refused():
    pipeline = make_pipeline()
    cache = pipeline.initialize_cache()
    with pytest.raises(ValueError, match=r"input was given but the pipeline has no encoder"):
        pipeline.generate(0, cache, input=torch.zeros(1))


def test_encoder_without_input_is_refused():
    pipeline = make_pipeline(encoder=NullEncoderConfig())
    cache = pipeline.initialize_cache()
    with pytest.raises(
        ValueError, match=r"has an encoder \(NullEncoder\) but no input was given for AR step 0"
    ):
        pipeline.generate(0, cache)


def test_model_rng_is_lazy_seeded_and_reused():
    model = DiffusionModelConfig(
        transformer=ToyTransformerConfig(), scheduler=FlowMatchSchedulerConfig(), seed=3
    ).setup()
    assert model._rng is None
    rng = model.rng
    assert rng is model.rng
    assert torch.equal(
        torch.randn(4, generator=rng), torch.randn(4, generator=torch.Generator().manual_seed(3))
    )
    unseeded = DiffusionModelConfig(
        transformer=ToyTransformerConfig(), scheduler=FlowMatchSchedulerConfig()
    ).setup()
    assert unseeded.rng is None


def test_model_rng_is_rebuilt_after_a_device_change():
    model = DiffusionModelConfig(
        transformer=ToyTransformerConfig(), scheduler=FlowMatchSchedulerConfig(), seed=3
    ).setup()
    first = model.rng
    torch.randn(10, generator=first)
    model._rng_device = torch.device("meta")  # as if the model had lived elsewhere
    rebuilt = model.rng
    assert rebuilt is not first
    assert torch.equal(
        torch.randn(2, generator=rebuilt),
        torch.randn(2, generator=torch.Generator().manual_seed(3)),
    )


def test_diffusion_model_generate_returns_unpatchified_latent_and_final_state():
    model: DiffusionModel = DiffusionModelConfig(
        transformer=ToyTransformerConfig(), scheduler=FlowMatchSchedulerConfig(), seed=0
    ).setup()
    cache = model.transformer.initialize_autoregressive_cache()
    clean, final_state = model.generate(autoregressive_index=0, cache=cache)
    assert clean.shape == (1, 3, 2, 3)
    assert final_state.clean_latent.shape == (1, NUM_TOKENS, NUM_CHANNELS)
    assert final_state.cache is cache and final_state.autoregressive_index == 0
    model.finalize(final_state)
    assert cache.finalized == [0]


def test_event_profiler_cpu_wall_clock():
    profiler = EventProfiler(use_cuda=False)
    time.sleep(0.02)
    profiler.record("a")
    time.sleep(0.04)
    profiler.record("b")
    profiler.record("a")
    summary = profiler.sync_and_summarize()
    assert list(summary) == ["a", "b"]
    assert 15 <= summary["a"] < 200
    assert 35 <= summary["b"] < 250
