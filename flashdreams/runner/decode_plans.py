"""Decode plans of a run (``parallel.decode``): which ranks turn each chunk's latent into pixels.

- ``rank0`` (default): the rank holding the gathered latent decodes the whole frame
  while the others wait (``runner.overlap_decode`` moves that decode onto a
  background thread of rank 0).
- ``parallel``: every rank decodes one row slab of each frame
  (:class:`~flashdreams.infra.decoder.row_parallel.RowParallelDecoder`, exact);
  rank 0 assembles the pixels and writes them. Each rank's decoder activations
  scale with its slab, so rank 0 no longer needs memory for a whole-frame decode.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from flashdreams.session.checks import check_finite
from flashdreams.session.sinks import (
    FrameCheck,
    FrameWriter,
    InlineDecodeSink,
    ProducedChunk,
    _control_argument,
)

PARALLEL_DECODE_WITH_OVERLAP = (
    "parallel.decode=parallel decodes on every rank in step with the DiT; "
    "runner.overlap_decode=true decodes on a background thread of rank 0. "
    "Choose one: drop runner.overlap_decode or use parallel.decode=rank0"
)


def broadcast_latent(
    latent: torch.Tensor | None, *, src: int, group: dist.ProcessGroup | None, device: Any
) -> torch.Tensor:
    """``latent`` of rank ``src`` on every rank of ``group`` (shape and dtype sent first)."""
    header = [None if latent is None else (tuple(latent.shape), latent.dtype)]
    dist.broadcast_object_list(header, src=src, group=group)
    assert header[0] is not None, f"rank {src} holds no latent to broadcast"
    shape, dtype = header[0]
    if latent is None:
        latent = torch.empty(shape, dtype=dtype, device=device)
    else:
        latent = latent.contiguous()
    dist.broadcast(latent, src=src, group=group)
    return latent


class ParallelChunkDecoder:
    """``parallel.decode=parallel`` for one rollout: every rank decodes a row slab of each chunk.

    Called on every rank with what ``generate_latent`` returned there (the latent on
    the source rank, ``None`` elsewhere); returns the chunk's video on rank ``src``
    and ``None`` on the others.
    """

    def __init__(
        self, decoder: Any, *, group: dist.ProcessGroup | None = None, src: int = 0
    ) -> None:
        from flashdreams.infra.decoder.row_parallel import RowParallelDecoder

        if decoder is None:
            raise ValueError("parallel.decode=parallel needs a pipeline with a decoder")
        self.group = group
        self.src = src
        self.device = next(decoder.parameters()).device
        self.row_decoder = RowParallelDecoder(decoder, group, dst=src)
        self.cache = self.row_decoder.initialize_autoregressive_cache()

    def __call__(
        self, latent: torch.Tensor | None, autoregressive_index: int
    ) -> torch.Tensor | None:
        latent = broadcast_latent(latent, src=self.src, group=self.group, device=self.device)
        return self.row_decoder(latent, autoregressive_index, self.cache)


class RowParallelDecodeSink(InlineDecodeSink):
    """The session sink of ``parallel.decode=parallel``: generate the latent, then every rank
    decodes a row slab of it (collective); the writing rank writes the assembled frames."""

    def __init__(
        self,
        writer: FrameWriter | None,
        decoder: Any,
        *,
        check_finite: bool = True,
        frame_check: FrameCheck | None = None,
    ) -> None:
        super().__init__(writer, check_finite=check_finite, frame_check=frame_check)
        if not getattr(decoder, "supports_row_slabs", False):
            raise ValueError(
                "parallel.decode=parallel needs a decoder that decodes row slabs (the Wan "
                f"2.1 / 2.2 VAE, TAEHV); this pipeline's is {type(decoder).__name__}"
            )
        self.chunk_decoder = ParallelChunkDecoder(decoder)

    def produce(self, pipeline: Any, index: int, cache: Any, control: Any = None) -> ProducedChunk:
        latent = pipeline.generate_latent(index, cache, *_control_argument(control))
        video = self.chunk_decoder(latent, index)  # every rank: its slab; rank 0: the frame
        return ProducedChunk(
            index=index,
            local_latent=pipeline.clean_latent(cache),
            latent=latent,
            latent_gathered=True,
            video=video,
        )


# ---- parallel.decode=dedicated ----------------------------------------------------------------

DEDICATED_DECODE_WITH_OVERLAP = (
    "parallel.decode=dedicated already decodes chunk i on its own rank while the DiT ranks "
    "run chunk i+1 (what runner.overlap_decode=true does on a background thread of rank 0). "
    "Choose one: drop runner.overlap_decode or use parallel.decode=rank0"
)
DEDICATED_DECODE_WITH_QUALITY_CHECK = (
    "runner.quality_check=true compares decoded chunks on rank 0, which does not decode "
    "under parallel.decode=dedicated. Choose one: drop runner.quality_check or use "
    "parallel.decode=rank0"
)


def decode_plan_conflict(decode: str, runner: Any) -> str | None:
    """The refusal of a decode plan that conflicts with the runner's settings, or ``None``."""
    if decode == "parallel" and runner.overlap_decode:
        return PARALLEL_DECODE_WITH_OVERLAP
    if decode == "dedicated" and runner.overlap_decode:
        return DEDICATED_DECODE_WITH_OVERLAP
    if decode == "dedicated" and runner.quality_check:
        return DEDICATED_DECODE_WITH_QUALITY_CHECK
    return None


_JOIN_STEP_S = 0.1
"""Longest uninterrupted step of a thread waiting for a :class:`DecodeLink` header."""
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MAX_DIMS = 8


class DecodeLink:
    """Point-to-point messages between the output rank and the decode rank (``dedicated``).

    Every message is a fixed-size int64 header, then (for a chunk) the tensor::

        header = [kind, signal, microseconds, dtype index, ndim, *shape (8 slots)]

    ``kind`` is :attr:`CHUNK` (a tensor follows), :attr:`END` (the rollout finished) or
    :attr:`STOP` (the rollout stopped early; ``signal`` is the stop signal, 0 for a
    failure). Going back, ``signal`` carries a stop signal the decode rank received and
    ``microseconds`` its decode time. Only ``send`` / ``recv`` of whole tensors on the
    rank's device: safe with NCCL as with gloo.

    Each header is received on a short-lived helper thread while the calling thread
    waits in interruptible steps: a stop request (a peer's failure notice, a second
    signal) raises at once even when the peer is gone or silent, where a blocking receive
    would hold the thread (from a dead NCCL peer for ever; from a silent gloo peer until
    its process ends).
    """

    CHUNK, END, STOP = 1, 2, 3

    def __init__(self, peer: int, device: Any) -> None:
        self.peer = peer
        self.device = device

    def send(
        self,
        kind: int,
        tensor: torch.Tensor | None = None,
        *,
        signal: int = 0,
        microseconds: int = 0,
    ) -> None:
        shape = () if tensor is None else tuple(tensor.shape)
        dtype_index = 0 if tensor is None else _DTYPES.index(tensor.dtype)
        assert len(shape) <= _MAX_DIMS, shape
        slots = [*shape, *([0] * (_MAX_DIMS - len(shape)))]
        header = torch.tensor(
            [kind, signal, microseconds, dtype_index, len(shape), *slots],
            dtype=torch.int64,
            device=self.device,
        )
        dist.send(header, dst=self.peer)
        if tensor is not None:
            dist.send(tensor.contiguous(), dst=self.peer)

    def recv(self) -> tuple[int, torch.Tensor | None, int, int]:
        """``(kind, tensor or None, signal, microseconds)``."""
        kind, signal, microseconds, dtype_index, ndim, *slots = self._receive_header()
        tensor = None
        if kind == self.CHUNK:
            tensor = torch.empty(slots[:ndim], dtype=_DTYPES[dtype_index], device=self.device)
            dist.recv(tensor, src=self.peer)
        return kind, tensor, signal, microseconds

    def _receive_header(self) -> list[int]:
        header = torch.empty(5 + _MAX_DIMS, dtype=torch.int64, device=self.device)
        outcome: list[Any] = []

        def receive() -> None:
            try:
                dist.recv(header, src=self.peer)
                outcome.append(header.tolist())
            except BaseException as error:  # noqa: BLE001 - raised on the calling thread
                outcome.append(error)

        thread = threading.Thread(target=receive, name="flashdreams-decode-link", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(_JOIN_STEP_S)  # returns when the header is in; signals raise here
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]


class DedicatedDecodeSink(InlineDecodeSink):
    """The session sink of the DiT ranks under ``parallel.decode=dedicated``.

    The output rank sends chunk ``i``'s gathered clean latent to the decode rank and
    goes on with chunk ``i + 1``; when that one is generated it first receives chunk
    ``i``'s decoded video back and writes it (the same checks and writer as the inline
    sink), so the video keeps its order and one chunk at most is in flight. The other
    DiT ranks only generate (``link`` is ``None`` there).

    A stop signal the decode rank received comes back with its next chunk and is
    recorded on this rank's stop guard (``note_stop``), so the DiT ranks stop at their
    next common stop check. At the end, :meth:`close` fetches the chunk in flight and
    sends ``END`` (after :meth:`drain`: the rollout finished) or ``STOP``.
    """

    def __init__(
        self,
        writer: FrameWriter | None,
        link: DecodeLink | None,
        *,
        stop_signal: Any = lambda: None,
        note_stop: Any = lambda signal_number: None,
        check_finite: bool = True,
        frame_check: FrameCheck | None = None,
    ) -> None:
        super().__init__(writer, check_finite=check_finite, frame_check=frame_check)
        self.link = link
        self.stop_signal = stop_signal
        self.note_stop = note_stop
        self._in_flight: tuple[int, Any] | None = None
        self._finished = False
        self._abandoned = False

    def produce(self, pipeline: Any, index: int, cache: Any, control: Any = None) -> ProducedChunk:
        latent = pipeline.generate_latent(index, cache, *_control_argument(control))
        return ProducedChunk(
            index=index,
            local_latent=pipeline.clean_latent(cache),
            latent=latent,
            latent_gathered=True,
        )

    def deliver(self, chunk: ProducedChunk, stats: Any) -> None:
        if self.link is None or chunk.latent is None:
            self.on_written(chunk.index, 0)
            return
        started = time.perf_counter()
        self._receive_in_flight()
        self.link.send(DecodeLink.CHUNK, chunk.latent)
        self._in_flight = (chunk.index, stats)
        stats.wait_s = time.perf_counter() - started

    def _receive_in_flight(self) -> None:
        """Receive the decoded chunk in flight (if any) and write it."""
        if self._in_flight is None:
            return
        index, stats = self._in_flight
        self._in_flight = None
        assert self.link is not None
        kind, video, signal_number, microseconds = self.link.recv()
        assert kind == DecodeLink.CHUNK and video is not None, kind
        if signal_number:
            self.note_stop(signal_number)
        if self.check_finite:
            check_finite(video, index)
        stats.decode_s = microseconds / 1e6
        super().deliver(ProducedChunk(index=index, local_latent=None, video=video), stats)

    def drain(self) -> float:
        started = time.perf_counter()
        self._receive_in_flight()
        self._finished = True
        return time.perf_counter() - started

    def abandon(self) -> None:
        """A peer rank failed: close without waiting for the decode rank."""
        self._abandoned = True

    def close(self) -> None:
        link = None if self._abandoned else self.link
        if link is not None:
            try:
                self._receive_in_flight()  # the chunk in flight is kept
            finally:
                self.link = None
                if self._finished:
                    link.send(DecodeLink.END)
                else:
                    link.send(DecodeLink.STOP, signal=self.stop_signal() or 0)
        super().close()


def decode_on_dedicated_rank(
    decoder: Any,
    link: DecodeLink,
    *,
    stop_signal: Any = lambda: None,
    fault_hook: Any = None,
) -> tuple[int, int, int]:
    """The decode rank's loop for one rollout: receive each chunk's latent, decode it in
    order, send the video back; returns ``(kind, signal, num_chunks)`` of the message that
    ended the rollout (``END`` or ``STOP``)."""
    from flashdreams.infra.profiler import EventProfiler

    cache = decoder.initialize_autoregressive_cache()
    index = 0
    while True:
        kind, latent, signal_number, _ = link.recv()
        if kind != DecodeLink.CHUNK:
            return kind, signal_number, index
        if fault_hook is not None:
            fault_hook(index, "write")
        timer = EventProfiler(use_cuda=latent.device.type == "cuda")
        with torch.no_grad():
            video = decoder(input=latent, autoregressive_index=index, cache=cache)
        timer.record("decode")
        decode_ms = timer.sync_and_summarize()["decode"]
        link.send(
            DecodeLink.CHUNK,
            video,
            signal=stop_signal() or 0,
            microseconds=int(decode_ms * 1000),
        )
        index += 1
