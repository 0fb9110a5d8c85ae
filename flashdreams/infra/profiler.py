"""Per-stage timing: CUDA events on GPU, a wall clock on CPU."""

from __future__ import annotations

import time

import torch


class EventProfiler:
    """Records named stage boundaries and reports each stage's duration in ms.

    The first :meth:`record` measures from construction. On CUDA, events are
    queued on the current stream and read in :meth:`sync_and_summarize`,
    which synchronizes once; on CPU, ``time.perf_counter`` is used.
    """

    def __init__(self, use_cuda: bool | None = None) -> None:
        self.use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
        self._stages: list[str] = []
        if self.use_cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._marks: list = [start]
        else:
            self._marks = [time.perf_counter()]

    def record(self, stage: str) -> None:
        """Close the stage called ``stage`` at the current point in time."""
        if self.use_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())
        self._stages.append(stage)

    def sync_and_summarize(self) -> dict[str, float]:
        """Return ``{stage: ms}`` in record order; repeated stage names are summed."""
        summary: dict[str, float] = {}
        if self.use_cuda:
            self._marks[-1].synchronize()
        for i, stage in enumerate(self._stages):
            start, end = self._marks[i], self._marks[i + 1]
            if self.use_cuda:
                elapsed_ms = float(start.elapsed_time(end))
            else:
                elapsed_ms = (end - start) * 1000.0
            summary[stage] = summary.get(stage, 0.0) + elapsed_ms
        return summary
