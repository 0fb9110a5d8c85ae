"""Wan21Transformer / Wan22Transformer: layout, CFG, I2V, checkpoints, long rollouts, errors."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from loguru import logger
from safetensors.torch import save_file

from flashdreams.infra.diffusion.model import DiffusionModelConfig
from flashdreams.infra.diffusion.scheduler.fm import FlowMatchSchedulerConfig
from flashdreams.recipes.wan.transformer import (
    I2VCtrl,
    Wan21Transformer,
    Wan21TransformerConfig,
    Wan22Transformer,
    Wan22TransformerConfig,
    WanDiTNetworkTinyConfig,
    wan_diffusers_state_dict_transform,
)
from flashdreams.recipes.wan.transformer.checkpoint import WAN_DIFFUSERS_KEY_PATTERNS
from flashdreams.recipes.wan.transformer.cuda_graph import CUDAGraphWrapper


def _config(**overrides) -> Wan21TransformerConfig:
    network = overrides.pop("network", WanDiTNetworkTinyConfig())
    kwargs = dict(
        network=network,
        dtype=torch.float32,
        len_t=2,
        window_size_t=4,
        compile_network=False,
        use_cuda_graph=False,
    )
    kwargs.update(overrides)
    return Wan21TransformerConfig(**kwargs)


def _transformer(seed: int = 0, **overrides) -> Wan21Transformer:
    torch.manual_seed(seed)
    return _config(**overrides).setup().eval()


def _text(seed: int, batch=(1,), tokens=6, width=32) -> torch.Tensor:
    return torch.randn(*batch, tokens, width, generator=torch.Generator().manual_seed(seed))


def test_latent_shape_and_unpatchify():
    transformer = _transformer(batch_shape=(2,))
    transformer.initialize_autoregressive_cache(height=4, width=6, text_embeddings=_text(0, (2,)))
    # L = len_t * H * W / (1 * 2 * 2) = 2 * 4 * 6 / 4, D = 16 * 4
    assert transformer.latent_shape == (2, 12, 64)
    latent = torch.randn(2, 2, 16, 4, 6)
    tokens = transformer.patchify_and_maybe_split_cp(latent)
    assert tokens.shape == transformer.latent_shape
    assert torch.equal(transformer.unpatchify_and_maybe_gather_cp(tokens), latent)


def test_sample_noise_in_unpatchified_shape():
    transformer = _transformer()
    transformer.initialize_autoregressive_cache(height=4, width=4, text_embeddings=_text(0))
    noise = transformer.sample_noise(
        torch.Generator().manual_seed(3),
        device=torch.device("cpu"),
        dtype=torch.float32,
        in_unpatchified_shape=True,
    )
    raw = torch.randn(1, 2, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(noise, transformer.patchify_and_maybe_split_cp(raw))
    assert noise.shape == transformer.latent_shape


def test_height_width_must_be_divisible_by_patch():
    transformer = _transformer()
    with pytest.raises(
        ValueError,
        match=r"latent height/width \(5, 4\) must be positive and divisible by the patch size \(kh, kw\) = \(2, 2\)",
    ):
        transformer.initialize_autoregressive_cache(height=5, width=4, text_embeddings=_text(0))


def test_embedding_errors():
    transformer = _transformer()
    with pytest.raises(
        ValueError, match="text embeddings have width 16, but the network expects text_dim=32"
    ):
        transformer.initialize_autoregressive_cache(
            height=4, width=4, text_embeddings=_text(0, width=16)
        )
    with pytest.raises(
        ValueError, match=r"text_embeddings must have shape \[\*batch_shape, tokens, width\]"
    ):
        transformer.initialize_autoregressive_cache(
            height=4, width=4, text_embeddings=_text(0, (2,))
        )


def test_cfg_requires_and_forbids_negative_embeddings():
    with pytest.raises(
        ValueError, match="guidance_scale=3.0 > 1 enables CFG, which needs negative_text_embeddings"
    ):
        _transformer(guidance_scale=3.0).initialize_autoregressive_cache(
            height=4, width=4, text_embeddings=_text(0)
        )
    with pytest.raises(
        ValueError, match="negative_text_embeddings were given but guidance_scale=1.0 disables CFG"
    ):
        _transformer().initialize_autoregressive_cache(
            height=4, width=4, text_embeddings=_text(0), negative_text_embeddings=_text(1)
        )


@torch.no_grad()
def test_cfg_equals_uncond_plus_scale_times_difference():
    scale = 3.5
    guided = _transformer(guidance_scale=scale)
    plain = _transformer()
    plain.load_state_dict(guided.state_dict())
    cond_text, neg_text = _text(0), _text(1, tokens=4)
    cache = guided.initialize_autoregressive_cache(
        height=4, width=4, text_embeddings=cond_text, negative_text_embeddings=neg_text
    )
    assert cache.network_cache_uncond is not None
    cond_cache = plain.initialize_autoregressive_cache(height=4, width=4, text_embeddings=cond_text)
    uncond_cache = plain.initialize_autoregressive_cache(
        height=4, width=4, text_embeddings=neg_text
    )
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):  # through the KV cache as well
        x = torch.randn(guided.latent_shape, generator=generator)
        flow = guided.predict_flow(x, torch.tensor(500.0), cache)
        cond = plain.predict_flow(x, torch.tensor(500.0), cond_cache)
        uncond = plain.predict_flow(x, torch.tensor(500.0), uncond_cache)
        torch.testing.assert_close(flow, uncond + scale * (cond - uncond), rtol=0, atol=1e-5)
        guided.finalize_kv_cache(x, torch.tensor(0.0), cache)
        plain.finalize_kv_cache(x, torch.tensor(0.0), cond_cache)
        plain.finalize_kv_cache(x, torch.tensor(0.0), uncond_cache)
    assert cache.network_cache_uncond.chunk_index == 3


@torch.no_grad()
def test_200_chunk_rollout_keeps_cache_storage_constant():
    transformer = _transformer(len_t=1, window_size_t=3, sink_size_t=1)
    # 1 latent frame of 2x2 -> 1 token per chunk
    cache = transformer.initialize_autoregressive_cache(height=2, width=2, text_embeddings=_text(0))
    blocks = cache.network_cache.blocks
    addresses = [block.self_kv.k.data_ptr() for block in blocks]
    # [B, sink + window + chunk, H, D] for k and v, fp32, plus a bool per slot, per block
    expected_bytes = 2 * (2 * 1 * (1 + 3 + 1) * 2 * 16 * 4 + (1 + 3 + 1))
    sizes = []
    generator = torch.Generator().manual_seed(0)
    for index in range(200):
        cache.start(index)
        x = torch.randn(transformer.latent_shape, generator=generator)
        transformer.predict_flow(x, torch.tensor(800.0), cache)
        transformer.finalize_kv_cache(x, torch.tensor(0.0), cache)
        sizes.append(cache.network_cache.self_attention_storage_bytes())
    assert set(sizes) == {expected_bytes}
    assert [block.self_kv.k.data_ptr() for block in blocks] == addresses
    assert cache.chunk_index == 200
    assert all(block.self_kv.num_filled == 4 for block in blocks)


@torch.no_grad()
def test_per_token_and_scalar_timesteps():
    transformer = _transformer()
    cache = transformer.initialize_autoregressive_cache(height=4, width=4, text_embeddings=_text(0))
    x = torch.randn(transformer.latent_shape)
    scalar = transformer.predict_flow(x, torch.tensor(300.0), cache)
    per_token = transformer.predict_flow(x, torch.full((1, x.shape[1]), 300.0), cache)
    torch.testing.assert_close(per_token, scalar, rtol=0, atol=1e-6)


def _i2v_ctrl(transformer: Wan21Transformer, mask_channels: int) -> I2VCtrl:
    generator = torch.Generator().manual_seed(4)
    latent = torch.randn(1, 2, 16, 4, 4, generator=generator)
    mask = torch.zeros(1, 2, mask_channels, 4, 4)
    mask[:, 0] = 1.0  # first latent frame known
    latent[:, 1] = 0.0
    return transformer.patchify_and_maybe_split_cp(I2VCtrl(latent=latent, mask=mask))


@torch.no_grad()
def test_stamp_then_concat_compose():
    network = WanDiTNetworkTinyConfig(in_dim=16 + 4 + 16)
    both = _transformer(network=network, stamp_image_latent=True, concat_image_mask_to_latent=True)
    concat_only = _transformer(network=network, concat_image_mask_to_latent=True)
    concat_only.load_state_dict(both.state_dict())
    cache_a = both.initialize_autoregressive_cache(height=4, width=4, text_embeddings=_text(0))
    cache_b = concat_only.initialize_autoregressive_cache(
        height=4, width=4, text_embeddings=_text(0)
    )
    ctrl = _i2v_ctrl(both, 4)
    x = torch.randn(both.latent_shape)
    known = ctrl.mask[..., :4].amax(-1, keepdim=True).expand_as(x) > 0  # first frame tokens
    stamped_by_hand = torch.where(known, ctrl.latent, x)
    flow = both.predict_flow(x, torch.tensor(400.0), cache_a, ctrl)
    expected = concat_only.predict_flow(stamped_by_hand, torch.tensor(400.0), cache_b, ctrl)
    torch.testing.assert_close(flow, expected, rtol=0, atol=1e-6)
    # postprocess re-stamps x0 at the known positions, leaves the rest
    clean = torch.randn(both.latent_shape)
    post = both.postprocess_clean_latent(clean, cache_a, ctrl)
    assert torch.equal(post[known], ctrl.latent[known]) and torch.equal(post[~known], clean[~known])
    assert torch.equal(concat_only.postprocess_clean_latent(clean, cache_b, ctrl), clean)
    with pytest.raises(ValueError, match="concat_image_mask_to_latent=True needs an I2VCtrl input"):
        concat_only.predict_flow(x, torch.tensor(400.0), cache_b)


@torch.no_grad()
def test_ti2v_first_frame_per_token_timestep_only_at_ar0():
    transformer = _transformer(
        stamp_image_latent=True,
        ti2v_first_frame_per_token_timestep=True,
        first_frame_timestep_value=14.0,
    )
    plain = _transformer(stamp_image_latent=True)
    plain.load_state_dict(transformer.state_dict())
    cache = transformer.initialize_autoregressive_cache(height=4, width=4, text_embeddings=_text(0))
    plain_cache = plain.initialize_autoregressive_cache(height=4, width=4, text_embeddings=_text(0))
    ctrl = _i2v_ctrl(transformer, 1)
    x = torch.randn(transformer.latent_shape)
    t_tokens = torch.full((1, x.shape[1]), 600.0)
    t_tokens[:, :4] = 14.0  # first frame: 2x2 tokens
    flow = transformer.predict_flow(x, torch.tensor(600.0), cache, ctrl)
    torch.testing.assert_close(
        flow, plain.predict_flow(x, t_tokens, plain_cache, ctrl), rtol=0, atol=1e-6
    )
    # the context-noise pass of AR 0 goes through predict_flow's rewrite too
    transformer.finalize_kv_cache(x, torch.tensor(0.0), cache, ctrl)
    t_context = torch.zeros(1, x.shape[1])
    t_context[:, :4] = 14.0
    plain.finalize_kv_cache(x, t_context, plain_cache, ctrl)
    # AR 1: back to the scalar timestep
    flow = transformer.predict_flow(x, torch.tensor(600.0), cache, ctrl)
    torch.testing.assert_close(
        flow, plain.predict_flow(x, torch.tensor(600.0), plain_cache, ctrl), rtol=0, atol=1e-6
    )


@torch.no_grad()
def test_checkpoint_original_and_diffusers_layouts(tmp_path):
    source = _transformer(seed=1)
    original_sd = WanSource.unfused_state_dict(source)
    save_file(original_sd, str(tmp_path / "wan.safetensors"))
    loaded = _transformer(seed=2, checkpoint_path=str(tmp_path / "wan.safetensors"))
    # the diffusers names: invert the remap on the original names
    diffusers_sd = WanSource.to_diffusers(original_sd)
    assert set(wan_diffusers_state_dict_transform(diffusers_sd)) == set(original_sd)
    save_file(diffusers_sd, str(tmp_path / "diffusers.safetensors"))
    from_diffusers = _transformer(
        seed=3,
        checkpoint_path=str(tmp_path / "diffusers.safetensors"),
        state_dict_transform=wan_diffusers_state_dict_transform,
    )
    x = torch.randn(1, 8, 64)
    outputs = []
    for model in (source, loaded, from_diffusers):
        cache = model.initialize_autoregressive_cache(height=4, width=4, text_embeddings=_text(0))
        outputs.append(model.predict_flow(x, torch.tensor(100.0), cache))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    torch.testing.assert_close(outputs[2], outputs[0], rtol=0, atol=0)


def test_checkpoint_missing_and_unexpected_keys(tmp_path):
    state = WanSource.unfused_state_dict(_transformer())
    del state["head.head.bias"]
    state["blocks.0.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(
        KeyError,
        match=r"missing keys \(1\): head.head.bias; unexpected keys \(1\): blocks.0.extra.weight",
    ):
        _transformer(checkpoint_path=str(tmp_path / "bad.safetensors"))


def test_checkpoint_pth_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "meta": _Opaque()}, str(path))
    with pytest.raises(
        ValueError, match="refusing to load .*contains pickled objects other than tensors"
    ):
        _transformer(checkpoint_path=str(path))


def test_remote_checkpoint_is_not_downloaded():
    with pytest.raises(
        FileNotFoundError, match="is a remote address and this stack never downloads weights"
    ):
        _transformer(checkpoint_path="https://huggingface.co/x/y/model.safetensors")


def test_cpu_logs_once_that_compile_and_cuda_graph_are_skipped():
    transformer = _transformer(compile_network=True, use_cuda_graph=True)
    messages = []
    sink_id = logger.add(messages.append, format="{message}")
    try:
        cache = transformer.initialize_autoregressive_cache(
            height=2, width=2, text_embeddings=_text(0)
        )
        x = torch.randn(transformer.latent_shape)
        with torch.no_grad():
            for _ in range(3):
                transformer.predict_flow(x, torch.tensor(1.0), cache)
    finally:
        logger.remove(sink_id)
    skipped = [m for m in messages if "skipped on cpu" in m]
    assert len(skipped) == 1 and "compile_network=True" in skipped[0]


def test_config_validation():
    with pytest.raises(ValueError, match="guidance_scale must be >= 1.0"):
        _config(guidance_scale=0.5)
    with pytest.raises(ValueError, match="len_t must be positive, got 0"):
        _config(len_t=0)
    with pytest.raises(
        ValueError, match="window_size_t=3 is not divisible by the temporal patch size 2"
    ):
        _config(network=WanDiTNetworkTinyConfig(patch_size=(2, 2, 2)), window_size_t=3)


@torch.no_grad()
def test_diffusion_model_rollout_runs():
    config = DiffusionModelConfig(
        transformer=_config(),
        scheduler=FlowMatchSchedulerConfig(num_inference_steps=2, denoising_timesteps=[1000, 500]),
        seed=0,
    )
    model = config.setup()
    cache = model.transformer.initialize_autoregressive_cache(
        height=4, width=4, text_embeddings=_text(0)
    )
    for index in range(3):
        clean, final_state = model.generate(index, cache)
        assert clean.shape == (1, 2, 16, 4, 4) and torch.isfinite(clean).all()
        model.finalize(final_state)
    assert cache.chunk_index == 3


# ------------------------------------------------------------------ Wan 2.2
def _wan22(**overrides) -> Wan22Transformer:
    torch.manual_seed(0)
    return Wan22TransformerConfig(
        transformer_high_noise=_config(), transformer_low_noise=_config(), **overrides
    ).setup()


@torch.no_grad()
def test_wan22_dispatch_at_boundary_and_both_caches_advance():
    """Upstream Wan 2.2 runs the high-noise expert for t >= boundary (875 with the defaults)."""
    transformer = _wan22()
    cache = transformer.initialize_autoregressive_cache(height=4, width=4, text_embeddings=_text(0))
    x = torch.randn(transformer.latent_shape)
    high_cache = transformer.transformer_high_noise.initialize_autoregressive_cache(
        height=4, width=4, text_embeddings=_text(0)
    )
    low_cache = transformer.transformer_low_noise.initialize_autoregressive_cache(
        height=4, width=4, text_embeddings=_text(0)
    )
    at, below = torch.tensor(875.0), torch.tensor(874.5)
    assert transformer.select_branch(torch.tensor(875.5)) == "high_noise"
    assert transformer.select_branch(at) == "high_noise"
    assert transformer.select_branch(below) == "low_noise"
    torch.testing.assert_close(
        transformer.predict_flow(x, at, cache),
        transformer.transformer_high_noise.predict_flow(x, at, high_cache),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        transformer.predict_flow(x, below, cache),
        transformer.transformer_low_noise.predict_flow(x, below, low_cache),
        rtol=0,
        atol=0,
    )
    assert (
        transformer.predict_flow(x, at, cache) - transformer.predict_flow(x, below, cache)
    ).abs().max() > 1e-3
    transformer.finalize_kv_cache(x, torch.tensor(0.0), cache)
    assert cache.high_noise.chunk_index == 1 and cache.low_noise.chunk_index == 1


def test_wan22_config_checks():
    with pytest.raises(
        ValueError, match="Wan 2.2 branches disagree on len_t: high-noise 2 vs low-noise 4"
    ):
        Wan22TransformerConfig(
            transformer_high_noise=_config(), transformer_low_noise=_config(len_t=4)
        )
    with pytest.raises(ValueError, match="Wan22Transformer does not support CFG"):
        Wan22TransformerConfig(
            transformer_high_noise=_config(guidance_scale=2.0),
            transformer_low_noise=_config(guidance_scale=2.0),
        )
    with pytest.raises(ValueError, match="Wan22Transformer does not support I2V"):
        Wan22TransformerConfig(
            transformer_high_noise=_config(stamp_image_latent=True),
            transformer_low_noise=_config(stamp_image_latent=True),
        )


# ------------------------------------------------------------------ helpers
class _Opaque:
    """A non-tensor object: pickling it makes a checkpoint unsafe to load."""


class WanSource:
    """Build state dicts in the original Wan / diffusers layouts from a (fused) transformer."""

    @staticmethod
    def unfused_state_dict(transformer: Wan21Transformer) -> dict[str, torch.Tensor]:
        from flashdreams.recipes.wan.transformer import WanDiTNetwork

        fresh = WanDiTNetwork(transformer.config.network)
        fused = transformer.network.state_dict()
        out: dict[str, torch.Tensor] = {}
        patch_volume, out_dim = transformer.network.patch_volume, transformer.config.network.out_dim
        for key in fresh.state_dict():
            if ".self_attn.q." in key or ".self_attn.k." in key or ".self_attn.v." in key:
                part = "qkv".index(key.split(".self_attn.")[1][0])
                fused_key = key.replace(f".self_attn.{'qkv'[part]}.", ".self_attn.qkv.")
                out[key] = fused[fused_key].chunk(3)[part].clone()
            elif key.startswith("head.head."):
                # fused rows are (c k); the checkpoint layout is (k c)
                rows = (
                    fused[key].unflatten(0, (out_dim, patch_volume)).transpose(0, 1).flatten(0, 1)
                )
                out[key] = rows.clone()
            else:
                out[key] = fused[key].clone()
        return out

    @staticmethod
    def to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import re

        inverse = [
            (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
            (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
            (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
            (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
            (r"^time_projection\.1\.", "condition_embedder.time_proj."),
            (r"^head\.modulation$", "scale_shift_table"),
            (r"^head\.head\.", "proj_out."),
            (r"\.modulation$", ".scale_shift_table"),
            (r"\.norm3\.", ".norm2."),
            (r"\.ffn\.0\.", ".ffn.net.0.proj."),
            (r"\.ffn\.2\.", ".ffn.net.2."),
            (r"\.self_attn\.o\.", ".attn1.to_out.0."),
            (r"\.self_attn\.(q|k|v)\.", r".attn1.to_\1."),
            (r"\.self_attn\.", ".attn1."),
            (r"\.cross_attn\.o\.", ".attn2.to_out.0."),
            (r"\.cross_attn\.(q|k|v)\.", r".attn2.to_\1."),
            (r"\.cross_attn\.", ".attn2."),
        ]
        assert WAN_DIFFUSERS_KEY_PATTERNS  # the forward table exists
        out = {}
        for key, value in state_dict.items():
            for pattern, replacement in inverse:
                key = re.sub(pattern, replacement, key)
            out[key] = value
        return out


def _chunk_on_each(models, caches, x: torch.Tensor, index: int) -> list[torch.Tensor]:
    """One AR chunk (predict at t=700, then commit) of the same input on each model."""
    flows = []
    for model, cache in zip(models, caches, strict=True):
        cache.start(index)
        flows.append(model.predict_flow(x, torch.tensor(700.0), cache))
        model.finalize_kv_cache(x, torch.tensor(0.0), cache)
    return flows


@torch.no_grad()
def test_compile_network_on_cpu_matches_eager_over_a_rollout():
    """``compile_network_on_cpu``: compiled blocks give the eager results, and a rollout
    whose KV window fills over several chunks compiles once (chunk 0), never again."""
    from torch._dynamo.utils import counters

    compiled = _transformer(compile_network_on_cpu=True, len_t=1, window_size_t=3)
    eager = _transformer(len_t=1, window_size_t=3)
    eager.load_state_dict(compiled.state_dict())
    caches = [
        model.initialize_autoregressive_cache(height=4, width=4, text_embeddings=_text(0))
        for model in (compiled, eager)
    ]
    generator = torch.Generator().manual_seed(3)
    graphs_after_first_chunk = None
    for index in range(6):  # keys attended: 16, 32, 48, 64, then 64 (window full)
        x = torch.randn(eager.latent_shape, generator=generator)
        flows = _chunk_on_each((compiled, eager), caches, x, index)
        torch.testing.assert_close(flows[0], flows[1], rtol=0, atol=1e-5)
        if index == 0:
            graphs_after_first_chunk = counters["stats"]["unique_graphs"]
    assert graphs_after_first_chunk > 0  # it really was compiled
    assert counters["stats"]["unique_graphs"] == graphs_after_first_chunk
    assert all(block._compiled_call_impl is not None for block in compiled.network.blocks)
    assert all(block._compiled_call_impl is None for block in eager.network.blocks)


class _ReplayingGraph(CUDAGraphWrapper):
    """CPU stand-in for :class:`CUDAGraphWrapper` with replay semantics: the network
    cache seen at "capture" is the one every later call of that key runs on (a CUDA
    graph replays the addresses it captured)."""

    def __init__(self, fn) -> None:
        super().__init__(fn, warmup_iters=0)
        self.num_resets = 0

    def reset(self) -> None:
        super().reset()
        self.num_resets += 1

    def __call__(self, key, *tensors, **static_kwargs):
        # Like a CUDA graph, hold no reference to the captured cache's storage.
        captured_cache = self._graphs.setdefault(key, weakref.ref(static_kwargs["cache"]))()
        assert captured_cache is not None, "replayed a graph whose cache was freed"
        return self.fn(*tensors, **{**static_kwargs, "cache": captured_cache})


@torch.no_grad()
def test_graphs_are_recaptured_for_each_rollout_cache():
    """Steady-state chunks go through the graph wrapper; a new rollout (its cache built
    after the previous one was freed) drops the graphs captured on the old cache."""
    graphed = _transformer(len_t=1, window_size_t=3)
    eager = _transformer(len_t=1, window_size_t=3)
    eager.load_state_dict(graphed.state_dict())
    graphed.executor._resolved = True
    graph = graphed.executor.graph = _ReplayingGraph(graphed.executor._graph_call)
    assert graphed.cuda_graph_capture_ar_idx == 3
    for rollout in range(2):
        caches = [
            model.initialize_autoregressive_cache(
                height=4, width=4, text_embeddings=_text(10 + rollout)
            )
            for model in (graphed, eager)
        ]
        generator = torch.Generator().manual_seed(rollout)
        for index in range(6):
            x = torch.randn(eager.latent_shape, generator=generator)
            flows = _chunk_on_each((graphed, eager), caches, x, index)
            torch.testing.assert_close(flows[0], flows[1], rtol=0, atol=1e-6)
        assert graph.num_resets == rollout + 1
        assert set(graph._graphs) == {(False, (1, 4, 64), (1,)), (True, (1, 4, 64), (1,))}
        del caches
        gc.collect()
