"""One background thread that decodes and writes chunks while the main thread denoises the next.

The background sink (:class:`~flashdreams.session.sinks.BackgroundDecodeSink`,
``runner.overlap_decode=true``) hands chunk ``i``'s clean latent to a
:class:`BackgroundChunkWorker` and the session goes on with ``finalize(i)`` and
the denoising of chunk ``i + 1``. The worker runs the hand-overs one at a time, in
order (the decoder cache is sequential).

On CUDA the worker runs on its own ``torch.cuda.Stream``: each job first waits
on an event recorded on the main thread's stream when the job was handed over
(so it sees the finished latent), and the tensors handed over are marked with
``record_stream`` so the caching allocator does not give their memory to the
main stream while the worker's kernels may still read it.

A job that raises stops the worker: jobs handed over after it are skipped
(nothing is written out of order), and the main thread gets a
:class:`ChunkDecodeError` naming the AR step at its next check.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


class ChunkDecodeError(RuntimeError):
    """Decoding or writing a chunk failed in the background worker."""

    def __init__(self, autoregressive_index: int, error: BaseException) -> None:
        self.autoregressive_index = autoregressive_index
        super().__init__(
            f"AR step {autoregressive_index}: decoding or writing this chunk failed in the "
            f"background worker (runner.overlap_decode=true): {type(error).__name__}: {error}"
        )


@dataclass
class _Job:
    autoregressive_index: int
    run: Callable[[], None]
    ready_event: Any = None
    """CUDA event recorded on the main stream at hand-over (``None`` on CPU)."""


class BackgroundChunkWorker:
    """Runs chunk jobs on one background thread, in hand-over order.

    Args:
        device: device of the tensors the jobs read; on CUDA the jobs run on a
            stream of their own.
        max_pending: jobs handed over but not finished before :meth:`submit`
            blocks (bounds how far the main thread runs ahead, and the memory
            held by latents waiting to be decoded).
    """

    def __init__(self, device: Any, *, max_pending: int = 2) -> None:
        import torch

        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._free_slots = threading.Semaphore(max_pending)
        self._idle = threading.Condition()
        self._num_unfinished = 0
        self._failure: ChunkDecodeError | None = None
        self._thread = threading.Thread(
            target=self._work, name="flashdreams-chunk-worker", daemon=True
        )
        self._thread.start()

    # ---- main thread ------------------------------------------------------------------

    def submit(
        self,
        autoregressive_index: int,
        run: Callable[[], None],
        tensors: Sequence[Any] = (),
    ) -> float:
        """Hand ``run`` over; returns the seconds spent waiting for a free slot.

        ``tensors`` are the device tensors ``run`` reads (kept safe from reuse
        on CUDA). Raises :class:`ChunkDecodeError` when an earlier job failed.
        """
        import torch

        self.raise_if_failed()
        started = time.perf_counter()
        self._free_slots.acquire()
        waited_s = time.perf_counter() - started
        if self._failure is not None:
            self._free_slots.release()
            self.raise_if_failed()
        ready_event = None
        if self.stream is not None:
            ready_event = torch.cuda.Event()
            ready_event.record(torch.cuda.current_stream(self.device))
            for tensor in tensors:
                tensor.record_stream(self.stream)
        with self._idle:
            self._num_unfinished += 1
        self._jobs.put(_Job(autoregressive_index, run, ready_event))
        return waited_s

    def raise_if_failed(self) -> None:
        """Raise the worker's :class:`ChunkDecodeError`, if a job failed."""
        failure = self._failure
        if failure is not None:
            raise failure

    @property
    def failed_autoregressive_index(self) -> int | None:
        """AR step whose job failed, ``None`` while none did."""
        return None if self._failure is None else self._failure.autoregressive_index

    def drain(self) -> float:
        """Wait until every job handed over has finished or been skipped; returns the seconds waited."""
        started = time.perf_counter()
        with self._idle:
            while self._num_unfinished > 0:
                self._idle.wait()
        return time.perf_counter() - started

    def close(self) -> None:
        """Finish the jobs handed over, then stop the thread. Idempotent."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    # ---- worker thread ----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if self._failure is None:
                    self._run(job)
            except BaseException as error:  # noqa: BLE001 - handed to the main thread
                failure = ChunkDecodeError(job.autoregressive_index, error)
                failure.__cause__ = error
                self._failure = failure
            finally:
                job = None  # drop the latent now, not when the next job arrives
                self._free_slots.release()
                with self._idle:
                    self._num_unfinished -= 1
                    self._idle.notify_all()

    def _run(self, job: _Job) -> None:
        if self.stream is None:
            job.run()
            return
        import torch

        with torch.cuda.device(self.stream.device), torch.cuda.stream(self.stream):
            self.stream.wait_event(job.ready_event)
            job.run()
