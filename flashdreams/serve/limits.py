"""What a client may ask of ``flashdreams-serve`` (light: no torch, for ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass

CLIENT_COMMANDS = ("start", "prompt", "control", "pause", "resume", "stop")
"""``type`` of every client -> server message."""

TOKEN_ENV = "FLASHDREAMS_SERVE_TOKEN"
"""Environment variable holding the access token (same as ``--token``)."""


@dataclass
class ServeLimits:
    """What one client may ask for; each refusal names the limit."""

    max_sessions: int = 8
    """Concurrent sessions of the server."""
    max_message_bytes: int = 8 * 1024 * 1024
    """Size of one client message (a ``start`` with a base64 image included)."""
    max_prompt_chars: int = 2000
    """Characters of a prompt."""
    max_pixels: int = 832 * 480
    """``height * width`` of a session."""
    max_chunks: int = 100_000
    """Chunks of one session (``num_chunks``; a session without it ends there)."""
    max_queued_frames: int = 64
    """Frames waiting for a slow client before the oldest chunks are dropped."""
    disconnect_grace_s: float = 1.0
    """Seconds after a client disconnects before its session is closed and its caches freed."""
