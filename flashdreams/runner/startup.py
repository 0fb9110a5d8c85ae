"""Time to first frame, itemised: where a run's start-up time goes.

A :class:`StartupClock` is started when the launcher's job begins; each phase
marks its end (``clock.mark("config")``). Times are seconds on one clock
whose zero is the start of the process, read from ``/proc`` on Linux (zero is
the clock's own start elsewhere, and ``launch_s`` is then unknown).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``), ``None`` where unknown."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            # Field 22 (starttime, clock ticks after boot) follows the ")" that closes the
            # command name, which may itself hold spaces.
            fields = stat.read().rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])
        with open("/proc/uptime", encoding="ascii") as uptime:
            uptime_s = float(uptime.read().split()[0])
        return max(0.0, uptime_s - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def dynamo_compile_s() -> float:
    """Seconds ``torch.compile`` spent compiling so far in this process (0 without it)."""
    if "torch._dynamo" not in sys.modules:  # never imported: nothing was compiled
        return 0.0
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))


@dataclass
class StartupClock:
    """Phase ends of a run's start-up, in seconds since the process started."""

    origin: float = field(default_factory=time.perf_counter)
    """``time.perf_counter()`` at the process start (estimated from its age)."""
    launch_known: bool = True
    """Whether the process start is known (else the clock starts at :meth:`begin`)."""
    marks: dict[str, float] = field(default_factory=dict)
    """Phase name -> seconds since the process start at its end, in order."""

    @classmethod
    def begin(cls) -> StartupClock:
        """A clock whose zero is the process start; marks ``launch`` (now)."""
        now = time.perf_counter()
        age = process_age_s()
        clock = cls(origin=now - (age or 0.0), launch_known=age is not None)
        if age is not None:
            clock.marks["launch"] = age
        return clock

    def now(self) -> float:
        """Seconds since the process start."""
        return time.perf_counter() - self.origin

    def mark(self, phase: str) -> None:
        """``phase`` ends now."""
        self.marks[phase] = self.now()

    def durations(self) -> dict[str, float]:
        """``{phase}_s``: each phase's own seconds (from the previous mark)."""
        previous = 0.0 if self.launch_known else None
        out: dict[str, float] = {}
        for phase, at in self.marks.items():
            if previous is not None:
                out[f"{phase}_s"] = at - previous
            previous = at
        return out


def startup_report(
    clock: StartupClock,
    *,
    component_load_s: dict[str, float],
    first_chunk_s: float,
    first_frame_at_s: float,
    compile_s: float,
    cuda_graph_capture_s: float,
) -> dict[str, Any]:
    """The ``startup`` section of ``stats.json``.

    ``first_chunk_s`` runs from the start of the first rollout to its first chunk on
    disk; it includes the one-shot encoders' load (also listed under
    ``component_load_s``) and the first compilation (also under ``compile_s``).
    """
    report: dict[str, Any] = dict(clock.durations())
    report["component_load_s"] = dict(component_load_s)
    report["compile_s"] = compile_s
    report["cuda_graph_capture_s"] = cuda_graph_capture_s
    report["first_chunk_s"] = first_chunk_s
    report["time_to_first_frame_s"] = first_frame_at_s if clock.launch_known else None
    return report
