"""FlowMatchUniPCScheduler vs diffusers' UniPCMultistepScheduler configured as Wan 2.1's solver.

Wan 2.1's ``FlowUniPCMultistepScheduler`` is diffusers' UniPC with flow sigmas,
x0-prediction, BH2, ``lower_order_final=True`` and ``final_sigmas_type="zero"``.
Its one difference is the sigma grid: Wan spaces the unshifted sigmas as
``linspace(1 - 1/1000, 0, N + 1)[:-1]`` while diffusers uses
``linspace(1, 1/1000, N + 1)[:-1]``. Passing Wan's grid as ``sigmas=`` to
diffusers' ``set_timesteps`` (diffusers applies ``flow_shift`` to it) makes the
two schedules identical, so the reference below *is* the Wan solver.

Tolerance: 2e-4 max abs in fp32 (measured <= 6e-6 for every case here).
"""

from __future__ import annotations

import diffusers  # noqa: E402  (dev extra; parity needs the reference)
import numpy as np  # noqa: E402
import pytest
import torch

from flashdreams.infra.diffusion.scheduler import FlowMatchUniPCSchedulerConfig

TOLERANCE = 2e-4
LATENT_SHAPE = (1, 4, 3, 8, 8)  # [B, C, T, H, W]


def _wan_reference_scheduler(num_steps: int, shift: float):
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000,
        solver_order=2,
        prediction_type="flow_prediction",
        predict_x0=True,
        solver_type="bh2",
        lower_order_final=True,
        disable_corrector=[],
        use_flow_sigmas=True,
        flow_shift=shift,
        final_sigmas_type="zero",
    )
    wan_unshifted_sigmas = np.linspace(1.0 - 1.0 / 1000, 0.0, num_steps + 1)[:-1]
    scheduler.set_timesteps(sigmas=wan_unshifted_sigmas)
    return scheduler


def _run_reference(scheduler, noise: torch.Tensor, predict_flow) -> torch.Tensor:
    sample = noise.clone()
    for timestep in scheduler.timesteps:
        flow = predict_flow(sample, timestep)
        sample = scheduler.step(flow, timestep, sample).prev_sample
    return sample


def _timestep_independent(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.1 * x + 0.05 * torch.tanh(x)


def _timestep_dependent(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Strongly nonlinear in x and t: successive x0 estimates differ a lot, so the
    # order-2 history terms matter (halving one corrector weight moves the result
    # by >= 7e-4 here, but by only ~1e-5 with the near-linear predictor above).
    return torch.sin(2 * x + float(t) / 200) - 0.3 * x


@pytest.mark.parametrize("predict_flow", [_timestep_independent, _timestep_dependent])
@pytest.mark.parametrize(("num_steps", "shift"), [(50, 5.0), (10, 5.0), (4, 5.0), (10, 3.0)])
def test_unipc_matches_diffusers_wan_configuration(num_steps, shift, predict_flow):
    ours = FlowMatchUniPCSchedulerConfig(num_inference_steps=num_steps, shift=shift).setup()
    reference = _wan_reference_scheduler(num_steps, shift)
    assert ours.timesteps.tolist() == reference.timesteps.tolist()
    torch.testing.assert_close(ours.sigmas, reference.sigmas, atol=1e-7, rtol=0)

    noise = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(num_steps))
    expected = _run_reference(reference, noise, predict_flow)
    actual = ours.sample(noise, predict_flow)
    max_abs_error = (actual - expected).abs().max().item()
    assert max_abs_error < TOLERANCE, f"max abs error {max_abs_error:.3e}"
    # The solver really moved the sample (guards against a vacuous comparison).
    assert (expected - noise).abs().max() > 0.1


def test_timestep_truncation_differs_from_diffusers_default_grid():
    """Wan's grid truncates the last of 4 steps to 624; diffusers' default grid gives 625."""
    ours = FlowMatchUniPCSchedulerConfig(num_inference_steps=4, shift=5.0).setup()
    assert ours.timesteps.tolist() == [999, 937, 833, 624]

    diffusers_default = diffusers.UniPCMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=5.0
    )
    diffusers_default.set_timesteps(4)
    assert diffusers_default.timesteps.tolist() == [999, 937, 833, 625]
