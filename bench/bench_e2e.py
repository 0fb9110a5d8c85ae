"""Benchmark 4: bidirectional text-to-video end to end, WanInferencePipeline vs diffusers' WanPipeline.

Same random transformer and VAE weights (diffusers ``save_pretrained`` folders loaded
through flashdreams' diffusers-layout loaders), same prompt embeddings (flashdreams'
tiny random UMT5 output, handed to diffusers as ``prompt_embeds``), same initial noise,
UniPC on Wan's sigma grid, CFG 5.0, then VAE decode. The outputs are compared (max abs
difference on the [0, 1] video) before timing.

Sizes (CPU, fp32, 2 threads): the mid-size DiT (dim 512, 8 heads, 4 layers, FFN 2048)
with text width 512 and 512 text tokens; 3 latent frames at 30x52 (9 video frames at
240x416); 8 UniPC steps; a reduced-width Wan 2.1 VAE (base dim 16). Timed:

* flashdreams: ``initialize_cache`` (text encoding, embedding, cross-attention K/V) +
  ``generate`` (denoise with both CFG branches in one batched forward, decode);
* diffusers: ``WanPipeline(prompt_embeds=..., negative_prompt_embeds=...)`` (two
  forwards per step, decode). diffusers gets the embeddings precomputed, so
  flashdreams' time also includes its text encoder.

    python bench/bench_e2e.py [--record] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_common_arguments,
    command_line,
    record,
    setup_torch,
    spread,
    time_interleaved,
)

NUM_STEPS, SHIFT, GUIDANCE, SEED = 8, 5.0, 5.0, 11
NUM_LATENT_FRAMES, LATENT_HEIGHT, LATENT_WIDTH = 3, 30, 52
DIM, NUM_HEADS, NUM_LAYERS, FFN_DIM = 512, 8, 4, 2048
TEXT_LEN, TEXT_DIM, Z_DIM = 512, 512, 16
VAE_DIMS = dict(base_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
PROMPT, NEGATIVE_PROMPT = "a cat surfing", "static, blurry"


def _perturb(module) -> None:  # noqa: ANN001
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name or name.endswith("bias") or "gamma" in name:
                param.add_(0.1 * torch.randn_like(param))


def build_pair(folder: Path):
    """(flashdreams pipeline, diffusers WanPipeline, scheduler factory) with the same weights."""
    import diffusers
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

    class WanGridUniPC(diffusers.UniPCMultistepScheduler):
        """diffusers' UniPC on Wan 2.1's sigma grid (``linspace(1 - 1/1000, 0, N + 1)[:-1]``)."""

        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            sigmas = np.linspace(1.0 - 1.0 / 1000, 0.0, num_inference_steps + 1)[:-1]
            super().set_timesteps(sigmas=sigmas, device=device)

    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=NUM_HEADS,
        attention_head_dim=DIM // NUM_HEADS,
        in_channels=Z_DIM,
        out_channels=Z_DIM,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=FFN_DIM,
        num_layers=NUM_LAYERS,
    ).eval()
    _perturb(transformer)
    transformer.save_pretrained(folder / "transformer")
    latents_mean = torch.randn(Z_DIM).mul(0.3).tolist()
    latents_std = torch.rand(Z_DIM).add(0.5).tolist()
    vae = diffusers.AutoencoderKLWan(
        z_dim=Z_DIM, latents_mean=latents_mean, latents_std=latents_std, **VAE_DIMS
    ).eval()
    _perturb(vae)
    vae.save_pretrained(folder / "vae")

    config = WanInferencePipelineConfig(
        name="bench",
        diffusion_model=DiffusionModelConfig(
            transformer=Wan21TransformerConfig(
                network=WanDiTNetworkConfig(
                    patch_size=(1, 2, 2),
                    text_len=TEXT_LEN,
                    in_dim=Z_DIM,
                    out_dim=Z_DIM,
                    dim=DIM,
                    ffn_dim=FFN_DIM,
                    freq_dim=256,
                    text_dim=TEXT_DIM,
                    num_heads=NUM_HEADS,
                    num_layers=NUM_LAYERS,
                ),
                dtype=torch.float32,
                checkpoint_path=str(folder / "transformer"),
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
            checkpoint_path=str(folder / "vae"),
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
        negative_prompt=NEGATIVE_PROMPT,
    )
    torch.manual_seed(1)
    ours = config.setup().eval()

    def make_scheduler():
        return WanGridUniPC(
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

    reference = diffusers.WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=make_scheduler(),
        transformer=transformer,
    )
    reference.set_progress_bar_config(disable=True)
    return ours, reference


def run(num_repeats: int = 3) -> dict[str, object]:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        ours, reference = build_pair(Path(tmp))

    def run_ours():
        # the pipeline's generator is per model; re-seed so every call draws the same noise
        ours.diffusion_model._rng = None
        cache = ours.initialize_cache(
            [PROMPT], height=LATENT_HEIGHT, width=LATENT_WIDTH, release_oneshot_encoders=False
        )
        return ours.generate(0, cache)

    with torch.no_grad():
        ours_video = (run_ours().float() + 1) / 2  # also builds the (lazy) text encoder
    prompt_embeds = ours.text_encoder([PROMPT])
    negative_embeds = ours.text_encoder([NEGATIVE_PROMPT])
    noise = torch.randn(
        (1, NUM_LATENT_FRAMES, Z_DIM, LATENT_HEIGHT, LATENT_WIDTH),
        generator=torch.Generator().manual_seed(SEED),
    )
    ratio = ours.decoder.spatial_compression_ratio
    num_frames = ours.decoder.get_output_temporal_size(0, NUM_LATENT_FRAMES)

    def run_reference():
        return reference(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            height=LATENT_HEIGHT * ratio,
            width=LATENT_WIDTH * ratio,
            num_frames=num_frames,
            num_inference_steps=NUM_STEPS,
            guidance_scale=GUIDANCE,
            latents=noise.permute(0, 2, 1, 3, 4).contiguous(),
            output_type="pt",
        ).frames

    with torch.no_grad():
        reference_video = run_reference()
        max_abs = (ours_video - reference_video).abs().max().item()
        samples = time_interleaved(
            {"diffusers WanPipeline": run_reference, "flashdreams": run_ours},
            num_repeats=num_repeats,
            num_warmup=0,
        )
    return {
        "samples": samples,
        "max_abs": max_abs,
        "video_shape": tuple(ours_video.shape),
        "reference_std": reference_video.std().item(),
    }


def format_result(result: dict[str, object]) -> str:
    samples: dict[str, list[float]] = result["samples"]  # type: ignore[assignment]
    medians = {name: statistics.median(values) for name, values in samples.items()}
    reference = medians["diffusers WanPipeline"]
    paired = [
        ours / ref
        for ours, ref in zip(samples["flashdreams"], samples["diffusers WanPipeline"], strict=True)
    ]
    lines = [
        f"DiT dim {DIM}, {NUM_HEADS} heads, {NUM_LAYERS} layers, FFN {FFN_DIM}, text "
        f"{TEXT_LEN}x{TEXT_DIM}; {NUM_LATENT_FRAMES} latent frames at {LATENT_HEIGHT}x"
        f"{LATENT_WIDTH} -> video {result['video_shape']}; UniPC {NUM_STEPS} steps, CFG "
        f"{GUIDANCE}; VAE {VAE_DIMS}; fp32",
        f"Parity: max abs difference of the [0, 1] videos {result['max_abs']:.2e} "
        f"(video std {result['reference_std']:.3f})",
        "",
        "| pipeline | median s | spread | / diffusers |",
        "|---|---|---|---|",
    ]
    for name, median in medians.items():
        lines.append(
            f"| {name} | {median:.2f} | {spread(samples[name])} | {median / reference:.3f} |"
        )
    lines += [
        "",
        f"**T2V end-to-end ratio (flashdreams / diffusers): {medians['flashdreams'] / reference:.3f}"
        f"** (target <= 0.9); median of per-round paired ratios {statistics.median(paired):.3f}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    args = parser.parse_args()
    setup_torch()
    text = format_result(run(num_repeats=args.repeats or 3))
    print(text)
    if args.record:
        record("Bidirectional T2V end to end vs diffusers", command_line(), text, label=args.label)


if __name__ == "__main__":
    main()
