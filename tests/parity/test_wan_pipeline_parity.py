"""WanInferencePipeline vs diffusers' WanPipeline: bidirectional T2V as a one-chunk rollout.

Same random transformer and VAE weights (diffusers ``save_pretrained`` folders
loaded through flashdreams' loaders), same prompt embeddings (the tiny UMT5
output, zero-padded to the text length, handed to diffusers as
``prompt_embeds``), same initial noise, UniPC on Wan's sigma grid, CFG 5.0.
Tolerance: 1e-4 max abs on the [0, 1] video (measured in the assertion message).
"""

from __future__ import annotations

import diffusers  # noqa: E402  (dev extra; parity needs the reference)
import numpy as np
import torch

from flashdreams.infra.diffusion.model import DiffusionModelConfig
from flashdreams.infra.diffusion.scheduler.unipc import FlowMatchUniPCSchedulerConfig
from flashdreams.recipes.wan import (
    UMT5TextEncoderConfig,
    Wan21TransformerConfig,
    WanDiTNetworkConfig,
    WanInferencePipelineConfig,
    WanVAEDecoderConfig,
    wan21_diffusers_vae_state_dict_transform,
    wan_diffusers_state_dict_transform,
)

TOLERANCE = 1e-4
NUM_STEPS, SHIFT, GUIDANCE = 6, 5.0, 5.0
NUM_LATENT_FRAMES, LATENT_HEIGHT, LATENT_WIDTH = 3, 4, 6
TEXT_LEN, TEXT_DIM, SEED = 16, 24, 11
Z_DIM = 16
VAE_DIMS = dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)


class WanGridUniPC(diffusers.UniPCMultistepScheduler):
    """diffusers' UniPC on Wan 2.1's sigma grid (``linspace(1 - 1/1000, 0, N + 1)[:-1]``)."""

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        sigmas = np.linspace(1.0 - 1.0 / 1000, 0.0, num_inference_steps + 1)[:-1]
        super().set_timesteps(sigmas=sigmas, device=device)


def _perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name or name.endswith("bias") or "gamma" in name:
                param.add_(0.1 * torch.randn_like(param))


def test_one_chunk_t2v_matches_diffusers_wan_pipeline(tmp_path):
    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=Z_DIM,
        out_channels=Z_DIM,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=48,
        num_layers=2,
    ).eval()
    _perturb(transformer)
    transformer.save_pretrained(tmp_path / "transformer")
    latents_mean = torch.randn(Z_DIM).mul(0.3).tolist()
    latents_std = torch.rand(Z_DIM).add(0.5).tolist()
    vae = diffusers.AutoencoderKLWan(
        z_dim=Z_DIM,
        latents_mean=latents_mean,
        latents_std=latents_std,
        **VAE_DIMS,
    ).eval()
    _perturb(vae)
    vae.save_pretrained(tmp_path / "vae")

    config = WanInferencePipelineConfig(
        name="parity",
        diffusion_model=DiffusionModelConfig(
            transformer=Wan21TransformerConfig(
                network=WanDiTNetworkConfig(
                    patch_size=(1, 2, 2),
                    text_len=TEXT_LEN,
                    in_dim=Z_DIM,
                    out_dim=Z_DIM,
                    dim=32,
                    ffn_dim=48,
                    freq_dim=32,
                    text_dim=TEXT_DIM,
                    num_heads=2,
                    num_layers=2,
                ),
                dtype=torch.float32,
                checkpoint_path=str(tmp_path / "transformer"),
                state_dict_transform=wan_diffusers_state_dict_transform,
                len_t=NUM_LATENT_FRAMES,
                window_size_t=NUM_LATENT_FRAMES,
                guidance_scale=GUIDANCE,
                compile_network=False,
                use_cuda_graph=False,
            ),
            scheduler=FlowMatchUniPCSchedulerConfig(num_inference_steps=NUM_STEPS, shift=SHIFT),
            seed=SEED,
            noise_in_unpatchified_shape=True,
        ),
        decoder=WanVAEDecoderConfig(
            checkpoint_path=str(tmp_path / "vae"),
            state_dict_transform=wan21_diffusers_vae_state_dict_transform,
            dtype=torch.float32,
            z_dim=Z_DIM,
            latent_mean=tuple(latents_mean),
            latent_std=tuple(latents_std),
            use_cuda_graph=False,
            **VAE_DIMS,
        ),
        text_encoder=UMT5TextEncoderConfig(
            checkpoint_path=None,
            tokenizer_path="builtin:bytes",
            text_len=TEXT_LEN,
            dtype=torch.float32,
            model_dim=TEXT_DIM,
            num_layers=1,
            num_heads=2,
            ffn_dim=32,
            vocab_size=300,
        ),
        negative_prompt="static, blurry",
    )
    torch.manual_seed(1)
    pipeline = config.setup().eval()
    cache = pipeline.initialize_cache(
        ["a cat surfing"], height=LATENT_HEIGHT, width=LATENT_WIDTH, release_oneshot_encoders=False
    )
    ours = pipeline.generate(0, cache)  # [1, T, 3, H, W] in [-1, 1]

    prompt_embeds = pipeline.text_encoder(["a cat surfing"])
    negative_embeds = pipeline.text_encoder(["static, blurry"])
    noise = torch.randn(
        (1, NUM_LATENT_FRAMES, Z_DIM, LATENT_HEIGHT, LATENT_WIDTH),
        generator=torch.Generator().manual_seed(SEED),
    )
    reference_scheduler = WanGridUniPC(
        num_train_timesteps=1000,
        solver_order=2,
        prediction_type="flow_prediction",
        predict_x0=True,
        solver_type="bh2",
        lower_order_final=True,
        disable_corrector=[],
        use_flow_sigmas=True,
        flow_shift=SHIFT,
        final_sigmas_type="zero",
    )
    reference_pipeline = diffusers.WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=reference_scheduler,
        transformer=transformer,
    )
    ratio = pipeline.decoder.spatial_compression_ratio
    num_frames = pipeline.decoder.get_output_temporal_size(0, NUM_LATENT_FRAMES)
    with torch.no_grad():
        reference = reference_pipeline(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            height=LATENT_HEIGHT * ratio,
            width=LATENT_WIDTH * ratio,
            num_frames=num_frames,
            num_inference_steps=NUM_STEPS,
            guidance_scale=GUIDANCE,
            latents=noise.permute(0, 2, 1, 3, 4).contiguous(),
            output_type="pt",
        ).frames  # [1, T, 3, H, W] in [0, 1]

    assert ours.shape == reference.shape
    ours_01 = (ours.float() + 1) / 2
    max_abs_error = (ours_01 - reference).abs().max().item()
    print(f"pipeline parity max abs error {max_abs_error:.3e}")
    assert max_abs_error <= TOLERANCE, f"max abs error {max_abs_error:.3e}"
    assert reference.std() > 1e-3  # a real video, not a constant
