"""Benchmarks 1 + 2: one Wan DiT forward, flashdreams vs diffusers, and its roofline fraction.

Both networks hold the same random weights: diffusers' ``WanTransformer3DModel`` is
``save_pretrained`` to a temporary folder and loaded into :class:`WanDiTNetwork`
through the diffusers-layout path (``load_checkpoint`` + ``wan_diffusers_state_dict_transform``
+ load-time fusions). Same input, CPU fp32, same thread count, timed round-robin.

Mid-size config: dim 512, 8 heads, 4 layers, FFN 2048, one chunk of 3 latent frames at
the 480p latent size 60x104 (patch 1x2x2 -> 3 x 30 x 52 = 4,680 tokens), 512 text tokens
of width 4096, batch 1.

Two flashdreams timings are reported:

* ``ours (from inputs)``: patchify, text embedding + cross-attention K/V, the forward and
  unpatchify: exactly the work diffusers' ``forward`` does, the headline ratio;
* ``ours (rollout step)``: the forward alone with the rollout cache already built (the
  text embedding and cross-attention K/V are computed once per rollout).

Roofline: matmul FLOPs of the forward (counted analytically, listed in the output)
divided by the median time, over the FLOP/s of one large square fp32 GEMM measured in
the same run.

    python bench/bench_dit.py [--record] [--repeats N] [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
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

GEMM_SIZE = 2048


@dataclass(frozen=True)
class MidSize:
    """The mid-size DiT shape of the CPU benchmarks."""

    dim: int = 512
    num_heads: int = 8
    num_layers: int = 4
    ffn_dim: int = 2048
    freq_dim: int = 256
    in_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    num_frames: int = 3
    latent_height: int = 60
    latent_width: int = 104

    @property
    def num_tokens(self) -> int:
        return self.num_frames * (self.latent_height // 2) * (self.latent_width // 2)


def network_config(shape: MidSize):
    from flashdreams.recipes.wan.transformer import WanDiTNetworkConfig

    return WanDiTNetworkConfig(
        patch_size=(1, 2, 2),
        text_len=shape.text_len,
        in_dim=shape.in_dim,
        out_dim=shape.in_dim,
        dim=shape.dim,
        ffn_dim=shape.ffn_dim,
        freq_dim=shape.freq_dim,
        text_dim=shape.text_dim,
        num_heads=shape.num_heads,
        num_layers=shape.num_layers,
    )


def build_diffusers_reference(shape: MidSize, folder: Path):
    """A seeded diffusers ``WanTransformer3DModel`` saved to ``folder`` (diffusers layout)."""
    import diffusers
    import torch

    torch.manual_seed(0)
    reference = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=shape.num_heads,
        attention_head_dim=shape.dim // shape.num_heads,
        in_channels=shape.in_dim,
        out_channels=shape.in_dim,
        text_dim=shape.text_dim,
        freq_dim=shape.freq_dim,
        ffn_dim=shape.ffn_dim,
        num_layers=shape.num_layers,
    ).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    reference.save_pretrained(folder)
    return reference


def load_ours_from_diffusers_folder(shape: MidSize, folder: Path):
    """:class:`WanDiTNetwork` loaded from a diffusers folder, with the load-time fusions applied."""
    from flashdreams.core.checkpoint import load_checkpoint, load_state_dict_into_module
    from flashdreams.recipes.wan.transformer import (
        WanDiTNetwork,
        wan_diffusers_state_dict_transform,
    )

    network = WanDiTNetwork(network_config(shape)).eval()
    state_dict = wan_diffusers_state_dict_transform(load_checkpoint(folder))
    load_state_dict_into_module(network, state_dict, strict=True, source="diffusers export")
    network.update_parameters_after_loading_checkpoint()
    return network


def forward_flops(shape: MidSize, *, include_context: bool) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one forward, by part.

    Elementwise work (norms, RoPE, softmax, modulation) is left out: it is O(L*C)
    against the O(L*C^2) and O(L^2*C) matmuls.
    """
    L, C, F = shape.num_tokens, shape.dim, shape.ffn_dim
    Lt = shape.text_len
    patch_features = shape.in_dim * 4
    per_layer = {
        "self-attn q,k,v,o projections": 2 * L * C * 4 * C,
        "self-attn scores + values (QK^T, PV)": 2 * 2 * L * L * C,
        "cross-attn q,o projections": 2 * L * C * 2 * C,
        "cross-attn scores + values": 2 * 2 * L * Lt * C,
        "FFN": 2 * 2 * L * C * F,
    }
    flops = {name: value * shape.num_layers for name, value in per_layer.items()}
    flops["patch embedding + head"] = 2 * L * patch_features * C * 2
    if include_context:
        flops["text embedding + cross-attn K,V (per layer)"] = (
            2 * Lt * shape.text_dim * C + 2 * Lt * C * C + shape.num_layers * 2 * Lt * C * 2 * C
        )
    return flops


def make_gemm(size: int = GEMM_SIZE):
    """A callable running one square fp32 ``size`` GEMM into a preallocated output."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    out = torch.empty(size, size)
    return lambda: torch.mm(a, b, out=out)


def run(num_repeats: int = 5, *, with_compile: bool = True) -> dict[str, object]:
    import torch

    from flashdreams.recipes.wan.transformer.impl.rope import WanRope

    shape = MidSize()
    with tempfile.TemporaryDirectory() as tmp:
        reference = build_diffusers_reference(shape, Path(tmp) / "dit")
        ours = load_ours_from_diffusers_folder(shape, Path(tmp) / "dit")

    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(
        1, shape.num_frames, shape.in_dim, shape.latent_height, shape.latent_width,
        generator=generator,
    )  # fmt: skip
    text = torch.randn(1, shape.text_len, shape.text_dim, generator=generator)
    timestep = torch.tensor([500.0])
    grid_h, grid_w = shape.latent_height // 2, shape.latent_width // 2
    rope_freqs = WanRope(
        head_dim=shape.dim // shape.num_heads, num_height_tokens=grid_h, num_width_tokens=grid_w
    ).chunk_freqs(0, shape.num_frames)
    latent_diffusers = latent.transpose(1, 2).contiguous()  # [B, C, T, H, W]

    def run_reference():
        return reference(
            hidden_states=latent_diffusers,
            timestep=timestep,
            encoder_hidden_states=text,
            return_dict=False,
        )[0]

    def build_cache():
        return ours.initialize_cache(
            chunk_size=shape.num_tokens, window_size=0, sink_size=0, text_embeddings=text
        )

    def run_ours_from_inputs():
        tokens = ours.patchify_and_maybe_split_cp(latent)
        out = ours(tokens, timestep, build_cache(), rope_freqs)
        return ours.unpatchify_and_maybe_gather_cp(grid_h, grid_w, out)

    prebuilt_cache = build_cache()
    prebuilt_tokens = ours.patchify_and_maybe_split_cp(latent)

    def run_ours_rollout_step():
        return ours(prebuilt_tokens, timestep, prebuilt_cache, rope_freqs)

    timed = {
        "diffusers": run_reference,
        "ours (from inputs)": run_ours_from_inputs,
        "ours (rollout step)": run_ours_rollout_step,
    }
    compile_seconds: dict[str, float] = {}
    if with_compile:
        # What ``compile_network_on_cpu`` does in the product (compiled blocks, KV-cache
        # attention entry eager), on a copy so the eager rows stay eager; diffusers'
        # model compiled whole.
        compiled_ours = copy.deepcopy(ours)
        compiled_ours.compile_blocks(dynamic=False)
        compiled_reference = torch.compile(reference, dynamic=False)

        def run_reference_compiled():
            return compiled_reference(
                hidden_states=latent_diffusers,
                timestep=timestep,
                encoder_hidden_states=text,
                return_dict=False,
            )[0]

        def run_ours_from_inputs_compiled():
            tokens = ours.patchify_and_maybe_split_cp(latent)
            out = compiled_ours(tokens, timestep, build_cache(), rope_freqs)
            return ours.unpatchify_and_maybe_gather_cp(grid_h, grid_w, out)

        def run_ours_rollout_step_compiled():
            return compiled_ours(prebuilt_tokens, timestep, prebuilt_cache, rope_freqs)

        timed |= {
            "diffusers, torch.compile": run_reference_compiled,
            "ours (from inputs), torch.compile": run_ours_from_inputs_compiled,
            "ours (rollout step), torch.compile": run_ours_rollout_step_compiled,
        }

    with torch.no_grad():
        max_abs = (run_ours_from_inputs() - run_reference().transpose(1, 2)).abs().max().item()
        if with_compile:
            for name, fn in (
                ("diffusers", run_reference_compiled),
                ("ours", run_ours_from_inputs_compiled),
            ):
                started = time.perf_counter()
                fn()  # the first call compiles
                compile_seconds[name] = time.perf_counter() - started
            compiled_diff = (
                (run_ours_from_inputs_compiled() - run_reference().transpose(1, 2))
                .abs()
                .max()
                .item()
            )
        samples = time_interleaved(timed | {"gemm": make_gemm()}, num_repeats=num_repeats)
    gemm_samples = samples.pop("gemm")
    gemm_rate = 2 * GEMM_SIZE**3 / statistics.median(gemm_samples)
    paired = [
        ours / ref
        for ours, ref in zip(samples["ours (from inputs)"], samples["diffusers"], strict=True)
    ]

    medians = {name: statistics.median(values) for name, values in samples.items()}
    flops_step = forward_flops(shape, include_context=False)
    flops_inputs = forward_flops(shape, include_context=True)
    total_inputs = sum(flops_inputs.values())
    total_step = sum(flops_step.values())
    rate_inputs = total_inputs / medians["ours (from inputs)"]
    rate_step = total_step / medians["ours (rollout step)"]
    rate_reference = total_inputs / medians["diffusers"]
    result: dict[str, object] = {
        "shape": shape,
        "max_abs_diff": max_abs,
        "samples": samples,
        "medians": medians,
        "ratio_from_inputs": medians["ours (from inputs)"] / medians["diffusers"],
        "paired_ratio": statistics.median(paired),
        "ratio_rollout_step": medians["ours (rollout step)"] / medians["diffusers"],
        "flops_inputs": flops_inputs,
        "gemm_rate": gemm_rate,
        "gemm_samples": gemm_samples,
        "roofline_from_inputs": rate_inputs / gemm_rate,
        "roofline_rollout_step": rate_step / gemm_rate,
        "roofline_diffusers": rate_reference / gemm_rate,
        "rate_inputs": rate_inputs,
        "rate_step": rate_step,
        "total_step": total_step,
        "compile_seconds": compile_seconds,
    }
    if with_compile:
        result["compiled_diff"] = compiled_diff
        result["ratio_compiled_vs_eager_reference"] = (
            medians["ours (from inputs), torch.compile"] / medians["diffusers"]
        )
        result["ratio_compiled_vs_compiled_reference"] = (
            medians["ours (from inputs), torch.compile"] / medians["diffusers, torch.compile"]
        )
    return result


def format_result(result: dict[str, object]) -> str:
    shape: MidSize = result["shape"]  # type: ignore[assignment]
    medians: dict[str, float] = result["medians"]  # type: ignore[assignment]
    samples: dict[str, list[float]] = result["samples"]  # type: ignore[assignment]
    flops: dict[str, float] = result["flops_inputs"]  # type: ignore[assignment]
    lines = [
        f"Shape: dim {shape.dim}, {shape.num_heads} heads, {shape.num_layers} layers, "
        f"FFN {shape.ffn_dim}, {shape.num_tokens} tokens ({shape.num_frames} latent frames at "
        f"{shape.latent_height}x{shape.latent_width}), text {shape.text_len}x{shape.text_dim}, "
        "batch 1, fp32",
        f"Parity: max abs diff ours vs diffusers = {result['max_abs_diff']:.2e}",
        "",
        "| forward | median s | spread (min..max) | / diffusers |",
        "|---|---|---|---|",
    ]
    for name, median in medians.items():
        lines.append(
            f"| {name} | {median:.3f} | {spread(samples[name])} | "
            f"{median / medians['diffusers']:.3f} |"
        )
    lines += [
        "",
        f"**DiT forward ratio (ours from inputs / diffusers): {result['ratio_from_inputs']:.3f}** "
        f"(target <= 0.9); median of per-round paired ratios {result['paired_ratio']:.3f}; "
        f"rollout step / diffusers: {result['ratio_rollout_step']:.3f}",
    ]
    if "compiled_diff" in result:
        seconds: dict[str, float] = result["compile_seconds"]  # type: ignore[assignment]
        lines += [
            "",
            "**With torch.compile (inductor, CPU; `compile_network_on_cpu`): ours (from inputs) / "
            f"diffusers eager {result['ratio_compiled_vs_eager_reference']:.3f}, / diffusers "
            f"compiled {result['ratio_compiled_vs_compiled_reference']:.3f}**; first-call compile "
            f"time ours {seconds['ours']:.0f} s, diffusers {seconds['diffusers']:.0f} s; max abs "
            f"diff compiled ours vs eager diffusers {result['compiled_diff']:.2e}",
        ]
    lines += [
        "",
        "FLOPs (matmuls only, 2 per multiply-add, counted analytically from the shapes):",
        "",
    ]
    for name, value in flops.items():
        lines.append(f"- {name}: {value / 1e9:.2f} GFLOP")
    lines += [
        f"- total (from inputs): {sum(flops.values()) / 1e9:.2f} GFLOP; rollout step "
        f"(no context part): {result['total_step'] / 1e9:.2f} GFLOP",
        "",
        f"Plain GEMM 2048x2048x2048 fp32 (interleaved with the forwards): {result['gemm_rate'] / 1e9:.1f} GFLOP/s "
        f"(spread {spread(result['gemm_samples'])})",  # type: ignore[arg-type]
        f"Achieved: ours from inputs {result['rate_inputs'] / 1e9:.1f} GFLOP/s, "
        f"rollout step {result['rate_step'] / 1e9:.1f} GFLOP/s",
        f"**Roofline fraction: ours from inputs {result['roofline_from_inputs']:.3f}, "
        f"rollout step {result['roofline_rollout_step']:.3f}** (target >= 0.6); diffusers "
        f"{result['roofline_diffusers']:.3f}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the torch.compile rows (~1 min of compiling)",
    )
    args = parser.parse_args()
    setup_torch()
    text = format_result(run(num_repeats=args.repeats or 5, with_compile=not args.no_compile))
    print(text)
    if args.record:
        record("DiT forward vs diffusers + roofline", command_line(), text, label=args.label)


if __name__ == "__main__":
    main()
