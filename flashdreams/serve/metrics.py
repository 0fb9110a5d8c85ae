"""Server metrics in the Prometheus text format (``GET /metrics``)."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds (seconds) of the chunk-latency and time-to-first-frame histograms."""


@dataclass
class Histogram:
    """A cumulative Prometheus histogram."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.total}")
        out.append(f"{name}_count {self.count}")
        return out


class ServeMetrics:
    """Counters, gauges and histograms of one server; updated from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.open_sessions = 0
        self.cache_bytes = 0
        self.sessions_started = 0
        self.sessions_ended: dict[str, int] = {}
        self.chunks = 0
        self.frames_sent = 0
        self.frames_dropped = 0
        self.errors = 0
        self.chunk_latency = Histogram()
        self.time_to_first_frame = Histogram()

    def set_open_sessions(self, count: int, cache_bytes: int) -> None:
        with self._lock:
            self.open_sessions, self.cache_bytes = count, cache_bytes

    def session_started(self) -> None:
        with self._lock:
            self.sessions_started += 1

    def session_ended(self, reason: str) -> None:
        with self._lock:
            self.sessions_ended[reason] = self.sessions_ended.get(reason, 0) + 1

    def chunk_done(self, seconds: float, first_frame_s: float | None) -> None:
        with self._lock:
            self.chunks += 1
            self.chunk_latency.observe(seconds)
            if first_frame_s is not None:
                self.time_to_first_frame.observe(first_frame_s)

    def frames(self, *, sent: int = 0, dropped: int = 0) -> None:
        with self._lock:
            self.frames_sent += sent
            self.frames_dropped += dropped

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        prefix = "flashdreams_serve"
        with self._lock:
            lines = [
                f"# HELP {prefix}_active_sessions Sessions open now.",
                f"# TYPE {prefix}_active_sessions gauge",
                f"{prefix}_active_sessions {self.open_sessions}",
                f"# HELP {prefix}_cache_bytes Transformer cache bytes of the open sessions.",
                f"# TYPE {prefix}_cache_bytes gauge",
                f"{prefix}_cache_bytes {self.cache_bytes}",
                f"# HELP {prefix}_sessions_started_total Sessions opened.",
                f"# TYPE {prefix}_sessions_started_total counter",
                f"{prefix}_sessions_started_total {self.sessions_started}",
                f"# HELP {prefix}_sessions_ended_total Sessions ended, by reason.",
                f"# TYPE {prefix}_sessions_ended_total counter",
                *(
                    f'{prefix}_sessions_ended_total{{reason="{reason}"}} {count}'
                    for reason, count in sorted(self.sessions_ended.items())
                ),
                f"# HELP {prefix}_chunks_total Chunks generated.",
                f"# TYPE {prefix}_chunks_total counter",
                f"{prefix}_chunks_total {self.chunks}",
                f"# HELP {prefix}_frames_sent_total Frames sent to clients.",
                f"# TYPE {prefix}_frames_sent_total counter",
                f"{prefix}_frames_sent_total {self.frames_sent}",
                f"# HELP {prefix}_frames_dropped_total Frames dropped for clients that fell behind.",
                f"# TYPE {prefix}_frames_dropped_total counter",
                f"{prefix}_frames_dropped_total {self.frames_dropped}",
                f"# HELP {prefix}_errors_total Error messages sent to clients.",
                f"# TYPE {prefix}_errors_total counter",
                f"{prefix}_errors_total {self.errors}",
                f"# HELP {prefix}_chunk_latency_seconds Seconds to generate and decode a chunk.",
                f"# TYPE {prefix}_chunk_latency_seconds histogram",
                *self.chunk_latency.lines(f"{prefix}_chunk_latency_seconds"),
                f"# HELP {prefix}_time_to_first_frame_seconds Seconds from start to the first chunk.",
                f"# TYPE {prefix}_time_to_first_frame_seconds histogram",
                *self.time_to_first_frame.lines(f"{prefix}_time_to_first_frame_seconds"),
            ]
        return "\n".join(lines) + "\n"
