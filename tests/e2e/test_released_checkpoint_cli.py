"""flashdreams-run with a checkpoint laid out as a release lays it out (Self-Forcing training file)."""

from __future__ import annotations

import torch
from e2e_helpers import run_cli
from safetensors.torch import load_file

from flashdreams.recipes.wan.transformer import WanDiTNetwork, WanDiTNetworkTinyConfig


def _write_self_forcing_file(path, seed: int) -> None:
    """``{generator, critic, generator_ema}``, each ``{"model.<wan key>": tensor}``, as trained."""
    nested = {}
    for offset, name in enumerate(("generator", "critic", "generator_ema")):
        torch.manual_seed(seed + offset)
        network = WanDiTNetwork(WanDiTNetworkTinyConfig())
        nested[name] = {f"model.{k}": v.clone() for k, v in network.state_dict().items()}
    torch.save(nested, path)


def test_self_forcing_tiny_runs_a_nested_training_checkpoint(tmp_path):
    latents = []
    for seed in (10, 20):
        checkpoint = tmp_path / f"self_forcing_dmd_{seed}.pt"
        _write_self_forcing_file(checkpoint, seed)
        result = run_cli(
            [
                "self-forcing-tiny",
                "runner.height=32",
                "runner.width=32",
                "runner.save_latents=true",
                f"runner.output_dir=run_{seed}",
                f"pipeline.diffusion_model.transformer.checkpoint_path={checkpoint}",
            ],
            tmp_path,
        )
        assert result.returncode == 0, result.stderr
        assert (tmp_path / f"run_{seed}" / "video.mp4").stat().st_size > 0
        latents.append(load_file(str(tmp_path / f"run_{seed}" / "latents.safetensors"))["latents"])
    # the weights come from the file: two files, two different videos from the same seed
    assert (latents[0] - latents[1]).abs().max() > 1e-3
