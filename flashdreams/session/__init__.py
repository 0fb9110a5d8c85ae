"""Streaming sessions: one rollout stepped chunk by chunk (generate -> sink -> finalize).

See :mod:`flashdreams.session.loop` for the loop and :mod:`flashdreams.session.sinks`
for where chunks go; :mod:`flashdreams.session.timeline` for prompt timelines. The
offline runner and interactive callers drive the same loop.
"""

from flashdreams.session.checks import NonFiniteOutputError, check_finite
from flashdreams.session.loop import RolloutProgress, SessionPipeline, StreamingSession
from flashdreams.session.manager import SessionManager
from flashdreams.session.session import ChunkResult, LoRASwapReceipt, Session, SwitchReceipt
from flashdreams.session.sinks import (
    BackgroundDecodeSink,
    ChunkSink,
    FrameWriter,
    InlineDecodeSink,
    ProducedChunk,
)
from flashdreams.session.stats import ChunkStats, RolloutStats
from flashdreams.session.telemetry import SessionTelemetry
from flashdreams.session.timeline import (
    PromptSwitch,
    parse_prompt_timeline,
    read_prompt_timeline_file,
)
from flashdreams.session.worker import BackgroundChunkWorker, ChunkDecodeError

__all__ = [
    "BackgroundChunkWorker",
    "BackgroundDecodeSink",
    "ChunkDecodeError",
    "ChunkResult",
    "ChunkSink",
    "ChunkStats",
    "FrameWriter",
    "InlineDecodeSink",
    "LoRASwapReceipt",
    "NonFiniteOutputError",
    "ProducedChunk",
    "PromptSwitch",
    "RolloutProgress",
    "RolloutStats",
    "Session",
    "SessionManager",
    "SessionPipeline",
    "SessionTelemetry",
    "StreamingSession",
    "SwitchReceipt",
    "check_finite",
    "parse_prompt_timeline",
    "read_prompt_timeline_file",
]
