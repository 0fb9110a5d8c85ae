"""Wan 2.1 transformer: the Wan DiT behind the infra ``Transformer`` interface.

Shape legend::

    *batch  config.batch_shape        B = prod(batch)
    T, C, H, W  latent chunk (len_t frames, out_dim channels, latent height/width)
    L = T*H*W / (kt*kh*kw) tokens      D = out_dim * kt*kh*kw
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from flashdreams.core.attention.kv_cache import KV_CACHE_QUANTIZATIONS
from flashdreams.core.checkpoint import empty_init
from flashdreams.core.distributed.mesh import CFGParallelMesh, ContextParallelMesh
from flashdreams.core.distributed.plan import ParallelPlan, build_parallel_plan
from flashdreams.core.quantization import (
    check_quantization_mode,
    parameter_bytes,
    quantize_linear_weights,
    te_fp8_autocast,
)
from flashdreams.infra.diffusion.noise import (
    NoiseSource,
    entry_shape,
    num_noise_entries,
    randn_entries,
)
from flashdreams.infra.diffusion.transformer import (
    Transformer,
    TransformerAutoregressiveCache,
    TransformerConfig,
)
from flashdreams.recipes.wan.lora import LoRAConfig, WanLoRAs
from flashdreams.recipes.wan.transformer.acceleration import AccelerationPolicy, NetworkExecutor
from flashdreams.recipes.wan.transformer.history import CommitHistory, CommittedChunk
from flashdreams.recipes.wan.transformer.i2v import (
    I2VCtrl,
    conditioned_tokens,
    stamp_image_latent,
)
from flashdreams.recipes.wan.transformer.impl.network import (
    WanDiTNetwork,
    WanDiTNetworkCache,
    WanDiTNetworkConfig,
)
from flashdreams.recipes.wan.transformer.impl.rope import WanRope
from flashdreams.recipes.wan.transformer.parallelize import WanTokenParallel


@dataclass(kw_only=True)
class Wan21TransformerCache(TransformerAutoregressiveCache):
    """Per-rollout state of :class:`Wan21Transformer`."""

    height: int
    """Latent height of this rollout (pre-patchify)."""
    width: int
    """Latent width of this rollout (pre-patchify)."""
    batch_shape: tuple[int, ...]
    """Leading batch dims of the latents this cache runs: ``config.batch_shape``, or
    ``(N * B,)`` for ``N`` rollouts batched by :meth:`Wan21Transformer.concat_caches`."""
    network_cache: WanDiTNetworkCache | None
    """Conditional-branch network cache (batch ``B``); ``None`` on the unconditional
    half of a ``cfg_parallel`` run."""
    network_cache_uncond: WanDiTNetworkCache | None = None
    """Unconditional-branch network cache (batch ``B``); ``None`` without CFG and on
    the conditional half of a ``cfg_parallel`` run."""
    batched_network_cache: WanDiTNetworkCache
    """The cache the forward runs on: ``network_cache`` without CFG, ``[cond; uncond]``
    stacked along the batch with batched CFG (the two fields above are views of it),
    and this rank's branch alone (batch ``B``) with ``cfg_parallel``."""
    rope: WanRope
    """RoPE table of this rollout's grid."""
    history: CommitHistory
    """The committed chunks the KV cache holds tokens of (replayed by a re-cache)."""
    autoregressive_index: int | None = None
    """AR step currently being generated (set by :meth:`start`)."""
    _chunk_freqs: tuple[int, torch.Tensor] | None = None

    @property
    def chunk_index(self) -> int:
        """Chunks already committed to the KV cache (= index of the chunk being generated)."""
        return self.batched_network_cache.chunk_index

    def start(self, autoregressive_index: int) -> None:
        self.autoregressive_index = autoregressive_index

    def storage_bytes(self) -> int:
        """Self-attention K/V of every block plus the kept latents of the commit history."""
        return (
            self.batched_network_cache.self_attention_storage_bytes() + self.history.storage_bytes()
        )


def _branch_views(
    network_cache: WanDiTNetworkCache, rows: int, *, has_cond: bool, has_uncond: bool
) -> tuple[WanDiTNetworkCache | None, WanDiTNetworkCache | None]:
    """``(cond, uncond)`` caches over the cache a forward runs on: with both branches
    (batched CFG) its first and second ``rows`` rows; else the cache itself for the one
    branch this rank runs, ``None`` for the other."""
    if has_cond and has_uncond:
        return network_cache.batch_slice(0, rows), network_cache.batch_slice(rows, 2 * rows)
    return (network_cache if has_cond else None), (network_cache if has_uncond else None)


def check_loras_compose(loras: list[LoRAConfig], quantization: str, where: str = "") -> None:
    """Run-time LoRA adapters need the unquantised weights they sit beside: refuse them with
    a quantised network (fused ones are folded into the weights before quantising)."""
    if quantization == "none":
        return
    runtime = [lora.name or Path(lora.path).stem for lora in loras if not lora.fused]
    if runtime:
        raise ValueError(
            f"{where}loras {', '.join(runtime)} run at run time (fused=false), which does not "
            f"compose with quantization={quantization}: set fused=true (folded into the "
            "weights before quantising) or quantization=none"
        )


@dataclass(kw_only=True)
class Wan21TransformerConfig(TransformerConfig):
    """Config for the Wan 2.1 transformer.

    Holds the temporal layout (``len_t``, ``window_size_t``, ``sink_size_t`` in
    latent frames), CFG and acceleration knobs. The spatial layout comes per
    rollout from :meth:`Wan21Transformer.initialize_autoregressive_cache`.
    The two I2V flags compose; with both, the stamp runs first and the
    stamped latent is then concatenated with mask and image latent.
    """

    _target: type[Wan21Transformer] = field(default_factory=lambda: Wan21Transformer)
    """Always :class:`Wan21Transformer`."""
    network: WanDiTNetworkConfig = field(default_factory=WanDiTNetworkConfig)
    """DiT network architecture."""
    dtype: torch.dtype = torch.bfloat16
    """Compute dtype of the network (time embedding and modulation stay fp32)."""
    quantization: str = "none"
    """Weight quantisation of the blocks' linear layers, applied after the checkpoint loads
    (embeddings, head and modulation keep ``dtype``): ``"none"``; ``"int8_weight_only"``
    (torchao int8 weights, per-channel scales; CPU and GPU; ~0.25x fp32 weight bytes);
    ``"fp8"`` (torchao e4m3 weights and activations, per-row scales; CUDA with compute
    capability >= 8.9, an error elsewhere); ``"te_fp8"`` (transformer-engine linears under
    fp8 autocast; CUDA and the ``[gpu]`` extra). LoRA adapters of ``loras`` are folded into
    the weights before quantising (``fused=true`` only) and cannot change afterwards."""
    kv_cache_dtype: str = "none"
    """Storage of the self-attention KV cache: ``"none"`` (the compute ``dtype``),
    ``"int8"`` or ``"fp8_e4m3"`` (one bf16 scale per token and head; 0.51x of bf16 bytes
    at head dim 128). Cached K/V are dequantised when attention reads them; the chunk
    being denoised attends to its own K/V unquantised. Works with ring / Ulysses CP."""
    checkpoint_path: str | None = None
    """Local checkpoint (safetensors file / index / folder, or weights-only .pth); ``None`` keeps random weights."""
    state_dict_transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    """Pre-load state-dict remap (e.g. Self-Forcing's ``generator_ema.model.`` layout or
    :func:`~flashdreams.recipes.wan.transformer.checkpoint.wan_diffusers_state_dict_transform`).
    Not needed for the known layouts: original Wan keys, diffusers keys and training
    checkpoints nesting either are detected and converted after it runs."""
    loras: list[LoRAConfig] = field(default_factory=list)
    """LoRA adapters applied after the checkpoint loads, in order, e.g.
    ``[{path: distill.safetensors, strength: 1.0}]`` (:class:`~flashdreams.recipes.wan.lora.LoRAConfig`;
    layouts: :mod:`flashdreams.recipes.wan.lora`). Change them later through
    ``transformer.loras`` (:class:`~flashdreams.recipes.wan.lora.WanLoRAs`)."""
    batch_shape: tuple[int, ...] = (1,)
    """Leading batch dims of the latent."""
    len_t: int = 21
    """Latent frames per chunk (AR step)."""
    guidance_scale: float = 1.0
    """CFG scale ``s``: ``flow = uncond + s * (cond - uncond)``. ``1.0`` disables CFG;
    ``> 1.0`` requires negative-text embeddings at cache build time."""
    window_size_t: int = 21
    """Latent frames of earlier chunks kept in the rolling KV window."""
    sink_size_t: int = 0
    """Latent frames at the start of the rollout kept forever (attention sink)."""
    h_extrapolation_ratio: float = 1.0
    """RoPE height positions are divided by this (resolution extrapolation)."""
    w_extrapolation_ratio: float = 1.0
    """RoPE width positions are divided by this (resolution extrapolation)."""
    compile_network: bool = True
    """``torch.compile`` the network's blocks on CUDA, the KV-cache self-attention entry
    point left eager (:meth:`WanDiTNetwork.compile_blocks`: one compile on the first
    chunk, none while the window fills); skipped (logged once) on CPU."""
    compile_network_on_cpu: bool = False
    """Also compile the blocks on CPU (inductor's C++ backend: needs a C++ compiler;
    the first chunk compiles for seconds to tens of seconds). On the mid-size CPU
    benchmark it is within a few percent of eager (bench/RESULTS.md)."""
    use_cuda_graph: bool = True
    """Replay the network from CUDA graphs once the KV cache is in steady state
    (:class:`~flashdreams.recipes.wan.transformer.cuda_graph.CUDAGraphWrapper`);
    skipped (logged once) on CPU and under context parallelism. Earlier AR steps run
    eagerly through ``CUDAGraphWrapper.drain`` (:mod:`~flashdreams.recipes.wan.transformer.acceleration`)."""
    cuda_graph_warmup_iters: int = 2
    """Eager calls per graph key before capture."""
    stamp_image_latent: bool = False
    """Overwrite the noisy latent with the image latent at masked positions every step,
    and re-stamp the predicted ``x0`` the same way (mask-inject I2V)."""
    concat_image_mask_to_latent: bool = False
    """Append the mask and image latent along channels (Wan 2.1 14B I2V: set
    ``network.in_dim = 16 + 4 + 16``)."""
    ti2v_first_frame_per_token_timestep: bool = False
    """Wan 2.2 TI2V 5B: at AR step 0 with an I2V input, use ``first_frame_timestep_value``
    as the timestep of the masked (first-frame) tokens and the scheduler's elsewhere."""
    first_frame_timestep_value: float = 0.0
    """Per-token timestep of first-frame tokens when ``ti2v_first_frame_per_token_timestep``."""

    def __post_init__(self) -> None:
        self.batch_shape = tuple(self.batch_shape)
        kt = self.network.patch_size[0]
        for name in ("len_t", "window_size_t", "sink_size_t"):
            value = getattr(self, name)
            if value < 0 or (name == "len_t" and value == 0):
                raise ValueError(
                    f"{name} must be {'positive' if name == 'len_t' else '>= 0'}, got {value}"
                )
            if value % kt != 0:
                raise ValueError(f"{name}={value} is not divisible by the temporal patch size {kt}")
        if self.guidance_scale < 1.0:
            raise ValueError(
                f"guidance_scale must be >= 1.0 (1.0 disables CFG), got {self.guidance_scale}"
            )
        check_quantization_mode(self.quantization)
        check_loras_compose(self.loras, self.quantization)
        if self.kv_cache_dtype not in KV_CACHE_QUANTIZATIONS:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_QUANTIZATIONS)}; "
                f"got {self.kv_cache_dtype!r}"
            )
        if self.cuda_graph_warmup_iters < 0:
            raise ValueError(
                f"cuda_graph_warmup_iters must be >= 0, got {self.cuda_graph_warmup_iters}"
            )


class Wan21Transformer(Transformer[Wan21TransformerCache]):
    """Wan 2.1 DiT adapted to the infra :class:`Transformer` interface.

    Parallelism comes from outside, as a
    :class:`~flashdreams.core.distributed.plan.ParallelPlan` (built once by the
    launcher, or by a parent such as
    :class:`~flashdreams.recipes.wan.transformer.wan22.Wan22Transformer` to
    share it). Without one, the plan is detected from the world size
    (:func:`~flashdreams.core.distributed.plan.build_parallel_plan` with its
    defaults, a collective). Under context parallelism :attr:`latent_shape` is
    this rank's shard, and every noise draw produces the global tensor and keeps
    the rank's shard (:mod:`~flashdreams.recipes.wan.transformer.parallelize`),
    so a CP run reproduces the single-process run with the same seed.

    With the plan's ``cfg_parallel`` the world is split in two halves, one per
    CFG branch (see :class:`~flashdreams.core.distributed.mesh.CFGParallelMesh`);
    everything above holds inside each half, and both halves draw the same
    noise and apply the same guided flow, so their latents stay identical.
    """

    def __init__(
        self, config: Wan21TransformerConfig, parallel: ParallelPlan | None = None
    ) -> None:
        super().__init__(config)
        self.config: Wan21TransformerConfig = config
        if parallel is None:
            parallel = build_parallel_plan()
        if parallel.cfg is not None and config.guidance_scale == 1.0:
            raise ValueError(
                "cfg_parallel=True splits the ranks between the two CFG branches, but "
                "guidance_scale=1.0 disables CFG; set guidance_scale > 1 or cfg_parallel=False"
            )
        self.parallel = WanTokenParallel(
            parallel, cp_method=config.network.cp_method, num_heads=config.network.num_heads
        )
        # With a checkpoint every weight comes from the file: no random initialisation.
        with empty_init(config.checkpoint_path is not None):
            self.network = WanDiTNetwork(config.network)
        self.network.set_context_parallel_group(self.parallel.mesh)
        if config.checkpoint_path is not None:
            self.load_checkpoint(config.checkpoint_path)
        self.network.update_parameters_after_loading_checkpoint()
        self.network.to(config.dtype)
        self.network.keep_modulation_in_fp32()
        self._height: int | None = None
        self._width: int | None = None
        self.executor = NetworkExecutor(
            self.network,
            AccelerationPolicy(
                compile_network=config.compile_network,
                compile_network_on_cpu=config.compile_network_on_cpu,
                use_cuda_graph=config.use_cuda_graph,
                cuda_graph_warmup_iters=config.cuda_graph_warmup_iters,
                capture_from_chunk=self.cuda_graph_capture_ar_idx,
            ),
            context_parallel=self.parallel.mesh is not None,
        )
        # The LoRA adapters applied to the network (config.loras); changed in place.
        self.loras = WanLoRAs.from_configs(
            self.network, config.loras, on_change=self.executor.reset_graphs
        )
        self.quantization = "none"
        """Quantisation applied to the network's block linears (see :meth:`quantize_weights`)."""
        self.quantize_weights(config.quantization)
        self.kv_cache_dtype = config.kv_cache_dtype
        """KV-cache storage of new rollouts (the config's; a Wan 2.2 parent may set it)."""

    @property
    def cp_mesh(self) -> ContextParallelMesh | None:
        """Context-parallel mesh of this transformer; ``None``: no context parallelism."""
        return self.parallel.mesh

    @property
    def cfg_parallel_mesh(self) -> CFGParallelMesh | None:
        """CFG-parallel layout (branch of this rank, partner group); ``None`` unless cfg_parallel."""
        return self.parallel.plan.cfg

    # ------------------------------------------------------------ checkpoint
    @property
    def cuda_graph_capture_s(self) -> float:
        """Seconds spent capturing CUDA graphs so far (0 without them)."""
        graph = self.executor.graph
        return 0.0 if graph is None else graph.capture_s

    def load_checkpoint(self, path: str) -> None:
        """Load weights into the (unfused) network: load -> transform -> layout check -> strict copy."""
        from flashdreams.core.checkpoint import load_checkpoint, load_state_dict_into_module
        from flashdreams.recipes.wan.transformer.checkpoint import to_original_wan_dit_keys

        state_dict = load_checkpoint(path)
        if self.config.state_dict_transform is not None:
            state_dict = self.config.state_dict_transform(state_dict)
        state_dict = to_original_wan_dit_keys(state_dict, source=f"checkpoint '{path}'")
        load_state_dict_into_module(
            self.network, state_dict, strict=True, source=f"checkpoint '{path}'"
        )

    def quantize_weights(self, mode: str) -> None:
        """Quantise the linear layers of the network's blocks in place (once, after loading).

        Logs the network's weight bytes before and after. ``"none"`` does nothing.
        """
        check_quantization_mode(mode)
        if mode == "none" or mode == self.quantization:
            return
        if self.quantization != "none":
            raise ValueError(
                f"the network is already quantised ({self.quantization}); cannot apply {mode}"
            )
        bytes_before = parameter_bytes(self.network)
        quantize_linear_weights(
            self.network, mode, filter_fn=lambda _linear, name: name.startswith("blocks.")
        )
        self.quantization = mode
        self.loras.freeze(
            f"the network's block weights are quantised (quantization={mode}); give the "
            "adapters in transformer.loras (fused: folded in before quantising) or use "
            "quantization=none"
        )
        bytes_after = parameter_bytes(self.network)
        logger.info(
            f"Wan21Transformer: quantization={mode}: network weights "
            f"{bytes_before / 2**20:.1f} MiB -> {bytes_after / 2**20:.1f} MiB "
            f"({bytes_after / bytes_before:.2f}x)"
        )

    # ---------------------------------------------------------------- layout
    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading batch dims of the latent."""
        return tuple(self.config.batch_shape)

    @property
    def len_t(self) -> int:
        """Latent frames per chunk."""
        return self.config.len_t

    @property
    def guidance_scale(self) -> float:
        """CFG scale (1.0: no CFG)."""
        return self.config.guidance_scale

    @property
    def spatial_patch_size(self) -> tuple[int, int]:
        """``(kh, kw)`` of the network's patch size."""
        _, kh, kw = self.config.network.patch_size
        return kh, kw

    @property
    def patch_volume(self) -> int:
        return math.prod(self.config.network.patch_size)

    def _grid(self) -> tuple[int, int]:
        """Token-grid ``(height, width)`` of this rollout: latent size / spatial patch size."""
        assert self._height is not None and self._width is not None, (
            "height/width are set by initialize_autoregressive_cache()"
        )
        _, kh, kw = self.config.network.patch_size
        return self._height // kh, self._width // kw

    @property
    def num_tokens(self) -> int:
        """Tokens per chunk: ``L = len_t*H*W / (kt*kh*kw)``."""
        grid_h, grid_w = self._grid()
        return self.config.len_t // self.config.network.patch_size[0] * grid_h * grid_w

    @property
    def num_local_tokens(self) -> int:
        """Token slots of this rank per chunk: ``ceil(L / N)`` under CP (padding included), else ``L``."""
        return self.parallel.num_local_tokens(self.num_tokens)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(*batch_shape, L_rank, D)`` with ``D = out_dim * prod(patch_size)``; ``L_rank`` is
        :attr:`num_local_tokens` (``L`` on a single rank)."""
        return (*self.config.batch_shape, self.num_local_tokens, self._token_width)

    @property
    def _token_width(self) -> int:
        return self.config.network.out_dim * self.patch_volume

    def patchify_and_maybe_split_cp(self, x: Any) -> Any:
        """Patchify a ``[*batch, T, C, H, W]`` latent, or each field of an :class:`I2VCtrl`,
        and keep this rank's token slots under CP."""
        if isinstance(x, I2VCtrl):
            return I2VCtrl(
                latent=self.patchify_and_maybe_split_cp(x.latent),
                mask=self.patchify_and_maybe_split_cp(x.mask),
            )
        return self.parallel.split(self.network.patchify_and_maybe_split_cp(x))

    def unpatchify_and_maybe_gather_cp(self, x: torch.Tensor) -> torch.Tensor | None:
        """Gather the clean latent on CP rank 0 (padding dropped) and unpatchify it.

        Returns ``[*batch, T, C, H, W]`` on rank 0 and ``None`` on the other ranks.
        With ``cfg_parallel`` the unconditional half holds the same latent as the
        conditional one: it skips the gather and returns ``None``.
        """
        tokens = self.parallel.gather(x, self.num_tokens)
        if tokens is None:
            return None
        grid_h, grid_w = self._grid()
        return self.network.unpatchify_and_maybe_gather_cp(grid_h, grid_w, tokens)

    def sample_noise(
        self,
        rng: NoiseSource,
        *,
        device: torch.device,
        dtype: torch.dtype,
        in_unpatchified_shape: bool = False,
    ) -> torch.Tensor:
        """Initial noise in :attr:`latent_shape`; optionally drawn as ``[*batch, T, C, H, W]`` and patchified.

        Under CP every rank draws the global tensor with the same generator and
        keeps its slots, so all generators advance alike and the shards are
        those of the single-process draw. With one generator per batched rollout
        (:func:`~flashdreams.infra.diffusion.noise.randn_entries`) the batch is
        ``[N * B]`` and each rollout's rows are its own draw.
        """
        batch_shape = self.config.batch_shape
        num_entries = num_noise_entries(rng)
        if num_entries > 1:
            batch_shape = (num_entries * math.prod(batch_shape),)
        if not in_unpatchified_shape:
            global_shape = (*batch_shape, self.num_tokens, self._token_width)
            return self.parallel.randn_tokens(global_shape, rng, device=device, dtype=dtype)
        assert self._height is not None and self._width is not None
        shape = (
            *batch_shape,
            self.config.len_t,
            self.config.network.out_dim,
            self._height,
            self._width,
        )
        noise = randn_entries(entry_shape(shape, rng), rng, device=device, dtype=dtype)
        return self.patchify_and_maybe_split_cp(noise)

    def sample_noise_like(self, x: torch.Tensor, rng: NoiseSource) -> torch.Tensor:
        """Gaussian noise shaped like the patchified ``x`` (scheduler re-noising).

        Under CP ``x`` is this rank's shard ``[..., L_rank, D]``: the global
        ``[..., L, D]`` noise is drawn and split, as in :meth:`sample_noise`.
        """
        if self.cp_mesh is None:
            shape = entry_shape(tuple(x.shape), rng)
            return randn_entries(shape, rng, device=x.device, dtype=x.dtype)
        assert x.shape[-2] == self.num_local_tokens, (tuple(x.shape), self.num_local_tokens)
        global_shape = (*x.shape[:-2], self.num_tokens, x.shape[-1])
        return self.parallel.randn_tokens(global_shape, rng, device=x.device, dtype=x.dtype)

    # ----------------------------------------------------------------- cache
    def initialize_autoregressive_cache(
        self,
        *,
        height: int,
        width: int,
        text_embeddings: torch.Tensor,
        image_embeddings: torch.Tensor | None = None,
        negative_text_embeddings: torch.Tensor | None = None,
        **_unused: Any,
    ) -> Wan21TransformerCache:
        """Build the cache of a new rollout.

        Args:
            height, width: latent height / width (post-VAE, pre-patchify).
            text_embeddings: ``[*batch_shape, text_len, text_dim]``.
            image_embeddings: CLIP embeddings for networks with image
                cross-attention; shared by the uncond branch.
            negative_text_embeddings: required iff ``guidance_scale > 1``.

        With ``cfg_parallel`` every rank gets the same arguments and builds the
        cache of its own branch only (batch ``B``).
        """
        config = self.config
        _, kh, kw = config.network.patch_size
        if height <= 0 or width <= 0 or height % kh or width % kw:
            raise ValueError(
                f"latent height/width ({height}, {width}) must be positive and divisible by the "
                f"patch size (kh, kw) = ({kh}, {kw})"
            )
        text, image = self._branch_conditioning(
            text_embeddings, image_embeddings, negative_text_embeddings
        )
        self._height, self._width = height, width
        grid_h, grid_w = self._grid()
        tokens_per_frame = grid_h * grid_w
        kt = config.network.patch_size[0]
        device = self.network.head.head.weight.device
        batched = self.network.initialize_cache(
            chunk_size=config.len_t // kt * tokens_per_frame,
            window_size=config.window_size_t // kt * tokens_per_frame,
            sink_size=config.sink_size_t // kt * tokens_per_frame,
            text_embeddings=text.to(device),
            img_embeddings=None if image is None else image.to(device),
            kv_cache_quantization=self.kv_cache_dtype,
        )
        rope = WanRope(
            head_dim=config.network.head_dim,
            num_height_tokens=grid_h,
            num_width_tokens=grid_w,
            h_extrapolation_ratio=config.h_extrapolation_ratio,
            w_extrapolation_ratio=config.w_extrapolation_ratio,
            device=device,
        )
        batch_size = math.prod(config.batch_shape)
        cfg_branch = self.parallel.cfg_branch
        cond, uncond = _branch_views(
            batched,
            batch_size,
            has_cond=cfg_branch != 1,
            has_uncond=config.guidance_scale > 1.0 and cfg_branch != 0,
        )
        return Wan21TransformerCache(
            height=height,
            width=width,
            batch_shape=tuple(config.batch_shape),
            network_cache=cond,
            network_cache_uncond=uncond,
            batched_network_cache=batched,
            rope=rope,
            history=CommitHistory(
                len_t=config.len_t,
                window_size_t=config.window_size_t,
                sink_size_t=config.sink_size_t,
            ),
        )

    # ------------------------------------------------ batching separate rollouts
    def can_batch_caches(self, caches: Sequence[Wan21TransformerCache]) -> bool:
        """Whether the rollouts of ``caches`` can run their next chunk as one batch
        (:meth:`concat_caches`): same latent size, one batch dim, one noise generator each,
        the same chunk next, the same kept history (no encoder inputs) and same-shaped caches."""
        first = caches[0]
        if len(first.batch_shape) != 1:
            return False
        for cache in caches:
            if cache.noise_generators is None or len(cache.noise_generators) != 1:
                return False
        return all(
            (other.height, other.width, other.batch_shape)
            == (first.height, first.width, first.batch_shape)
            and (other.network_cache is None) == (first.network_cache is None)
            and (other.network_cache_uncond is None) == (first.network_cache_uncond is None)
            and first.batched_network_cache.can_batch_with(other.batched_network_cache)
            and first.history.can_batch_with(other.history)
            for other in caches[1:]
        )

    def concat_caches(self, caches: Sequence[Wan21TransformerCache]) -> Wan21TransformerCache:
        """One cache that runs the next chunk of every rollout of ``caches`` as one batch.

        Rows are in the order given (with batched CFG: every conditional row, then every
        unconditional row, as the forward expects); the storage is new. Each rollout keeps
        drawing from its own generator, so its rows equal what it computes alone. Undo with
        :meth:`split_cache`. The caches must pass :meth:`can_batch_caches`.
        """
        assert self.can_batch_caches(caches)
        first = caches[0]
        num_rows = len(caches) * first.batch_shape[0]
        has_cond = first.network_cache is not None
        has_uncond = first.network_cache_uncond is not None
        if has_cond and has_uncond:
            parts = [cache.network_cache for cache in caches]
            parts += [cache.network_cache_uncond for cache in caches]
        else:
            parts = [cache.batched_network_cache for cache in caches]
        batched = WanDiTNetworkCache.concat(parts)
        cond, uncond = _branch_views(batched, num_rows, has_cond=has_cond, has_uncond=has_uncond)
        return Wan21TransformerCache(
            height=first.height,
            width=first.width,
            batch_shape=(num_rows,),
            network_cache=cond,
            network_cache_uncond=uncond,
            batched_network_cache=batched,
            rope=first.rope,
            history=CommitHistory.concat([cache.history for cache in caches]),
            autoregressive_index=first.autoregressive_index,
            noise_generators=[cache.noise_generators[0] for cache in caches],
        )

    def split_cache(self, cache: Wan21TransformerCache) -> list[Wan21TransformerCache]:
        """The rollouts' own caches back from :meth:`concat_caches`, after the batched chunk.

        Without CFG (or under ``cfg_parallel``) they are views of the batched storage with
        their own bookkeeping; with batched CFG each rollout's ``[cond; uncond]`` rows are
        copied together.
        """
        generators = cache.noise_generators
        assert generators is not None
        num_entries = len(generators)
        rows = cache.batch_shape[0] // num_entries
        ranges = [(i * rows, (i + 1) * rows) for i in range(num_entries)]
        has_cond = cache.network_cache is not None
        has_uncond = cache.network_cache_uncond is not None
        if has_cond and has_uncond:
            conds = cache.network_cache.split_rows(ranges)
            unconds = cache.network_cache_uncond.split_rows(ranges)
            batched = [WanDiTNetworkCache.concat(pair) for pair in zip(conds, unconds, strict=True)]
        else:
            batched = cache.batched_network_cache.split_rows(ranges)
        branches = [
            _branch_views(part, rows, has_cond=has_cond, has_uncond=has_uncond) for part in batched
        ]
        histories = cache.history.split_rows(ranges)
        return [
            Wan21TransformerCache(
                height=cache.height,
                width=cache.width,
                batch_shape=(rows,),
                network_cache=cond,
                network_cache_uncond=uncond,
                batched_network_cache=network_cache,
                rope=cache.rope,
                history=history,
                autoregressive_index=cache.autoregressive_index,
                noise_generators=[generator],
            )
            for network_cache, (cond, uncond), history, generator in zip(
                batched, branches, histories, generators, strict=True
            )
        ]

    def _branch_conditioning(
        self,
        text_embeddings: torch.Tensor,
        image_embeddings: torch.Tensor | None,
        negative_text_embeddings: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text ``[B', Lt, text_dim]`` and image embeddings of the branches this rank runs.

        ``B' = B`` without CFG or under ``cfg_parallel`` (the negative prompt is the
        unconditional half's text); ``B' = 2B`` with batched CFG: ``[cond; uncond]``.
        """
        config = self.config
        self._check_batch(text_embeddings, "text_embeddings")
        use_cfg = config.guidance_scale > 1.0
        if use_cfg and negative_text_embeddings is None:
            raise ValueError(
                f"guidance_scale={config.guidance_scale} > 1 enables CFG, which needs "
                "negative_text_embeddings"
            )
        if not use_cfg and negative_text_embeddings is not None:
            raise ValueError(
                "negative_text_embeddings were given but guidance_scale=1.0 disables CFG; "
                "set guidance_scale > 1 or drop them"
            )
        batch_size = math.prod(config.batch_shape)
        text = text_embeddings.reshape(batch_size, *text_embeddings.shape[-2:])
        image = image_embeddings
        if image is not None:
            image = image.reshape(batch_size, *image.shape[-2:])
        if not use_cfg:
            return text, image
        self._check_batch(negative_text_embeddings, "negative_text_embeddings")
        negative = negative_text_embeddings.reshape(
            batch_size, *negative_text_embeddings.shape[-2:]
        )
        if self.parallel.cfg_branch == 0:
            return text, image
        if self.parallel.cfg_branch == 1:
            return negative.to(text.dtype), image
        if negative.shape[-2] != text.shape[-2]:
            # zero-pad both to the network's text length so they stack
            text_len = config.network.text_len
            text = torch.nn.functional.pad(text, (0, 0, 0, text_len - text.shape[-2]))
            negative = torch.nn.functional.pad(negative, (0, 0, 0, text_len - negative.shape[-2]))
        # [cond; uncond] along the batch: [2B, text_len, text_dim]
        text = torch.cat([text, negative.to(text.dtype)], dim=0)
        if image is not None:
            image = torch.cat([image, image], dim=0)
        return text, image

    def _check_batch(self, embeddings: torch.Tensor, name: str) -> None:
        expected = self.config.batch_shape
        if embeddings.ndim != len(expected) + 2 or tuple(embeddings.shape[:-2]) != expected:
            raise ValueError(
                f"{name} must have shape [*batch_shape, tokens, width] with batch_shape="
                f"{expected}, got {tuple(embeddings.shape)}"
            )

    # ---------------------------------------------------------------- forward
    def predict_flow(
        self,
        noisy_latent: torch.Tensor,
        timestep: torch.Tensor,
        cache: Wan21TransformerCache,
        input: I2VCtrl | None = None,
        network_extra_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Predict the flow of the current chunk (no cache write).

        ``timestep`` is a scalar / per-batch tensor or a per-token tensor
        ``[*batch, L]``.
        """
        return self._forward(
            noisy_latent, timestep, cache, input, network_extra_kwargs, commit=False
        )

    def finalize_kv_cache(
        self,
        noisy_latent: torch.Tensor,
        timestep: torch.Tensor,
        cache: Wan21TransformerCache,
        input: I2VCtrl | None = None,
    ) -> None:
        """Run the context-noise forward that writes this chunk's K/V into the cache.

        The latent, timestep and input are kept in ``cache.history`` while the
        cache holds tokens of this chunk, for :meth:`switch_conditioning`.
        """
        cache.history.append(
            CommittedChunk(
                chunk_index=cache.chunk_index,
                latent=noisy_latent.clone(),
                timestep=timestep.clone(),
                input=input,
            )
        )
        self._forward(noisy_latent, timestep, cache, input, None, commit=True)

    # ---------------------------------------------------------- prompt switch
    @torch.no_grad()
    def switch_conditioning(
        self,
        cache: Wan21TransformerCache,
        *,
        recache: bool,
        text_embeddings: torch.Tensor | None = None,
        negative_text_embeddings: torch.Tensor | None = None,
    ) -> None:
        """Change the text conditioning of a running rollout between two chunks.

        ``text_embeddings`` (``[*batch_shape, text_len, text_dim]``) replace the
        conditional branch's text, ``negative_text_embeddings`` the
        unconditional branch's (CFG only); ``None`` keeps a branch's text. The
        cross-attention K/V are overwritten in place (CUDA graphs stay valid).

        ``recache=False`` stops there: the self-attention KV cache keeps the
        history as it was computed under the old text. ``recache=True``
        rebuilds it: the cache is emptied and every chunk the cache held tokens
        of (:class:`~flashdreams.recipes.wan.transformer.history.CommitHistory`:
        the sink chunks, then the window's) is committed again, in AR order at
        its own RoPE position, under the new text. The sink is re-cached too,
        so every cached key agrees with the new text. A replayed window chunk
        attends to the sink and the replayed chunks before it, not to the
        chunks that had already left the window when it was first committed.

        Under context parallelism every rank calls this between the same two
        chunks with the same arguments (each replays its own token shards).
        """
        config = self.config
        for embeddings, name in (
            (text_embeddings, "text_embeddings"),
            (negative_text_embeddings, "negative_text_embeddings"),
        ):
            if embeddings is not None:
                self._check_batch(embeddings, name)
        if negative_text_embeddings is not None and config.guidance_scale == 1.0:
            raise ValueError(
                "negative_text_embeddings were given but guidance_scale=1.0 disables CFG; "
                "there is no unconditional branch to switch"
            )
        for embeddings, network_cache in (
            (text_embeddings, cache.network_cache),
            (negative_text_embeddings, cache.network_cache_uncond),
        ):
            if embeddings is not None and network_cache is not None:
                self._replace_text(network_cache, embeddings)
        if recache:
            self._replay_history(cache)

    def _replace_text(self, network_cache: WanDiTNetworkCache, embeddings: torch.Tensor) -> None:
        """Overwrite the text K/V of every block of one branch's cache (batch ``B``)."""
        device = self.network.head.head.weight.device
        text = embeddings.reshape(-1, *embeddings.shape[-2:]).to(device)
        text_context = self.network.embed_text(text)
        for block, block_cache in zip(self.network.blocks, network_cache.blocks, strict=True):
            k, v, _, _ = block.cross_attn.context_kv(text_context, None)
            block_cache.cross_k.copy_(k)
            block_cache.cross_v.copy_(v)

    def _replay_history(self, cache: Wan21TransformerCache) -> None:
        """Empty the self-attention KV cache and commit the kept chunks again."""
        network_cache = cache.batched_network_cache
        next_chunk_index = network_cache.chunk_index
        for block_cache in network_cache.blocks:
            block_cache.self_kv.reset()
        for chunk in cache.history.chunks:
            network_cache.num_committed_chunks[0] = chunk.chunk_index
            self._forward(chunk.latent, chunk.timestep, cache, chunk.input, None, commit=True)
        network_cache.num_committed_chunks[0] = next_chunk_index

    def postprocess_clean_latent(
        self,
        clean_latent: torch.Tensor,
        cache: Wan21TransformerCache,
        input: I2VCtrl | None = None,
    ) -> torch.Tensor:
        """Re-stamp the known image positions of ``x0`` (mask-inject I2V only)."""
        if input is not None and self.config.stamp_image_latent:
            return stamp_image_latent(clean_latent, input, self.patch_volume)
        return clean_latent

    def _forward(
        self,
        noisy_latent: torch.Tensor,
        timestep: torch.Tensor,
        cache: Wan21TransformerCache,
        input: I2VCtrl | None,
        network_extra_kwargs: dict[str, Any] | None,
        *,
        commit: bool,
    ) -> torch.Tensor:
        config = self.config
        batch_shape = cache.batch_shape
        batch_size = math.prod(batch_shape)
        num_tokens = noisy_latent.shape[-2]
        x = noisy_latent
        if input is not None and config.stamp_image_latent:
            x = stamp_image_latent(x, input, self.patch_volume)
        timestep, per_token = self._timesteps(timestep, num_tokens, cache, input, x.device)
        if config.concat_image_mask_to_latent:
            if input is None:
                raise ValueError(
                    "concat_image_mask_to_latent=True needs an I2VCtrl input (mask + image latent)"
                )
            x = torch.cat([x, input.mask.to(x.dtype), input.latent.to(x.dtype)], dim=-1)
        # [*batch, L, D_in] -> [B, L, D_in]; timesteps -> [B] or [B, L]
        x = x.reshape(batch_size, num_tokens, x.shape[-1])
        if per_token:
            t = timestep.expand(*batch_shape, num_tokens).reshape(batch_size, num_tokens)
        else:
            t = timestep.expand(batch_shape).reshape(batch_size)
        batched_cfg = not self.parallel.cfg_parallel and cache.network_cache_uncond is not None
        if batched_cfg:
            x = torch.cat([x, x], dim=0)
            t = torch.cat([t, t], dim=0)
        rope_freqs, relative_rope = self._rope_inputs(cache)
        with te_fp8_autocast(self.quantization == "te_fp8"):
            out = self.executor(
                x.to(config.dtype),
                t,
                cache.batched_network_cache,
                rope_freqs,
                commit=commit,
                relative_rope=relative_rope,
                block_extra_kwargs=network_extra_kwargs,
            )
        if batched_cfg:
            cond, uncond = out.float().chunk(2, dim=0)
            out = uncond + config.guidance_scale * (cond - uncond)
        elif self.parallel.cfg_parallel:
            out = self.parallel.exchange_and_guide(out, config.guidance_scale)
        return out.reshape(*batch_shape, num_tokens, out.shape[-1]).to(noisy_latent.dtype)

    def _timesteps(
        self,
        timestep: torch.Tensor,
        num_tokens: int,
        cache: Wan21TransformerCache,
        input: I2VCtrl | None,
        device: torch.device,
    ) -> tuple[torch.Tensor, bool]:
        """fp32 timesteps and whether they are per token (``[*batch, L]``).

        Wan 2.2 TI2V: at AR step 0 with an I2V input, the first-frame tokens get
        ``first_frame_timestep_value``.
        """
        config = self.config
        batch_shape = cache.batch_shape
        timestep = timestep.to(device=device, dtype=torch.float32)
        per_token = timestep.ndim == len(batch_shape) + 1 and timestep.shape[-1] == num_tokens
        if not (
            config.ti2v_first_frame_per_token_timestep
            and input is not None
            and cache.chunk_index == 0
        ):
            return timestep, per_token
        first_frame = conditioned_tokens(input, self.patch_volume)  # [*batch, L]
        base = (
            timestep
            if per_token
            else timestep.reshape(*timestep.shape, *([1] * (len(batch_shape) + 1 - timestep.ndim)))
        )
        timestep = torch.where(
            first_frame, torch.full_like(base, config.first_frame_timestep_value), base
        )
        return timestep, True

    def _rope_inputs(self, cache: Wan21TransformerCache) -> tuple[torch.Tensor | None, Any]:
        """Absolute RoPE frequencies of this rank's slots of the chunk, or the relative RoPE."""
        if not self.config.network.apply_rope_before_kvcache:
            return None, cache.rope.relative
        chunk_index = cache.chunk_index
        if cache._chunk_freqs is None or cache._chunk_freqs[0] != chunk_index:
            frames_per_chunk = self.config.len_t // self.config.network.patch_size[0]
            freqs = cache.rope.chunk_freqs(chunk_index * frames_per_chunk, frames_per_chunk)
            # [L, 1, d] -> this rank's [L_rank, 1, d]: sliced by global token position.
            cache._chunk_freqs = (chunk_index, self.parallel.split(freqs, dim=0))
        return cache._chunk_freqs[1], None

    @property
    def cuda_graph_capture_ar_idx(self) -> int:
        """First AR step whose KV cache is full before the step (steady state)."""
        config = self.config
        capacity_t = config.sink_size_t + config.window_size_t
        return -(-capacity_t // config.len_t)
