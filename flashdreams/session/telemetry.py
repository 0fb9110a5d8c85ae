"""Per-session telemetry: time to first frame, per-chunk latency percentiles, switch latency,
cache bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100, nearest rank) of ``values``; ``None`` when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class SessionTelemetry:
    """What one session measured; :meth:`summary` is the plain-data form."""

    time_to_first_frame_s: float | None = None
    """Seconds from opening the session to the first decoded chunk."""
    denoise_s: list[float] = field(default_factory=list)
    """Per chunk: denoising plus the KV-cache commit (``generate_latent`` + ``finalize``)."""
    decode_s: list[float] = field(default_factory=list)
    """Per chunk: decoding."""
    write_s: list[float] = field(default_factory=list)
    """Per chunk: writing to the sink (recorded by the caller with :meth:`record_write`)."""
    switches: list[dict[str, Any]] = field(default_factory=list)
    """Per applied switch: chunk received / applied, seconds received -> applied -> first frame."""
    cache_bytes: int = 0
    """Transformer cache bytes after the latest chunk."""

    def record_chunk(
        self, *, denoise_s: float, decode_s: float, first_frame_s: float | None, cache_bytes: int
    ) -> None:
        self.denoise_s.append(denoise_s)
        self.decode_s.append(decode_s)
        if first_frame_s is not None:
            self.time_to_first_frame_s = first_frame_s
        self.cache_bytes = cache_bytes

    def record_write(self, seconds: float) -> None:
        self.write_s.append(seconds)

    def record_switch(self, receipt: Any) -> None:
        self.switches.append(
            {
                "received_at_chunk": receipt.received_at_chunk,
                "applied_at_chunk": receipt.applied_at_chunk,
                "mode": receipt.mode,
                "apply_s": receipt.applied_s - receipt.received_s,
                "first_frame_s": receipt.first_frame_s - receipt.received_s,
            }
        )

    def summary(self) -> dict[str, Any]:
        """p50 / p95 per stage, time to first frame, switches and cache bytes."""
        stages = {"denoise": self.denoise_s, "decode": self.decode_s, "write": self.write_s}
        out: dict[str, Any] = {
            "time_to_first_frame_s": self.time_to_first_frame_s,
            "num_chunks": len(self.denoise_s),
            "cache_bytes": self.cache_bytes,
            "switches": list(self.switches),
        }
        for name, values in stages.items():
            out[f"{name}_p50_s"] = percentile(values, 50)
            out[f"{name}_p95_s"] = percentile(values, 95)
        return out
