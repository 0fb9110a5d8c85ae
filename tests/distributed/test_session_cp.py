"""A session on 2 gloo ranks, with a ``recache`` LoRA swap and a ``recache`` prompt switch
requested on rank 0 only, equals the single-process session: the requests are broadcast to
rank 1 before the chunk (command_group) and both ranks apply them at the same boundary
(max abs <= 1e-5, fp32)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from flashdreams.infra.diffusion.model import DiffusionModelConfig
from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
from flashdreams.recipes.wan import (
    UMT5TextEncoderConfig,
    Wan21TransformerConfig,
    WanDiTNetworkTinyConfig,
    WanInferencePipelineConfig,
)
from flashdreams.recipes.wan.lora import LoRAConfig
from flashdreams.session import Session
from flashdreams.testing import run_on_ranks

TOL = 1e-5
HEIGHT, WIDTH = 2, 10  # 5 tokens per frame: padded on 2 ranks
NUM_CHUNKS, SWAP_AT, SWITCH_AFTER = 5, 2, 3


def pipeline_config() -> WanInferencePipelineConfig:
    transformer = Wan21TransformerConfig(
        network=WanDiTNetworkTinyConfig(text_dim=32),
        dtype=torch.float32,
        len_t=1,
        window_size_t=2,
        sink_size_t=1,
        guidance_scale=3.0,
        compile_network=False,
        use_cuda_graph=False,
    )
    text_encoder = UMT5TextEncoderConfig(
        checkpoint_path=None,
        tokenizer_path="builtin:bytes",
        text_len=32,
        dtype=torch.float32,
        model_dim=32,
        num_layers=1,
        num_heads=2,
        ffn_dim=64,
        vocab_size=300,
    )
    return WanInferencePipelineConfig(
        name="wan-tiny-session-cp",
        diffusion_model=DiffusionModelConfig(
            transformer=transformer,
            scheduler=FlowMatchSchedulerConfig(
                num_inference_steps=2, denoising_timesteps=[1000, 500]
            ),
            seed=1234,
            context_noise=100,
        ),
        text_encoder=text_encoder,
        negative_prompt="blurry",
    )


def save_lora(path) -> None:
    """A random rank-2 LoRA on self-attention q and the text path (cross-attention k)."""
    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for module in ("blocks.0.self_attn.q", "blocks.1.cross_attn.k"):
        tensors[f"diffusion_model.{module}.lora_down.weight"] = torch.randn(
            2, 32, generator=generator
        )
        tensors[f"diffusion_model.{module}.lora_up.weight"] = torch.randn(
            32, 2, generator=generator
        )
    save_file(tensors, str(path))


@torch.no_grad()
def run_session(is_commander: bool, lora_path, command_group=None) -> list[torch.Tensor | None]:
    torch.manual_seed(0)
    pipeline = pipeline_config().setup().eval()
    session = Session.open(
        pipeline,
        prompt="a red ball",
        height=HEIGHT,
        width=WIDTH,
        seed=7,
        command_group=command_group,
    )
    latents = []
    for index in range(NUM_CHUNKS):
        if index == SWAP_AT and is_commander:
            session.swap_loras([LoRAConfig(path=str(lora_path))])
        if index == SWITCH_AFTER and is_commander:
            session.switch_prompt("a blue cube", negative_prompt="dark")
        result = session.step()
        if index == SWAP_AT:
            assert [receipt.adapters for receipt in result.lora_swaps] == [["lora"]]
        if index == SWITCH_AFTER:
            assert [receipt.applied_at_chunk for receipt in result.switches] == [SWITCH_AFTER]
        latents.append(result.latent)
    return latents


def check_ranks(rank: int, world_size: int, reference: list[torch.Tensor], lora_path) -> None:
    latents = run_session(rank == 0, lora_path, command_group=dist.group.WORLD)
    if rank == 0:
        for index, (latent, expected) in enumerate(zip(latents, reference, strict=True)):
            error = (latent - expected).abs().max().item()
            assert error <= TOL, f"chunk {index}: max abs {error:.3e} > {TOL}"
    else:
        assert all(latent is None for latent in latents)


def test_session_swap_and_switch_on_two_ranks_equal_one_rank(tmp_path):
    lora_path = tmp_path / "lora.safetensors"
    save_lora(lora_path)
    reference = run_session(True, lora_path)
    run_on_ranks(check_ranks, 2, reference, lora_path)


@torch.no_grad()
def run_batched(is_commander: bool, command_group=None) -> list[list[torch.Tensor | None]]:
    """Two sessions over one pipeline, batched by the manager, with a recache switch in the
    second requested on rank 0 only."""
    from flashdreams.session import SessionManager

    torch.manual_seed(0)
    pipeline = pipeline_config().setup().eval()
    manager = SessionManager(pipeline, max_sessions=2)
    for prompt, seed in (("a red ball", 7), ("a green tree", 8)):
        manager.open(
            prompt=prompt, height=HEIGHT, width=WIDTH, seed=seed, command_group=command_group
        )
    latents: list[list[torch.Tensor | None]] = [[], []]
    for index in range(NUM_CHUNKS):
        if index == SWITCH_AFTER and is_commander:
            manager.get(1).switch_prompt("a blue cube")
        for session_id, result in manager.step().items():
            latents[session_id].append(result.latent)
    return latents


def check_batched_ranks(rank: int, world_size: int, reference) -> None:
    from flashdreams.session import manager as manager_module

    batched_steps = []
    step_batched = manager_module.step_batched

    def counting(streams):
        batched_steps.append(len(streams))
        return step_batched(streams)

    manager_module.step_batched = counting
    latents = run_batched(rank == 0, command_group=dist.group.WORLD)
    assert batched_steps == [2] * NUM_CHUNKS  # every chunk ran as one batch on every rank
    for session_latents, expected in zip(latents, reference, strict=True):
        for index, latent in enumerate(session_latents):
            if rank != 0:
                assert latent is None
                continue
            error = (latent - expected[index]).abs().max().item()
            assert error <= TOL, f"chunk {index}: max abs {error:.3e} > {TOL}"


def test_batched_sessions_with_a_switch_on_two_ranks_equal_one_rank():
    reference = run_batched(True)
    assert (reference[0][-1] - reference[1][-1]).abs().max() > 1e-3
    run_on_ranks(check_batched_ranks, 2, reference)
