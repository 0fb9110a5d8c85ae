"""Several sessions over one loaded pipeline, stepped fairly chunk by chunk."""

from __future__ import annotations

from typing import Any

from flashdreams.session.session import ChunkResult, Session


class SessionManager:
    """Holds up to ``max_sessions`` sessions over one pipeline (each with its own caches).

    :meth:`step` advances every open session by one chunk, in the order they
    were opened, so no session falls behind another. Each session's chunks
    equal what it would produce alone (its caches and noise are its own).
    ``max_cache_bytes`` adds a memory-aware limit: a new session is refused
    when the open sessions' transformer caches plus one more session's would
    exceed it (sessions of one pipeline and size hold caches of one size).
    """

    def __init__(
        self, pipeline: Any, *, max_sessions: int, max_cache_bytes: int | None = None
    ) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.pipeline = pipeline
        self.max_sessions = max_sessions
        self.max_cache_bytes = max_cache_bytes
        self.sessions: dict[int, Session] = {}
        """Open sessions by id, in the order they were opened."""
        self._next_id = 0

    def open(self, **options: Any) -> Session:
        """Open a session (``Session`` keyword options); refused past the limits."""
        if len(self.sessions) >= self.max_sessions:
            raise ValueError(
                f"too many sessions: {len(self.sessions)} open, max_sessions={self.max_sessions}; "
                "close one first"
            )
        if self.max_cache_bytes is not None and self.sessions:
            per_session = max(session.cache_bytes() for session in self.sessions.values())
            needed = per_session * (len(self.sessions) + 1)
            if needed > self.max_cache_bytes:
                raise ValueError(
                    f"not enough cache memory for another session: {len(self.sessions) + 1} "
                    f"sessions need {needed} bytes, max_cache_bytes={self.max_cache_bytes}"
                )
        session = Session(self.pipeline, session_id=self._next_id, **options)
        session._open_session_ids = self.sessions.keys  # swap_loras refuses shared swaps
        self.sessions[self._next_id] = session
        self._next_id += 1
        return session

    def get(self, session_id: int) -> Session:
        if session_id not in self.sessions:
            raise KeyError(f"no open session {session_id}; open sessions: {sorted(self.sessions)}")
        return self.sessions[session_id]

    def close(self, session_id: int) -> None:
        """Close a session and free its caches."""
        self.get(session_id).close()
        del self.sessions[session_id]

    def step(self) -> dict[int, ChunkResult]:
        """One chunk of every open session, in opening order."""
        return {session_id: session.step() for session_id, session in self.sessions.items()}

    def cache_bytes(self) -> int:
        """Transformer cache bytes of all open sessions."""
        return sum(session.cache_bytes() for session in self.sessions.values())
