"""Context parallel with LoRA adapters: 2 gloo ranks equal the single process (fp32, 1e-5).

The rollouts of ``test_wan_cp`` (sink + window, CFG, I2V stamp, context noise) with a
random LoRA on every linear layer of the network: fused (ring), at run time (Ulysses)
and on both experts of Wan 2.2.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file
from test_wan_cp import Case, compare_cases, network_config, rollout

from flashdreams.recipes.wan.lora import LoRAConfig
from flashdreams.recipes.wan.transformer import WanDiTNetwork
from flashdreams.testing import run_on_ranks


def _random_lora_on_every_linear(path) -> None:
    network = WanDiTNetwork(network_config(Case("shapes")))
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for name, module in network.named_modules():
        if isinstance(module, nn.Linear):
            tensors[f"{name}.lora_A.weight"] = torch.randn(
                2, module.in_features, generator=generator
            )
            up = 0.05 * torch.randn(module.out_features, 2, generator=generator)
            tensors[f"{name}.lora_B.weight"] = up
    save_file(tensors, str(path))


def test_cp_rollout_with_lora_equals_single_process(tmp_path):
    assert not dist.is_initialized()
    path = tmp_path / "lora.safetensors"
    _random_lora_on_every_linear(path)
    fused = {"loras": [LoRAConfig(path=str(path), strength=0.8)]}
    runtime = {"loras": [LoRAConfig(path=str(path), strength=0.8, fused=False)]}
    cases = [
        Case("ring-lora", extra=fused),
        Case("ulysses-lora-runtime", cp_method="ulysses", extra=runtime),
        Case("wan22-ring-lora", wan22=True, extra=fused),
    ]
    references = {case.name: rollout(case) for case in cases}
    without_lora = rollout(Case("ring"))
    assert (references["ring-lora"][-1] - without_lora[-1]).abs().max() > 1e-2
    assert (references["ring-lora"][-1] - references["ulysses-lora-runtime"][-1]).abs().max() < 1e-4
    run_on_ranks(compare_cases, 2, cases, references)
