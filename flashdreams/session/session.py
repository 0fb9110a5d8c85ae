"""An interactive session: one rollout over a loaded pipeline, stepped chunk by chunk.

Example::

    session = Session.open(pipeline, prompt="A red panda in a forest.", height=60, width=104)
    first = session.step()                       # chunk 0
    receipt = session.switch_prompt("The red panda climbs a snowy mountain.")
    second = session.step()                      # chunk 1, under the new prompt
    assert receipt.applied_at_chunk == 1
    session.close()

A prompt switch or a control may be requested at any time; it is applied at
the next chunk boundary (the start of the next :meth:`Session.step`). Under
context parallelism every rank opens the same session and calls ``step`` in
lockstep; requests are made on rank 0 and broadcast to the other ranks
before each chunk (``command_group``), so all ranks apply the same switches
and controls at the same chunk.

The LoRA adapters of the model can be swapped live the same way
(:meth:`Session.swap_loras`): received any time, applied at the next chunk
boundary, with a :class:`LoRASwapReceipt`.

A session steps the same loop as the offline runner
(:class:`~flashdreams.session.loop.StreamingSession`, on a
:class:`~flashdreams.session.sinks.ReturningSink`): each ``step`` returns the
chunk's latent and video, and with a ``writer`` (e.g. an ``Mp4Writer``) the
frames are also written, so a saved session equals an offline run.

The pipeline contract (what :class:`~flashdreams.recipes.wan.WanInferencePipeline`
provides): ``initialize_cache(text, image, height=, width=, release_oneshot_encoders=)``,
``switch_prompt(cache, text, negative_prompt=, recache=)``,
``generate_latent(i, cache, input)``, ``decode_latent(latent, i, cache)``, ``clean_latent(cache)``,
``finalize(i, cache)`` and ``diffusion_model`` (``rng``, ``device``); LoRA swaps also use
``transformer`` (its ``loras``, or each expert's for Wan 2.2, and ``guidance_scale``) and
``config.negative_prompt``.

Each session owns its noise: a generator of its own (seeded with ``seed``,
else started from the state of the generator the diffusion model would draw
from: its seeded ``rng``, else torch's global generator of the device), set
as the rollout cache's ``noise_generators``. Sessions interleaved over one
model, or batched into one forward by a
:class:`~flashdreams.session.manager.SessionManager`, draw what each would
draw alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from flashdreams.session.loop import StreamingSession
from flashdreams.session.sinks import FrameWriter, ReturningSink
from flashdreams.session.stats import ChunkStats, RolloutStats
from flashdreams.session.telemetry import SessionTelemetry
from flashdreams.session.timeline import PromptSwitch

if TYPE_CHECKING:
    from flashdreams.recipes.wan.lora import LoRAAdapter, LoRAConfig, WanLoRAs

SwitchMode = Literal["recache", "none"]
SWITCH_MODES: tuple[str, ...] = ("recache", "none")


@dataclass(kw_only=True)
class BoundaryReceipt:
    """A request applied at a chunk boundary: when it was asked for and when it took effect."""

    mode: SwitchMode
    """``recache`` or ``none``."""
    received_at_chunk: int
    """Chunks generated when the request was received (= the next chunk's index then)."""
    received_s: float = field(default_factory=time.perf_counter)
    """``time.perf_counter()`` at reception."""
    applied_at_chunk: int | None = None
    """First chunk generated under the request; ``None`` until applied."""
    applied_s: float | None = None
    """``time.perf_counter()`` once the request (and its re-cache) was done."""
    first_frame_s: float | None = None
    """``time.perf_counter()`` once the first chunk under the request was decoded."""


@dataclass(kw_only=True)
class SwitchReceipt(BoundaryReceipt):
    """A prompt switch."""

    prompt: str | None
    """New prompt (``None``: only the negative prompt changes)."""
    negative_prompt: str | None
    """New CFG negative prompt (``None``: unchanged)."""


@dataclass(kw_only=True)
class LoRASwapReceipt(BoundaryReceipt):
    """A LoRA adapter swap (:meth:`Session.swap_loras`)."""

    change: Any
    """The adapters to swap in (a list) or the callable that changes them."""
    adapters: list[str] | None = None
    """Names of the adapters applied once the swap is done (every LoRA set, in order)."""


@dataclass
class ChunkResult:
    """One generated chunk."""

    index: int
    """AR index of the chunk."""
    latent: torch.Tensor | None
    """Clean latent ``[*batch, T, C, H, W]`` (``None`` on ranks that do not hold the output)."""
    video: torch.Tensor | None
    """Decoded chunk (``None`` when not decoded or on ranks that do not hold the output)."""
    switches: list[SwitchReceipt]
    """Switches applied right before this chunk."""
    lora_swaps: list[LoRASwapReceipt] = field(default_factory=list)
    """LoRA swaps applied right before this chunk."""


@dataclass
class Boundary:
    """What :meth:`Session.begin_step` applied and took at one chunk boundary."""

    index: int
    """The chunk about to be generated."""
    switches: list[SwitchReceipt]
    """Prompt switches applied at this boundary."""
    lora_swaps: list[LoRASwapReceipt]
    """LoRA swaps applied at this boundary."""
    control: Any = None
    """The chunk's control for the pipeline's encoder (``None``: none)."""


@dataclass
class _Commands:
    """What rank 0 hands every rank before a chunk: swaps, switches and controls."""

    lora_swaps: list[LoRASwapReceipt] = field(default_factory=list)
    switches: list[SwitchReceipt] = field(default_factory=list)
    controls: dict[int, Any] = field(default_factory=dict)


class Session:
    """One rollout over a loaded pipeline; see the module docstring."""

    def __init__(
        self,
        pipeline: Any,
        *,
        prompt: str,
        height: int | None = None,
        width: int | None = None,
        image: torch.Tensor | None = None,
        seed: int | None = None,
        negative_prompt: str | None = None,
        timeline: list[PromptSwitch] | None = None,
        switch_mode: SwitchMode = "recache",
        decode: bool = True,
        writer: FrameWriter | None = None,
        check_finite: bool = True,
        command_group: Any = None,
        session_id: int = 0,
    ) -> None:
        _check_prompt(prompt)
        _check_mode(switch_mode)
        self.pipeline = pipeline
        self.session_id = session_id
        """Identifier used in messages (the manager numbers its sessions)."""
        self.decode = decode
        self.switch_mode: SwitchMode = switch_mode
        self.negative_prompt: str | None = None
        """The CFG negative prompt set through the session (``None``: the pipeline's)."""
        self.command_group = command_group
        self.telemetry = SessionTelemetry()
        self._opened_s = time.perf_counter()
        self._controls: dict[int, Any] = {}
        self._scheduled: dict[int, list[SwitchReceipt]] = {}
        self._lora_swaps: list[LoRASwapReceipt] = []
        # set by SessionManager: () -> ids of the sessions open over the same model
        self._open_session_ids: Callable[[], Any] | None = None
        self._next_chunk = 0
        self._closed = False
        if negative_prompt is not None:
            self.switch_prompt(None, negative_prompt=negative_prompt)
        for entry in timeline or []:
            if entry.chunk == 0:
                prompt = entry.prompt
            else:
                self._schedule_switch(entry.prompt, None, switch_mode, entry.chunk)
        self.sink = ReturningSink(writer, decode=decode, check_finite=check_finite)
        self.stream = StreamingSession.open(
            pipeline,
            self.sink,
            text=[prompt],
            image=image,
            height=height,
            width=width,
            keep_encoders=True,
            stats=RolloutStats(prompt=prompt),
            check_finite=check_finite,
        )
        model = pipeline.diffusion_model
        self.generator = torch.Generator(device=model.device)
        """The generator this session's noise is drawn from."""
        if seed is None:
            # After initialize_cache, which may draw from the global generator (as offline).
            self.generator.set_state(_noise_state(model))
        else:
            self.generator.manual_seed(seed)
        self.stream.cache.transformer_cache.noise_generators = [self.generator]
        self.prompt = prompt
        """The prompt the next chunk is generated under (after pending switches, once applied)."""

    @classmethod
    def open(cls, pipeline: Any, **options: Any) -> Session:
        """``Session.open(pipeline, prompt=..., ...)``: the same as the constructor."""
        return cls(pipeline, **options)

    # ------------------------------------------------------------------ requests
    @property
    def next_chunk(self) -> int:
        """Index of the chunk the next :meth:`step` generates (= chunks generated)."""
        return self._next_chunk

    @property
    def closed(self) -> bool:
        return self._closed

    def switch_prompt(
        self,
        prompt: str | None,
        *,
        negative_prompt: str | None = None,
        mode: SwitchMode | None = None,
    ) -> SwitchReceipt:
        """Ask for a prompt (and / or negative prompt) switch at the next chunk boundary."""
        self._check_open()
        if prompt is None and negative_prompt is None:
            raise ValueError("switch_prompt needs a prompt or a negative_prompt, got neither")
        if prompt is not None:
            _check_prompt(prompt)
        if negative_prompt is not None:
            _check_prompt(negative_prompt, what="negative prompt")
        mode = self.switch_mode if mode is None else mode
        _check_mode(mode)
        return self._schedule_switch(prompt, negative_prompt, mode, self._next_chunk)

    def control(self, chunk: int, data: Any) -> None:
        """Deliver ``data`` to the pipeline's encoder as the ``input`` of AR step ``chunk``."""
        self._check_open()
        if chunk < self._next_chunk:
            raise ValueError(
                f"session {self.session_id}: control for chunk {chunk}, which was already "
                f"generated (the next chunk is {self._next_chunk})"
            )
        self._controls[chunk] = data

    def swap_loras(
        self,
        change: list[LoRAConfig | LoRAAdapter | str | Path] | Callable[[Any], None],
        *,
        mode: SwitchMode | None = None,
    ) -> LoRASwapReceipt:
        """Ask for a LoRA adapter swap at the next chunk boundary.

        ``change`` is either a list of adapters (:class:`LoRAConfig`, ``.safetensors`` paths
        or read :class:`LoRAAdapter`; ``[]`` removes every adapter) that replaces the whole
        set (``WanLoRAs.replace``; for Wan 2.2 each expert's set), or a callable
        ``change(transformer)`` that changes the sets itself (e.g. per expert, or
        ``transformer.loras.set_strength("style", 0.3)``). Under ``command_group`` the
        request is made on rank 0 and sent to every rank (pickled): give a module-level
        function or a ``functools.partial``, not a lambda.

        At the boundary every rank changes the adapters, then, when the old or the new
        adapters touch the text key-value path (``touches_context_projections``), encodes
        the current prompt (and under CFG the negative prompt) again and rewrites the
        cross-attention K/V; ``mode="recache"`` (default: the session's ``switch_mode``)
        also recomputes the self-attention K/V of the kept chunks under the new weights,
        so the next chunk equals a fresh session started with the new adapters on the same
        history; ``"none"`` keeps them as computed under the old adapters. Swaps are
        applied before the prompt switches of the same boundary. The image K/V of I2V
        pipelines with an image encoder are not recomputed: adapters on ``k_img`` /
        ``v_img`` / ``img_emb`` are not supported live.

        The adapters live on the model, which every session over the pipeline shares: a
        swap changes the chunks of every session. Under a :class:`SessionManager` a swap
        is refused while more than one session is open. A swap that fails (e.g. an adapter
        file that cannot be read) raises from the next :meth:`step` on every rank, leaves
        the adapters as they were and is dropped; that step generates nothing, and the
        boundary's prompt switches and controls wait for the next one.
        """
        self._check_open()
        mode = self.switch_mode if mode is None else mode
        _check_mode(mode)
        if not callable(change):
            if isinstance(change, str | Path) or not isinstance(change, list | tuple):
                raise ValueError(
                    f"swap_loras takes a list of adapters (LoRAConfig, path or LoRAAdapter) "
                    f"or a callable change(transformer), got {type(change).__name__}"
                )
            change = list(change)
        self._check_alone()
        receipt = LoRASwapReceipt(change=change, mode=mode, received_at_chunk=self._next_chunk)
        self._lora_swaps.append(receipt)
        return receipt

    def _check_alone(self) -> None:
        if self._open_session_ids is None:
            return
        open_ids = sorted(self._open_session_ids())
        if len(open_ids) > 1:
            raise ValueError(
                f"session {self.session_id}: cannot swap LoRA adapters while {len(open_ids)} "
                f"sessions are open ({open_ids}): the adapters live on the model every session "
                "shares; close the other sessions first"
            )

    def _schedule_switch(
        self, prompt: str | None, negative_prompt: str | None, mode: SwitchMode, chunk: int
    ) -> SwitchReceipt:
        receipt = SwitchReceipt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            mode=mode,
            received_at_chunk=self._next_chunk,
        )
        self._scheduled.setdefault(chunk, []).append(receipt)
        return receipt

    # ---------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> ChunkResult:
        """Apply what is due at this boundary, then generate, decode and commit one chunk."""
        boundary = self.begin_step()
        return self.finish_step(boundary, self.stream.step(boundary.control))

    def begin_step(self) -> Boundary:
        """First half of :meth:`step`: apply what is due at this chunk boundary (LoRA swaps,
        prompt switches) and take the chunk's control. The chunk itself is then generated
        alone (``stream.step``) or batched with other sessions (:class:`SessionManager`)."""
        self._check_open()
        index = self._next_chunk
        commands = self._broadcast(self._take_commands(index))
        if commands.lora_swaps:
            try:
                self._apply_lora_swaps(commands.lora_swaps, index)
            except BaseException:
                # the failed swap is dropped; this boundary's switches and controls wait
                self._scheduled.setdefault(index, [])[:0] = commands.switches
                self._controls = commands.controls | self._controls
                raise
        switches = commands.switches
        if switches:
            self._apply_switches(switches, index)
        self._controls.update(commands.controls)
        control = self._controls.pop(index, None)
        return Boundary(
            index=index,
            switches=switches,
            lora_swaps=commands.lora_swaps,
            control=control,
        )

    def finish_step(self, boundary: Boundary, stats: ChunkStats) -> ChunkResult:
        """Second half of :meth:`step`, once the chunk was generated, delivered and committed:
        receipts, telemetry and the result."""
        index = boundary.index
        switches = boundary.switches
        self._next_chunk = index + 1
        chunk = self.sink.last
        assert chunk is not None and chunk.index == index
        delivered_at = self.sink.delivered_at
        for receipt in [*switches, *boundary.lora_swaps]:
            receipt.first_frame_s = delivered_at
        self.telemetry.record_chunk(
            denoise_s=stats.generate_s + stats.finalize_s,
            decode_s=stats.decode_s or 0.0,
            first_frame_s=delivered_at - self._opened_s if index == 0 else None,
            cache_bytes=self.cache_bytes(),
        )
        if self.sink.writer is not None:
            self.telemetry.record_write(stats.write_s)
        for receipt in switches:
            self.telemetry.record_switch(receipt)
        return ChunkResult(
            index=index,
            latent=chunk.latent,
            video=chunk.video,
            switches=switches,
            lora_swaps=boundary.lora_swaps,
        )

    def _take_commands(self, index: int) -> _Commands:
        commands = _Commands(
            lora_swaps=self._lora_swaps,
            switches=self._scheduled.pop(index, []),
            controls=self._controls,
        )
        self._lora_swaps = []
        self._controls = {}
        return commands

    def _broadcast(self, commands: _Commands) -> _Commands:
        """Rank 0's commands on every rank of ``command_group`` (no-op without one)."""
        if self.command_group is None:
            return commands
        import torch.distributed as dist

        payload = [commands]
        source = dist.get_global_rank(self.command_group, 0)
        dist.broadcast_object_list(payload, src=source, group=self.command_group)
        return payload[0]

    def _apply_switches(self, switches: list[SwitchReceipt], index: int) -> None:
        prompts = [receipt.prompt for receipt in switches if receipt.prompt is not None]
        negatives = [r.negative_prompt for r in switches if r.negative_prompt is not None]
        recache = any(receipt.mode == "recache" for receipt in switches)
        self.stream.switch_prompt(
            [prompts[-1]] if prompts else None,
            negative_prompt=negatives[-1] if negatives else None,
            recache=recache,
        )
        if prompts:
            self.prompt = prompts[-1]
        if negatives:
            self.negative_prompt = negatives[-1]
        applied = time.perf_counter()
        for receipt in switches:
            receipt.applied_at_chunk = index
            receipt.applied_s = applied

    def _apply_lora_swaps(self, swaps: list[LoRASwapReceipt], index: int) -> None:
        """Change the adapters swap by swap, then re-encode / re-cache once for those done
        (also when a later swap fails: its error is raised after)."""
        self._check_alone()
        transformer = self.pipeline.transformer
        sets = _lora_sets(transformer)
        touched_context = any(loras.touches_context_projections for loras in sets)
        done: list[LoRASwapReceipt] = []
        try:
            for swap in swaps:
                if callable(swap.change):
                    swap.change(transformer)
                else:
                    for loras in sets:  # experts of one architecture: all or none fail
                        loras.replace(swap.change)
                done.append(swap)
        finally:
            if done:
                touched_context |= any(loras.touches_context_projections for loras in sets)
                self._refresh_after_swap(touched_context, any(s.mode == "recache" for s in done))
                applied = time.perf_counter()
                names = [name for loras in sets for name in loras.names]
                for swap in done:
                    swap.applied_at_chunk = index
                    swap.applied_s = applied
                    swap.adapters = names

    def _refresh_after_swap(self, touched_context: bool, recache: bool) -> None:
        """Text K/V under the new weights (when the text path changed), history re-cached."""
        if not (touched_context or recache):
            return
        negative = None
        if touched_context and self.pipeline.transformer.guidance_scale > 1.0:
            negative = self.negative_prompt
            if negative is None:
                negative = self.pipeline.config.negative_prompt
        self.pipeline.switch_prompt(
            self.cache,
            [self.prompt] if touched_context else None,
            negative_prompt=negative,
            recache=recache,
        )

    # ------------------------------------------------------------------- closing
    @property
    def cache(self) -> Any:
        """The pipeline caches of this session's rollout (``None`` once closed)."""
        return self.stream.cache

    @property
    def stats(self) -> RolloutStats:
        """The rollout's stats (per chunk; prompt switches), as the offline runner keeps them."""
        return self.stream.stats

    def cache_bytes(self) -> int:
        """Bytes of the session's transformer caches (self-attention K/V and kept latents)."""
        if self.cache is None:
            return 0
        return self.cache.transformer_cache.storage_bytes()

    def close(self) -> None:
        """Close the writer (a saved video plays) and free the session's caches; later
        calls raise. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.stream.close()
        self.stream.cache = None

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(
                f"session {self.session_id} is closed (after {self._next_chunk} chunks); "
                "open a new session"
            )


def _check_prompt(prompt: Any, what: str = "prompt") -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"cannot switch to an empty {what}: {prompt!r}")


def _check_mode(mode: str) -> None:
    if mode not in SWITCH_MODES:
        raise ValueError(f"switch mode must be one of {SWITCH_MODES}, got {mode!r}")


def _lora_sets(transformer: Any) -> list[WanLoRAs]:
    """The LoRA sets of a transformer: its ``loras``, or each Wan 2.2 expert's."""
    if hasattr(transformer, "loras"):
        return [transformer.loras]
    experts = ("transformer_high_noise", "transformer_low_noise")
    if all(hasattr(transformer, expert) for expert in experts):
        return [getattr(transformer, expert).loras for expert in experts]
    raise ValueError(f"{type(transformer).__name__} takes no LoRA adapters")


def _noise_state(model: Any) -> torch.Tensor:
    """State of the generator the diffusion model draws from: its own, else the global one."""
    if model.rng is not None:
        return model.rng.get_state()
    device = model.device
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_noise_state(model: Any, state: torch.Tensor) -> None:
    if model.rng is not None:
        model.rng.set_state(state)
    elif model.device.type == "cuda":
        torch.cuda.set_rng_state(state, model.device)
    else:
        torch.set_rng_state(state)
