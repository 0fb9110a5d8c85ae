"""Several sessions over one loaded pipeline, stepped fairly chunk by chunk (batched where
they can share a forward)."""

from __future__ import annotations

from typing import Any

import torch

from flashdreams.session.batch import can_batch, step_batched
from flashdreams.session.session import Boundary, ChunkResult, Session


class SessionManager:
    """Holds up to ``max_sessions`` sessions over one pipeline (each with its own caches).

    :meth:`step` advances every open session by one chunk, so no session falls
    behind another. With ``batch`` (default) the sessions whose next chunks can
    share a forward (same chunk index and latent size, no control for the
    chunk, a T2V pipeline whose transformer batches rollouts:
    :mod:`flashdreams.session.batch`) are generated as one batch of at most
    ``max_batch_size``; the others step one by one. Each session's chunks
    equal what it would produce alone (its caches and noise are its own).
    ``max_cache_bytes`` adds a memory-aware limit: a new session is refused
    when the open sessions' transformer caches plus one more session's would
    exceed it (sessions of one pipeline and size hold caches of one size; a
    batched chunk holds a second copy of its sessions' caches while it runs).
    """

    def __init__(
        self,
        pipeline: Any,
        *,
        max_sessions: int,
        max_cache_bytes: int | None = None,
        batch: bool = True,
        max_batch_size: int | None = None,
    ) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.pipeline = pipeline
        self.max_sessions = max_sessions
        self.max_cache_bytes = max_cache_bytes
        self.batch = batch
        """Generate compatible sessions' chunks as one batch (``False``: one by one)."""
        self.max_batch_size = max_batch_size
        """Most sessions in one batched forward (``None``: no limit)."""
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

    @torch.no_grad()
    def step(self) -> dict[int, ChunkResult]:
        """One chunk of every open session (results in opening order).

        Every session first applies what is due at its boundary (switches, swaps); then
        the chunks are generated, batched where they can be.
        """
        boundaries = {sid: session.begin_step() for sid, session in self.sessions.items()}
        results: dict[int, ChunkResult] = {}
        for group in self._batch_groups(boundaries):
            if len(group) == 1:
                session = self.sessions[group[0]]
                boundary = boundaries[group[0]]
                results[group[0]] = session.finish_step(
                    boundary, session.stream.step(boundary.control)
                )
                continue
            sessions = [self.sessions[sid] for sid in group]
            stats = step_batched([session.stream for session in sessions])
            for sid, session, chunk in zip(group, sessions, stats, strict=True):
                results[sid] = session.finish_step(boundaries[sid], chunk)
        return {sid: results[sid] for sid in self.sessions}

    def _batch_groups(self, boundaries: dict[int, Boundary]) -> list[list[int]]:
        """Session ids grouped for one forward each, in opening order of their first member."""
        groups: list[list[int]] = []
        for sid, session in self.sessions.items():
            if self.batch and boundaries[sid].control is None:
                for group in groups:
                    full = self.max_batch_size is not None and len(group) >= self.max_batch_size
                    first = self.sessions[group[0]]
                    if (
                        not full
                        and boundaries[group[0]].control is None
                        and can_batch([first.stream, session.stream])
                    ):
                        group.append(sid)
                        break
                else:
                    groups.append([sid])
            else:
                groups.append([sid])
        return groups

    def cache_bytes(self) -> int:
        """Transformer cache bytes of all open sessions."""
        return sum(session.cache_bytes() for session in self.sessions.values())
