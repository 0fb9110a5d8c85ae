"""LoRA adapters: the cost of a swap / re-weight and of a forward, fused vs run-time.

Mid-size Wan DiT (dim 512, 8 heads, 4 layers, FFN 2048, fused QKV), CPU fp32, two random
rank-16 adapters (A, B) on every linear layer of the blocks (self / cross attention q, k, v,
o and the FFN), read once with ``load_lora`` (no file I/O is timed). Timed round-robin:

* swap: ``loras.replace([B])`` then ``loras.replace([A])``, fused (every touched weight
  recomputed from its saved original) vs run-time (only the adapters' small matrices);
* re-weight: ``loras.set_strength`` between two values, fused vs run-time;
* forward: one chunk (1 latent frame at 60x104 -> 1,560 tokens, 512 text tokens of width
  4096) with no adapter, A fused and A at run time.

    python bench/bench_lora.py [--record] [--repeats N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

RANK = 16


def _adapter_file(network, path: Path, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for index, block in enumerate(network.blocks):
        for name, shape in (
            ("self_attn.q", block.self_attn.o.weight.shape),
            ("self_attn.k", block.self_attn.o.weight.shape),
            ("self_attn.v", block.self_attn.o.weight.shape),
            ("self_attn.o", block.self_attn.o.weight.shape),
            ("cross_attn.q", block.cross_attn.q.weight.shape),
            ("cross_attn.k", block.cross_attn.k.weight.shape),
            ("cross_attn.v", block.cross_attn.v.weight.shape),
            ("cross_attn.o", block.cross_attn.o.weight.shape),
            ("ffn.0", block.ffn[0].weight.shape),
            ("ffn.2", block.ffn[2].weight.shape),
        ):
            key = f"diffusion_model.blocks.{index}.{name}"
            out_features, in_features = shape
            tensors[f"{key}.lora_down.weight"] = torch.randn(RANK, in_features, generator=generator)
            up = 0.01 * torch.randn(out_features, RANK, generator=generator)
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(RANK))
    save_file(tensors, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    args = parser.parse_args()
    common.setup_torch()
    import torch

    from flashdreams.recipes.wan.lora import WanLoRAs, load_lora
    from flashdreams.recipes.wan.transformer import WanDiTNetwork, WanDiTNetworkConfig
    from flashdreams.recipes.wan.transformer.impl.rope import WanRope

    torch.manual_seed(0)
    config = WanDiTNetworkConfig(dim=512, num_heads=8, num_layers=4, ffn_dim=2048)
    base = WanDiTNetwork(config).eval()
    base.update_parameters_after_loading_checkpoint()
    networks = {mode: copy.deepcopy(base) for mode in ("none", "fused", "runtime")}
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / f"{name}.safetensors" for name in ("a", "b")]
        for seed, path in enumerate(paths):
            _adapter_file(networks["none"], path, seed)
        adapter_a, adapter_b = (load_lora(path) for path in paths)
    loras = {mode: WanLoRAs(networks[mode]) for mode in ("fused", "runtime")}
    for mode, each in loras.items():
        each.add(adapter_a, fused=mode == "fused")

    def swap(mode: str):
        fused = mode == "fused"

        def run() -> None:
            loras[mode].replace([adapter_b], fused=fused)
            loras[mode].replace([adapter_a], fused=fused)

        return run

    def reweight(mode: str):
        def run() -> None:
            loras[mode].set_strength("a", 0.5)
            loras[mode].set_strength("a", 1.0)

        return run

    repeats = args.repeats or 7
    swaps = common.time_interleaved(
        {f"swap, {mode}": swap(mode) for mode in loras}
        | {f"re-weight, {mode}": reweight(mode) for mode in loras},
        num_repeats=repeats,
    )
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 1, 16, 60, 104, generator=generator)
    text = torch.randn(1, 512, 4096, generator=generator)
    rope = WanRope(head_dim=config.head_dim, num_height_tokens=30, num_width_tokens=52)
    freqs = rope.chunk_freqs(0, 1)

    def forward(network):
        tokens = network.patchify_and_maybe_split_cp(latent)
        cache = network.initialize_cache(
            chunk_size=tokens.shape[1], window_size=0, sink_size=0, text_embeddings=text
        )
        return lambda: network(tokens, torch.tensor([500.0]), cache, freqs)

    forwards = common.time_interleaved(
        {f"forward, {mode}": forward(network) for mode, network in networks.items()},
        num_repeats=repeats,
    )
    fused_out, runtime_out = (forward(networks[mode])() for mode in ("fused", "runtime"))
    error = (fused_out - runtime_out).abs().max().item()

    lines = [
        f"Shape: dim 512, 8 heads, 4 layers, FFN 2048, rank {RANK} on every block linear "
        f"(10 per block); forward 1,560 tokens, text 512x4096, fp32; {repeats} rounds",
        "",
        "| operation | median ms | spread (min..max) |",
        "|---|---|---|",
    ]
    medians = {}
    for name, samples in (swaps | forwards).items():
        per_call = 2 if not name.startswith("forward") else 1  # swap / re-weight run twice
        medians[name] = statistics.median(samples) / per_call * 1e3
        lines.append(f"| {name} | {medians[name]:.2f} | {common.spread(samples)} |")
    lines += [
        "",
        f"**Swap A -> B: fused / run-time = {medians['swap, fused'] / medians['swap, runtime']:.1f}x**; "
        f"re-weight: fused / run-time = "
        f"{medians['re-weight, fused'] / medians['re-weight, runtime']:.1f}x",
        f"**Forward: run-time / no adapter = "
        f"{medians['forward, runtime'] / medians['forward, none']:.3f}**, fused / no adapter = "
        f"{medians['forward, fused'] / medians['forward, none']:.3f}",
        f"Max abs diff fused vs run-time output: {error:.2e}",
    ]
    body = "\n".join(lines)
    print(body)
    if args.record:
        common.record(
            "LoRA adapters: swap and forward, fused vs run-time",
            common.command_line(),
            body,
            label=args.label,
        )


if __name__ == "__main__":
    main()
