"""The generation side of ``flashdreams-serve``: one thread steps every session.

Rank 0 owns the requests. Its :class:`ServeEngine` thread takes what the web
side queued (open, prompt, control, pause, resume, stop, shutdown), turns it into
one :class:`TickPlan` per chunk (sessions to open and close, the one session to
step), broadcasts the plan to the other ranks (under torchrun) and applies it.
Every rank then steps the same session, whose own prompt switches and controls
reach the other ranks inside :meth:`~flashdreams.session.Session.step`. Sessions
are stepped round-robin, one chunk per tick, so none falls behind another.

What happens to a session is reported to its :class:`SessionListener` (the web
side's client), always from the engine thread: opened, chunk (uint8 frames),
applied, ended, error. A listener must never block.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from flashdreams.session import Session, SessionManager
from flashdreams.session.frames import video_to_uint8_frames
from flashdreams.session.session import _noise_state, _set_noise_state

IDLE_HEARTBEAT_S = 1.0
"""Rank 0 broadcasts an empty plan this often while idle, so the other ranks' collective
never times out."""


class SessionListener(Protocol):
    """Where a session's events go (the web side's client of that session)."""

    def opened(self, session_id: int, info: dict[str, Any]) -> None: ...

    def chunk(self, session_id: int, message: dict[str, Any], frames: Any) -> None: ...

    def applied(self, request_id: Any, command: str, chunk: int) -> None: ...

    def ended(self, reason: str) -> None: ...

    def error(self, message: str) -> None: ...


@dataclass
class OpenSpec:
    """A session to open, the same on every rank."""

    prompt: str
    """First prompt."""
    height: int
    """Latent height."""
    width: int
    """Latent width."""
    seed: int | None
    """Per-session noise seed; ``None``: the noise an offline run of the server's config draws."""
    image: torch.Tensor | None = None
    """I2V first frame ``[1, 1, 3, H, W]`` in ``[-1, 1]`` (CPU)."""


@dataclass
class TickPlan:
    """What every rank does at one tick (rank 0 decides, the others follow)."""

    opens: list[OpenSpec] = field(default_factory=list)
    closes: list[int] = field(default_factory=list)
    step: int | None = None
    shutdown: bool = False


@dataclass
class StartRequest:
    """Rank 0: a client's ``start``."""

    listener: SessionListener
    spec: OpenSpec
    num_chunks: int | None
    """Chunks to generate; ``None``: until stopped."""
    save: bool
    """Also write a run directory under the server's output directory."""
    request_id: Any = None
    pixel_size: tuple[int, int] = (0, 0)
    """``(height, width)`` in pixels (for ``started`` and the saved config)."""
    received_s: float = field(default_factory=time.perf_counter)
    """When the server received it (time to first frame counts from here)."""


@dataclass
class SessionRequest:
    """Rank 0: a client's ``prompt`` / ``control`` / ``pause`` / ``resume`` / ``stop``."""

    session_id: int
    command: str
    request_id: Any = None
    prompt: str | None = None
    mode: str | None = None
    data: Any = None


@dataclass
class _Served:
    """Rank 0's bookkeeping of one open session."""

    listener: SessionListener
    num_chunks: int | None
    saver: Any = None
    paused: bool = False
    opened_s: float = field(default_factory=time.perf_counter)
    pending_applied: list[tuple[Any, str, int]] = field(default_factory=list)
    """Controls waiting for their chunk: (request id, command, chunk)."""
    receipts: dict[int, Any] = field(default_factory=dict)
    """``id(receipt)`` -> request id of the ``prompt`` that made it."""


class ServeEngine:
    """Steps the sessions of one loaded pipeline; see the module docstring.

    Args:
        pipeline: the loaded pipeline (every rank).
        max_sessions: concurrent sessions (the :class:`SessionManager` limit).
        rank / world_size: this process in the job; rank 0 takes requests.
        command_group: process group of the broadcasts (``None`` on one rank).
        switch_mode: default re-cache mode of a prompt switch.
        fps: frame rate announced to clients and written to saved videos.
        saver_factory: rank 0, ``saver_factory(session_id, request) -> saver`` for ``save``
            (``append(frames, latent)``, ``record_switch(...)``, ``close(status, telemetry)``).
        metrics: rank 0, the server's :class:`~flashdreams.serve.metrics.ServeMetrics`.
        warmup: ``(prompt, latent height, latent width, (pixel height, pixel width))`` of one
            cache built and dropped before
            serving: a pipeline's first ``initialize_cache`` may draw from the global generator
            (lazily built modules), as an offline run's does; afterwards every seed-less
            session starts from the state an offline run's first chunk sees, and the first
            client does not wait for the lazy work.
    """

    def __init__(
        self,
        pipeline: Any,
        *,
        max_sessions: int,
        rank: int = 0,
        world_size: int = 1,
        command_group: Any = None,
        switch_mode: str = "recache",
        fps: float = 16.0,
        saver_factory: Any = None,
        metrics: Any = None,
        warmup: tuple[str, int, int, tuple[int, int]] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.manager = SessionManager(pipeline, max_sessions=max_sessions)
        self.rank = rank
        self.world_size = world_size
        self.command_group = command_group
        self.switch_mode = switch_mode
        self.fps = fps
        self.saver_factory = saver_factory
        self.metrics = metrics
        if warmup is not None:
            self._warm_up(*warmup)
        # The noise an offline run draws from after building the pipeline and initializing
        # its first cache (seed-less sessions start from it).
        self._build_noise = _noise_state(pipeline.diffusion_model)
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._served: dict[int, _Served] = {}
        self._turns: deque[int] = deque()
        self._pending_closes: list[tuple[int, str]] = []
        self._starting: list[StartRequest] = []
        """Rank 0: the start requests behind this tick's ``plan.opens``, in order."""
        self._shutdown_requested = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        """Rank 0: the error that stopped the engine, if one did."""
        self.done = threading.Event()
        """Set once the engine stopped (every session ended)."""

    def _warm_up(self, prompt: str, height: int, width: int, pixel_size: tuple[int, int]) -> None:
        """One cache of ``prompt`` (an I2V pipeline gets a gray first frame), dropped."""
        from loguru import logger

        gray = torch.zeros(1, 1, 3, *pixel_size, device=self.pipeline.diffusion_model.device)
        for image in (None, gray):
            try:
                with torch.no_grad():
                    self.pipeline.initialize_cache(
                        [prompt], image, height=height, width=width, release_oneshot_encoders=False
                    )
                return
            except ValueError as error:  # e.g. an I2V pipeline needs a first frame
                problem = error
        logger.warning(f"no warm-up cache ({problem}); the first session does the lazy work")

    # ------------------------------------------------------------- rank 0, web side
    def submit(self, request: StartRequest | SessionRequest) -> None:
        """Queue a request (thread-safe); handled at the next chunk boundary."""
        self._inbox.put(request)

    def request_shutdown(self) -> None:
        """Finish the chunk in flight, end every session (reason ``shutdown``), stop."""
        self._shutdown_requested.set()
        self._inbox.put(None)  # wake an idle engine

    def start(self) -> None:
        """Run :meth:`serve` on a daemon thread (rank 0)."""
        self._thread = threading.Thread(target=self._serve_safely, name="flashdreams-serve-engine")
        self._thread.daemon = True
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------- the loop
    def _serve_safely(self) -> None:
        try:
            self.serve()
        except BaseException as error:  # noqa: BLE001 - reported to every client
            self.failure = error
            message = f"the server stopped: {type(error).__name__}: {error}"
            for served in self._served.values():
                served.listener.error(message)
                served.listener.ended("error")
                if served.saver is not None:
                    served.saver.close("failed", None)
            self._served.clear()
        finally:
            self.done.set()

    def serve(self) -> None:
        """Rank 0: take requests and step sessions until shutdown."""
        while True:
            plan = self._next_plan()
            self._apply(self._broadcast(plan))
            if plan.shutdown:
                return

    def follow(self) -> None:
        """Ranks > 0: apply rank 0's plans until it shuts down."""
        while True:
            plan = self._broadcast(None)
            self._apply(plan)
            if plan.shutdown:
                return

    def _broadcast(self, plan: TickPlan | None) -> TickPlan:
        if self.command_group is None:
            assert plan is not None
            return plan
        import torch.distributed as dist

        payload = [plan]
        source = dist.get_global_rank(self.command_group, 0)
        dist.broadcast_object_list(payload, src=source, group=self.command_group)
        return payload[0]

    def _next_plan(self) -> TickPlan:
        """Rank 0: handle the queued requests, then choose the next session to step."""
        plan = TickPlan()
        wait = not self._turns and not self._pending_closes
        while True:
            try:
                timeout = IDLE_HEARTBEAT_S if self.world_size > 1 else None
                request = self._inbox.get(timeout=timeout) if wait else self._inbox.get_nowait()
            except queue.Empty:
                break
            wait = False
            if request is not None:
                self._take(request, plan)
        if self._shutdown_requested.is_set():
            for session_id, served in list(self._served.items()):
                self._end(session_id, served, "shutdown")
            plan.shutdown = True
        plan.closes += [session_id for session_id, _ in self._pending_closes]
        self._pending_closes.clear()
        runnable = [sid for sid in self._turns if sid not in plan.closes]
        if runnable and not plan.shutdown:
            plan.step = runnable[0]
            self._turns.remove(plan.step)
            self._turns.append(plan.step)
        return plan

    def _take(self, request: StartRequest | SessionRequest, plan: TickPlan) -> None:
        """Rank 0: one request, before the plan is broadcast."""
        if isinstance(request, StartRequest):
            plan.opens.append(request.spec)
            self._starting.append(request)
            return
        served = self._served.get(request.session_id)
        if served is None:
            return  # ended meanwhile; the client already got ``ended``
        session = self.manager.get(request.session_id)
        try:
            self._session_request(request, session, served)
        except (ValueError, KeyError) as error:
            served.listener.error(str(error.args[0] if error.args else error))

    def _session_request(self, request: SessionRequest, session: Session, served: _Served) -> None:
        chunk = session.next_chunk
        if request.command == "prompt":
            receipt = session.switch_prompt(request.prompt, mode=request.mode)
            served.receipts[id(receipt)] = request.request_id
        elif request.command == "control":
            session.control(chunk, request.data)
            served.pending_applied.append((request.request_id, "control", chunk))
        elif request.command in ("pause", "resume"):
            served.paused = request.command == "pause"
            if served.paused and request.session_id in self._turns:
                self._turns.remove(request.session_id)
            elif not served.paused and request.session_id not in self._turns:
                self._turns.append(request.session_id)
            served.listener.applied(request.request_id, request.command, chunk)
        elif request.command in ("stop", "disconnect"):
            served.listener.applied(request.request_id, "stop", chunk)
            reason = "stopped" if request.command == "stop" else "disconnected"
            self._end(request.session_id, served, reason)

    def _end(self, session_id: int, served: _Served, reason: str) -> None:
        """Rank 0: forget a session now; every rank closes it at the next tick."""
        self._served.pop(session_id, None)
        if session_id in self._turns:
            self._turns.remove(session_id)
        self._pending_closes.append((session_id, reason))
        if served.saver is not None:
            status = "completed" if reason == "completed" else "interrupted"
            served.saver.close(status, self.manager.get(session_id))
        served.listener.ended(reason)
        if self.metrics is not None:
            self.metrics.session_ended(reason)

    # ------------------------------------------------------------- every rank
    def _apply(self, plan: TickPlan) -> None:
        for session_id in plan.closes:
            self.manager.close(session_id)
        starting, self._starting = self._starting, []
        for index, spec in enumerate(plan.opens):
            self._open(spec, starting[index] if starting else None)
        if plan.step is not None:
            try:
                self._step(plan.step)
            except Exception as error:  # noqa: BLE001 - this session fails, the others go on
                self._session_failed(plan.step, error)
        if self.metrics is not None:
            self.metrics.set_open_sessions(len(self.manager.sessions), self.manager.cache_bytes())

    def _session_failed(self, session_id: int, error: Exception) -> None:
        """A chunk of one session raised: that session ends with an ``error``; on the other
        ranks it is closed by rank 0's next plan. (A failed collective fails the next
        broadcast too, which stops the engine.)"""
        served = self._served.get(session_id)
        if served is None:
            return
        chunk = self.manager.get(session_id).next_chunk
        served.listener.error(
            f"session {session_id} failed at chunk {chunk}: {type(error).__name__}: {error}"
        )
        self._end(session_id, served, "error")

    def _open(self, spec: OpenSpec, request: StartRequest | None) -> None:
        model = self.pipeline.diffusion_model
        if spec.seed is None:
            _set_noise_state(model, self._build_noise)
        image = None if spec.image is None else spec.image.to(model.device)
        try:
            session = self.manager.open(
                prompt=spec.prompt,
                height=spec.height,
                width=spec.width,
                image=image,
                seed=spec.seed,
                switch_mode=self.switch_mode,
                command_group=self.command_group,
            )
        except (ValueError, KeyError) as error:  # the same on every rank
            if request is not None:
                request.listener.error(str(error.args[0] if error.args else error))
                request.listener.ended("error")
            return
        if request is None:
            return
        served = _Served(
            listener=request.listener, num_chunks=request.num_chunks, opened_s=request.received_s
        )
        try:
            if request.save and self.saver_factory is not None:
                served.saver = self.saver_factory(session.session_id, request)
        except (OSError, ValueError) as error:
            request.listener.error(f"save: {error}")
        self._served[session.session_id] = served
        self._turns.append(session.session_id)
        height, width = request.pixel_size
        request.listener.opened(
            session.session_id,
            {"id": request.request_id, "height": height, "width": width, "fps": self.fps,
             "num_chunks": request.num_chunks,
             "save_dir": None if served.saver is None else str(served.saver.run_dir)},
        )  # fmt: skip
        if self.metrics is not None:
            self.metrics.session_started()

    def _step(self, session_id: int) -> None:
        session = self.manager.get(session_id)
        started = time.perf_counter()
        result = session.step()
        elapsed = time.perf_counter() - started
        served = self._served.get(session_id)
        if served is None:
            return  # another rank, or a session being closed
        for receipt in result.switches:
            request_id = served.receipts.pop(id(receipt), None)
            served.listener.applied(request_id, "prompt", result.index)
            if served.saver is not None and receipt.prompt is not None:
                served.saver.record_switch(result.index, receipt.prompt, receipt.mode)
        for request_id, command, chunk in list(served.pending_applied):
            if chunk == result.index:
                served.listener.applied(request_id, command, chunk)
                served.pending_applied.remove((request_id, command, chunk))
        frames = None
        if result.video is not None:
            video = result.video
            frames = video_to_uint8_frames(video.reshape(-1, *video.shape[-4:])[0])
        telemetry = session.telemetry
        message = {
            "index": result.index,
            "num_frames": 0 if frames is None else int(frames.shape[0]),
            "timings": {
                "denoise_s": telemetry.denoise_s[-1],
                "decode_s": telemetry.decode_s[-1],
                "total_s": elapsed,
            },
        }
        if self.metrics is not None:
            first = time.perf_counter() - served.opened_s if result.index == 0 else None
            self.metrics.chunk_done(elapsed, first)
        if served.saver is not None:
            served.saver.append(frames, result.latent)
        served.listener.chunk(session_id, message, frames)
        if served.num_chunks is not None and result.index + 1 >= served.num_chunks:
            self._end(session_id, served, "completed")


def run_dir_for(root: Path, session_id: int) -> Path:
    """Where session ``session_id`` saves: ``<root>/session-<id>`` (no client text in it)."""
    return root / f"session-{session_id:04d}"
