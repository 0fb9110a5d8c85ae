"""Byte counter for the CP primitives (used by tests and bench/bench_cp.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CommStats:
    """Bytes this rank sent, by operation name.

    The CP primitives take an optional ``comm_stats`` argument and add the
    bytes of every tensor they actually put on the wire (for all-to-all only
    the parts that go to other ranks).
    """

    bytes_sent: dict[str, int] = field(default_factory=dict)
    """Bytes sent per operation name (e.g. ``"ring_kv"``, ``"ulysses_a2a"``)."""
    num_messages: dict[str, int] = field(default_factory=dict)
    """Number of tensors sent per operation name."""

    def add(self, name: str, num_bytes: int, num_messages: int = 1) -> None:
        self.bytes_sent[name] = self.bytes_sent.get(name, 0) + int(num_bytes)
        self.num_messages[name] = self.num_messages.get(name, 0) + int(num_messages)

    def add_tensor(self, name: str, tensor: torch.Tensor, fraction: float = 1.0) -> None:
        """Count ``fraction`` of the bytes of ``tensor`` as sent."""
        self.add(name, round(tensor.numel() * tensor.element_size() * fraction))

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.num_messages.clear()
