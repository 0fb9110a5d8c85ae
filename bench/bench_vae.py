"""Wan VAE decode and encode, flashdreams vs diffusers' AutoencoderKLWan (CPU, fp32).

Both hold the same random weights: diffusers' model is ``save_pretrained`` to a
temporary folder and loaded through flashdreams' diffusers-layout loader. Same latent
(decode) and the same video (encode), timed round-robin, outputs compared first.

Size: the Wan 2.1 layout at reduced width (base dim 32, stage multipliers 1/2/4/4, 2
residual blocks per stage), 3 latent frames at 30x52 <-> 9 video frames at 240x416.
flashdreams decodes/encodes the whole clip in one call (its streaming cache still
runs frame by frame inside, as diffusers does).

This is the decoder of the end-to-end benchmark (bench_e2e.py) at twice its width; it
shows where the end-to-end gain comes from (CPU fast path: oneDNN convolutions on
channels-last activations, see flashdreams/recipes/wan/autoencoder/layers.py).

    python bench/bench_vae.py [--record] [--repeats N]
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

Z_DIM, BASE_DIM, NUM_RES_BLOCKS = 16, 32, 2
DIM_MULT = (1, 2, 4, 4)
NUM_LATENT_FRAMES, LATENT_HEIGHT, LATENT_WIDTH = 3, 30, 52


def build_pair(folder: Path):
    """(diffusers AutoencoderKLWan, our encoder, our decoder) with the same random weights."""
    import diffusers
    import torch

    from flashdreams.recipes.wan.autoencoder import (
        WanVAEDecoderConfig,
        WanVAEEncoderConfig,
        wan21_diffusers_vae_state_dict_transform,
    )

    torch.manual_seed(0)
    mean = torch.randn(Z_DIM).mul(0.3).tolist()
    std = torch.rand(Z_DIM).add(0.5).tolist()
    reference = diffusers.AutoencoderKLWan(
        base_dim=BASE_DIM,
        z_dim=Z_DIM,
        dim_mult=list(DIM_MULT),
        num_res_blocks=NUM_RES_BLOCKS,
        latents_mean=mean,
        latents_std=std,
    ).eval()
    with torch.no_grad():  # move norms and biases off their defaults
        for name, param in reference.named_parameters():
            if name.endswith("gamma") or name.endswith("bias"):
                param.add_(0.2 * torch.randn_like(param))
    reference.save_pretrained(folder)
    common = dict(
        checkpoint_path=str(folder),
        dtype=torch.float32,
        use_cuda_graph=False,
        base_dim=BASE_DIM,
        z_dim=Z_DIM,
        dim_mult=DIM_MULT,
        num_res_blocks=NUM_RES_BLOCKS,
        latent_mean=tuple(mean),
        latent_std=tuple(std),
        state_dict_transform=wan21_diffusers_vae_state_dict_transform,
    )
    encoder = WanVAEEncoderConfig(**common).setup().eval()
    decoder = WanVAEDecoderConfig(**common).setup().eval()
    stats = (torch.tensor(mean).view(1, -1, 1, 1, 1), torch.tensor(std).view(1, -1, 1, 1, 1))
    return reference, encoder, decoder, stats


def run(num_repeats: int = 3) -> dict[str, object]:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        reference, encoder, decoder, (mean, std) = build_pair(Path(tmp))
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(
        1, NUM_LATENT_FRAMES, Z_DIM, LATENT_HEIGHT, LATENT_WIDTH, generator=generator
    )
    num_frames = decoder.get_output_temporal_size(0, NUM_LATENT_FRAMES)
    ratio = decoder.spatial_compression_ratio
    video = (
        torch.rand(
            1, num_frames, 3, LATENT_HEIGHT * ratio, LATENT_WIDTH * ratio, generator=generator
        )
        .mul(2)
        .sub(1)
    )

    def decode_ours():
        return decoder(latent)

    def decode_reference():
        # [B, T, C, h, w] -> diffusers' [B, C, T, h, w], de-normalised as our decoder does
        return reference.decode(latent.transpose(1, 2) * std + mean).sample.transpose(1, 2)

    def encode_ours():
        return encoder(video)

    def encode_reference():
        mu = reference.encode(video.transpose(1, 2)).latent_dist.mean
        return ((mu - mean) / std).transpose(1, 2)

    with torch.no_grad():
        decode_diff = (decode_ours() - decode_reference()).abs().max().item()
        encode_diff = (encode_ours() - encode_reference()).abs().max().item()
        samples = time_interleaved(
            {
                "diffusers decode": decode_reference,
                "flashdreams decode": decode_ours,
                "diffusers encode": encode_reference,
                "flashdreams encode": encode_ours,
            },
            num_repeats=num_repeats,
        )
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "samples": samples,
        "medians": medians,
        "decode_diff": decode_diff,
        "encode_diff": encode_diff,
        "video_shape": tuple(video.shape),
        "decode_ratio": medians["flashdreams decode"] / medians["diffusers decode"],
        "encode_ratio": medians["flashdreams encode"] / medians["diffusers encode"],
    }


def format_result(result: dict[str, object]) -> str:
    samples: dict[str, list[float]] = result["samples"]  # type: ignore[assignment]
    medians: dict[str, float] = result["medians"]  # type: ignore[assignment]
    lines = [
        f"Wan 2.1 VAE layout, base dim {BASE_DIM}, dim_mult {list(DIM_MULT)}, "
        f"{NUM_RES_BLOCKS} res blocks; latent (1, {NUM_LATENT_FRAMES}, {Z_DIM}, {LATENT_HEIGHT}, "
        f"{LATENT_WIDTH}) <-> video {result['video_shape']}; fp32",
        f"Parity: decode max abs {result['decode_diff']:.2e}, encode max abs "
        f"{result['encode_diff']:.2e}",
        "",
        "| call | median s | spread | / diffusers |",
        "|---|---|---|---|",
    ]
    for name, median in medians.items():
        base = medians["diffusers " + name.split()[-1]]
        lines.append(f"| {name} | {median:.3f} | {spread(samples[name])} | {median / base:.3f} |")
    lines += [
        "",
        f"**VAE decode ratio (flashdreams / diffusers): {result['decode_ratio']:.3f}**; "
        f"encode ratio {result['encode_ratio']:.3f}",
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
        record("Wan VAE decode / encode vs diffusers", command_line(), text, label=args.label)


if __name__ == "__main__":
    main()
