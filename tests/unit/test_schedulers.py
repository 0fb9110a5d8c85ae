"""FlowMatchScheduler (self-forcing) and FlowMatchUniPCScheduler: schedules, loops, dtypes, noise."""

from __future__ import annotations

import math

import pytest
import torch

from flashdreams.infra.diffusion.scheduler import (
    FlowMatchScheduler,
    FlowMatchSchedulerConfig,
    FlowMatchUniPCScheduler,
    FlowMatchUniPCSchedulerConfig,
)

LATENT_SHAPE = (2, 4, 3, 5, 6)  # [B, C, T, H, W]


def _noise(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(LATENT_SHAPE, generator=generator).to(dtype)


class RecordingPredictor:
    """Toy flow predictor that depends on both the latent and the timestep and records its calls."""

    def __init__(self) -> None:
        self.timesteps: list[torch.Tensor] = []
        self.input_dtypes: list[torch.dtype] = []

    def __call__(self, noisy_latent: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.timesteps.append(timestep)
        self.input_dtypes.append(noisy_latent.dtype)
        return 0.3 * noisy_latent + 0.05 * torch.tanh(noisy_latent) + 1e-3 * timestep.float()


class CountingNoise:
    """``noise_like`` that counts calls and draws from its own seeded generator."""

    def __init__(self, seed: int = 123) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.num_calls = 0
        self.seen_rngs: list[torch.Generator | None] = []

    def __call__(self, x: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
        self.num_calls += 1
        self.seen_rngs.append(rng)
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype, device=x.device)


# --------------------------------------------------------------------------- flow match


def _reference_self_forcing_loop(
    noise: torch.Tensor,
    predict_flow,
    denoising_timesteps: list[int],
    shift: float,
    draw_eps,
    renoise_at_same_sigma: bool = False,
) -> torch.Tensor:
    """Hand-written Self-Forcing loop in float64 (DiffSynth schedule, warp, next-sigma re-noise).

    ``renoise_at_same_sigma`` switches to the other reading of the loop (re-noise
    to the current step's sigma) so the test can show the two differ.
    """
    num_train = 1000
    table = [i / num_train for i in range(num_train, 0, -1)]  # linspace(1, 0, 1001)[:-1]
    table = [shift * s / (1 + (shift - 1) * s) for s in table] + [0.0]
    step_sigmas = [table[num_train - t] for t in denoising_timesteps]
    step_timesteps = [s * num_train for s in step_sigmas]

    noisy = noise.double()
    clean = noisy
    for index, (timestep, sigma) in enumerate(zip(step_timesteps, step_sigmas)):
        flow = predict_flow(noisy.float(), torch.tensor(timestep, dtype=torch.float32)).double()
        clean = noisy - sigma * flow
        if index + 1 < len(step_sigmas):
            next_sigma = sigma if renoise_at_same_sigma else step_sigmas[index + 1]
            noisy = (1 - next_sigma) * clean + next_sigma * draw_eps(noise).double()
    return clean.float()


@pytest.mark.parametrize(
    ("shift", "expected"),
    [(5.0, [1000.0, 937.5, 833.3333, 625.0]), (8.0, [1000.0, 960.0, 888.8889, 727.2727])],
)
def test_flow_match_warped_timesteps_seen_by_predictor(shift, expected):
    scheduler = FlowMatchSchedulerConfig(
        shift=shift, denoising_timesteps=[1000, 750, 500, 250]
    ).setup()
    assert isinstance(scheduler, FlowMatchScheduler)
    predictor = RecordingPredictor()
    scheduler.sample(_noise(), predictor, rng=torch.Generator().manual_seed(0))
    seen = [float(t) for t in predictor.timesteps]
    assert seen == pytest.approx(expected, abs=1e-3)
    assert all(t.dtype == torch.float32 and t.dim() == 0 for t in predictor.timesteps)
    assert scheduler.step_sigmas.tolist() == pytest.approx([t / 1000 for t in expected], abs=1e-6)


def test_flow_match_sample_matches_hand_written_self_forcing_loop():
    config = FlowMatchSchedulerConfig(shift=5.0, denoising_timesteps=[1000, 750, 500, 250])
    scheduler = config.setup()
    noise = _noise(1)

    ours = scheduler.sample(noise, RecordingPredictor(), noise_like=CountingNoise(7))
    reference = _reference_self_forcing_loop(
        noise,
        RecordingPredictor(),
        config.denoising_timesteps,
        config.shift,
        draw_eps=lambda x, eps_source=CountingNoise(7): eps_source(x, None),
    )
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)

    # Re-noising at the *same* sigma (the other reading) gives a clearly different result.
    wrong = _reference_self_forcing_loop(
        noise,
        RecordingPredictor(),
        config.denoising_timesteps,
        config.shift,
        draw_eps=lambda x, eps_source=CountingNoise(7): eps_source(x, None),
        renoise_at_same_sigma=True,
    )
    assert (ours - wrong).abs().max() > 1e-2


def test_flow_match_renoise_targets_next_sigma():
    """The latent fed to step i+1 is ``(1 - sigma_{i+1}) * x0_i + sigma_{i+1} * eps``."""
    scheduler = FlowMatchSchedulerConfig(shift=8.0).setup()
    noise = _noise(2)
    inputs: list[torch.Tensor] = []
    eps_draws: list[torch.Tensor] = []

    def predictor(x, t):
        inputs.append(x.clone())
        return 0.5 * x

    def noise_like(x, rng):
        eps_draws.append(torch.full_like(x, float(len(eps_draws) + 1)))
        return eps_draws[-1]

    out = scheduler.sample(noise, predictor, noise_like=noise_like)
    sigmas = scheduler.step_sigmas.tolist()
    for step in range(3):
        clean = inputs[step] - sigmas[step] * 0.5 * inputs[step]
        expected = (1 - sigmas[step + 1]) * clean + sigmas[step + 1] * eps_draws[step]
        torch.testing.assert_close(inputs[step + 1], expected)
    torch.testing.assert_close(out, inputs[3] * (1 - sigmas[3] * 0.5))


def test_flow_match_exact_flow_recovers_data_point():
    """With the exact flow of a single data point ``c`` every x0 estimate equals ``c``."""
    scheduler = FlowMatchSchedulerConfig(shift=5.0).setup()
    target = torch.linspace(-1, 1, math.prod(LATENT_SHAPE)).reshape(LATENT_SHAPE)
    sigma_by_timestep = {
        float(t): float(s)
        for t, s in zip(scheduler.denoising_step_list, scheduler.step_sigmas, strict=True)
    }

    def exact_flow(x, t):
        return (x - target) / sigma_by_timestep[float(t)]

    out = scheduler.sample(_noise(3), exact_flow, rng=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)


def test_flow_match_without_warp_uses_raw_timesteps_and_snapped_sigmas():
    scheduler = FlowMatchSchedulerConfig(
        shift=5.0, warp_denoising_step=False, denoising_timesteps=[1000, 750, 500, 250]
    ).setup()
    assert scheduler.denoising_step_list.tolist() == [1000.0, 750.0, 500.0, 250.0]
    # Each sigma is the schedule entry whose timestep is nearest to the raw value.
    table_t = scheduler.schedule_timesteps
    for raw, sigma in zip([1000, 750, 500, 250], scheduler.step_sigmas.tolist()):
        nearest = int((table_t - raw).abs().argmin())
        assert sigma == pytest.approx(float(scheduler.schedule_sigmas[nearest]))
        assert sigma == pytest.approx(raw / 1000, abs=2e-3)


def test_flow_match_extra_one_step_false_uses_n_points():
    with_extra = FlowMatchSchedulerConfig(num_train_timesteps=10, denoising_timesteps=[10, 5, 2, 1])
    without_extra = FlowMatchSchedulerConfig(
        num_train_timesteps=10, denoising_timesteps=[10, 5, 2, 1], extra_one_step=False, shift=1.0
    )
    # extra step: linspace(1, 0, 11)[:-1] = 1.0, 0.9, ..., 0.1, then shift 8
    unshifted = [1.0 - i / 10 for i in range(10)]
    assert with_extra.setup().schedule_timesteps[:10].tolist() == pytest.approx(
        [10 * 8 * s / (1 + 7 * s) for s in unshifted], abs=1e-4
    )
    # no extra step: linspace(1, 0, 10) = 1, 8/9, ..., 0 (shift 1 keeps it linear)
    assert without_extra.setup().schedule_timesteps[:10].tolist() == pytest.approx(
        [10 * (1 - i / 9) for i in range(10)], abs=1e-5
    )


def test_flow_match_integer_timestep_dtype_truncates():
    scheduler = FlowMatchSchedulerConfig(shift=5.0, timestep_dtype=torch.int64).setup()
    predictor = RecordingPredictor()
    scheduler.sample(_noise(), predictor)
    assert [int(t) for t in predictor.timesteps] == [1000, 937, 833, 625]
    assert all(t.dtype == torch.int64 for t in predictor.timesteps)
    # The sigmas stay the exact fp32 schedule values.
    assert scheduler.step_sigmas.tolist() == pytest.approx([1.0, 0.9375, 0.833333, 0.625], abs=1e-6)


def test_flow_match_schedule_stays_fp32_under_module_to_bf16():
    scheduler = FlowMatchSchedulerConfig(shift=5.0).setup().to(torch.bfloat16)
    for name in ("schedule_sigmas", "schedule_timesteps", "step_sigmas", "denoising_step_list"):
        assert getattr(scheduler, name).dtype == torch.float32, name
    # The warped 937.5 survives although bf16 cannot represent it (it would round to 936).
    assert scheduler.denoising_step_list.tolist() == pytest.approx(
        [1000.0, 937.5, 833.3333, 625.0], abs=1e-3
    )
    assert torch.tensor(937.5).to(torch.bfloat16).item() != 937.5  # what .to(bf16) would have done

    predictor = RecordingPredictor()
    noise = _noise(4, torch.bfloat16)
    out = scheduler.sample(noise, predictor, rng=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and out.shape == noise.shape
    assert predictor.input_dtypes == [torch.bfloat16] * 4
    assert all(t.dtype == torch.float32 for t in predictor.timesteps)

    # bf16 result = fp32 loop on the same inputs, up to bf16 rounding.
    reference = (
        FlowMatchSchedulerConfig(shift=5.0)
        .setup()
        .sample(noise.float(), RecordingPredictor(), rng=torch.Generator().manual_seed(0))
    )
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)


def test_flow_match_noise_like_used_for_every_draw():
    scheduler = FlowMatchSchedulerConfig(
        num_inference_steps=3, denoising_timesteps=[1000, 600, 300]
    ).setup()
    counting = CountingNoise()
    rng = torch.Generator().manual_seed(5)
    scheduler.sample(_noise(), RecordingPredictor(), rng=rng, noise_like=counting)
    assert counting.num_calls == 2  # one re-noise between consecutive steps
    assert all(seen is rng for seen in counting.seen_rngs)

    scheduler.add_noise(_noise(), torch.tensor(500.0), rng=rng, noise_like=counting)
    assert counting.num_calls == 3

    # Without noise_like, draws come from ``rng``: same seed -> same result, other seed -> other.
    def run(seed):
        return scheduler.sample(
            _noise(), RecordingPredictor(), rng=torch.Generator().manual_seed(seed)
        )

    torch.testing.assert_close(run(0), run(0), atol=0, rtol=0)
    assert not torch.equal(run(0), run(1))


def test_flow_match_add_noise_snaps_to_schedule():
    scheduler = FlowMatchSchedulerConfig(shift=5.0).setup()
    clean = _noise(6)
    eps = _noise(7)

    def fixed_eps(x, rng):
        return eps

    # 937.4 snaps to the table entry 937.5 (sigma 0.9375), the warped 750 step.
    noisy = scheduler.add_noise(clean, torch.tensor(937.4), noise_like=fixed_eps)
    torch.testing.assert_close(noisy, 0.0625 * clean + 0.9375 * eps)

    # Timestep 0 snaps to the trailing zero entry: identity.
    torch.testing.assert_close(
        scheduler.add_noise(clean, torch.tensor(0.0), noise_like=fixed_eps), clean
    )

    # One timestep per batch element.
    per_sample = scheduler.add_noise(clean, torch.tensor([1000.0, 625.2]), noise_like=fixed_eps)
    torch.testing.assert_close(per_sample[0], eps[0])
    torch.testing.assert_close(per_sample[1], 0.375 * clean[1] + 0.625 * eps[1])

    with pytest.raises(ValueError, match=r"timestep must be a scalar or a 1-D tensor"):
        scheduler.add_noise(clean, torch.tensor([1.0, 2.0, 3.0]), noise_like=fixed_eps)


def test_flow_match_add_noise_dtype():
    scheduler = FlowMatchSchedulerConfig().setup().to(torch.bfloat16)
    clean = _noise(8, torch.bfloat16)
    noisy = scheduler.add_noise(clean, torch.tensor(500.0), rng=torch.Generator().manual_seed(0))
    assert noisy.dtype == torch.bfloat16 and noisy.shape == clean.shape


def test_flow_match_num_inference_steps_regenerates_evenly_spaced_list():
    # The default list is evenly spaced, so num_inference_steps alone picks the step count.
    two = FlowMatchSchedulerConfig(num_inference_steps=2, shift=5.0).setup()
    predictor = RecordingPredictor()
    two.sample(_noise(), predictor)
    # warped: 1000 -> 1000, 500 -> 5 * 0.5 / (1 + 4 * 0.5) * 1000
    assert [float(t) for t in predictor.timesteps] == pytest.approx([1000.0, 833.3333], abs=1e-3)
    three = FlowMatchSchedulerConfig(num_inference_steps=3, warp_denoising_step=False).setup()
    assert three.denoising_step_list.tolist() == [1000.0, 667.0, 333.0]


def test_flow_match_config_validation():
    with pytest.raises(
        ValueError,
        match=r"num_inference_steps=2 but denoising_timesteps has 3 entries \(\[1000, 937, 833\]\); "
        r"give denoising_timesteps exactly 2 entries, e.g. \[1000, 500\]",
    ):
        FlowMatchSchedulerConfig(
            num_inference_steps=2, denoising_timesteps=[1000, 937, 833]
        ).setup()
    with pytest.raises(ValueError, match=r"num_inference_steps must be >= 1, got 0"):
        FlowMatchSchedulerConfig(num_inference_steps=0).setup()
    with pytest.raises(ValueError, match=r"integer in \[0, 1000\], got \[1200\]"):
        FlowMatchSchedulerConfig(num_inference_steps=2, denoising_timesteps=[1200, 500]).setup()


def test_flow_match_tqdm(capsys):
    scheduler = FlowMatchSchedulerConfig(enable_tqdm=True).setup()
    scheduler.sample(_noise(), RecordingPredictor())
    assert "flow-match" in capsys.readouterr().err


# --------------------------------------------------------------------------- UniPC


def test_unipc_timesteps_are_truncated_sigmas():
    default = FlowMatchUniPCSchedulerConfig().setup()
    assert isinstance(default, FlowMatchUniPCScheduler)
    assert default.timesteps.dtype == torch.int64
    assert default.timesteps.shape == (50,)
    assert default.timesteps[:5].tolist() == [999, 995, 991, 987, 982]

    four = FlowMatchUniPCSchedulerConfig(num_inference_steps=4, shift=5.0).setup()
    assert four.timesteps.tolist() == [999, 937, 833, 624]
    # sigma schedule: shifted linspace(0.999, 0, 5)[:-1] with a trailing zero
    expected = [5 * s / (1 + 4 * s) for s in (0.999, 0.74925, 0.4995, 0.24975)] + [0.0]
    assert four.sigmas.tolist() == pytest.approx(expected, abs=1e-6)
    assert four.predictor_orders == (1, 2, 2, 1)
    assert four.corrector_orders == (0, 1, 2, 2)


def test_unipc_exact_flow_recovers_data_point():
    scheduler = FlowMatchUniPCSchedulerConfig(num_inference_steps=8).setup()
    target = torch.linspace(-1, 1, math.prod(LATENT_SHAPE)).reshape(LATENT_SHAPE)
    sigma_by_timestep = {
        int(t): float(s) for t, s in zip(scheduler.timesteps, scheduler.sigmas[:-1], strict=True)
    }

    def exact_flow(x, t):
        return (x - target) / sigma_by_timestep[int(t)]

    torch.testing.assert_close(scheduler.sample(_noise(), exact_flow), target, atol=1e-5, rtol=0)


def test_unipc_predictor_calls_rng_and_noise_unused():
    scheduler = FlowMatchUniPCSchedulerConfig(num_inference_steps=6).setup()
    predictor = RecordingPredictor()
    counting = CountingNoise()
    first = scheduler.sample(
        _noise(), predictor, rng=torch.Generator().manual_seed(0), noise_like=counting
    )
    second = scheduler.sample(_noise(), RecordingPredictor(), rng=torch.Generator().manual_seed(9))
    assert counting.num_calls == 0
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert [int(t) for t in predictor.timesteps] == scheduler.timesteps.tolist()
    assert all(t.dtype == torch.int64 and t.dim() == 0 for t in predictor.timesteps)


def test_unipc_order_one_is_first_order_ddim_style():
    """solver_order=1 keeps only the first-order terms (no d1 coefficients anywhere)."""
    scheduler = FlowMatchUniPCSchedulerConfig(num_inference_steps=5, solver_order=1).setup()
    assert scheduler.predictor_orders == (1,) * 5
    assert scheduler.corrector_orders == (0, 1, 1, 1, 1)
    assert scheduler.predictor_coefficients[:, 2].abs().max() == 0
    assert scheduler.corrector_coefficients[:, 2].abs().max() == 0
    # Last predictor step lands on sigma 0 and returns the x0 estimate exactly.
    assert scheduler.predictor_coefficients[-1, :2].tolist() == pytest.approx([0.0, 1.0])


def test_unipc_buffers_stay_fp32_and_bf16_roundtrip():
    scheduler = FlowMatchUniPCSchedulerConfig(num_inference_steps=10).setup()
    fp32_reference = scheduler.sample(_noise(), RecordingPredictor())
    sigmas_before = scheduler.sigmas.clone()
    scheduler = scheduler.to(torch.bfloat16)
    assert scheduler.sigmas.dtype == torch.float32
    assert scheduler.predictor_coefficients.dtype == torch.float32
    assert scheduler.corrector_coefficients.dtype == torch.float32
    assert scheduler.timesteps.dtype == torch.int64
    assert torch.equal(scheduler.sigmas, sigmas_before)

    predictor = RecordingPredictor()
    out = scheduler.sample(_noise(0, torch.bfloat16), predictor)
    assert out.dtype == torch.bfloat16
    assert predictor.input_dtypes == [torch.bfloat16] * 10
    torch.testing.assert_close(out.float(), fp32_reference, atol=0.1, rtol=0.05)


def test_unipc_add_noise_snaps_to_inference_schedule():
    scheduler = FlowMatchUniPCSchedulerConfig(num_inference_steps=4, shift=5.0).setup()
    clean, eps = _noise(1), _noise(2)

    def fixed_eps(x, rng):
        return eps

    sigma_937 = float(scheduler.sigmas[1])
    noisy = scheduler.add_noise(clean, torch.tensor(940), noise_like=fixed_eps)
    torch.testing.assert_close(noisy, (1 - sigma_937) * clean + sigma_937 * eps)
    # No t=0 entry: 0 snaps to the smallest sigma of the schedule (t=624).
    sigma_624 = float(scheduler.sigmas[3])
    noisy = scheduler.add_noise(clean, torch.tensor(0), noise_like=fixed_eps)
    torch.testing.assert_close(noisy, (1 - sigma_624) * clean + sigma_624 * eps)

    counting = CountingNoise()
    scheduler.add_noise(clean, torch.tensor(500), noise_like=counting)
    assert counting.num_calls == 1


def test_unipc_config_validation():
    with pytest.raises(NotImplementedError, match=r"use_kerras_sigma=True is not supported"):
        FlowMatchUniPCSchedulerConfig(use_kerras_sigma=True).setup()
    with pytest.raises(ValueError, match=r"solver_order must be one of \(1, 2\), got 3"):
        FlowMatchUniPCSchedulerConfig(solver_order=3).setup()
    with pytest.raises(ValueError, match=r"num_inference_steps must be >= 1, got 0"):
        FlowMatchUniPCSchedulerConfig(num_inference_steps=0).setup()
