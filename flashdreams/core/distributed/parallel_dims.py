"""Validated context-parallel dimensions: ``ulysses_degree x ring_degree``.

The context-parallel (CP) size is the world size that ``torch.distributed``
reports. It is split into a Ulysses degree (ranks that exchange heads with
all-to-all) and a ring degree (ranks that rotate K/V shards). Bad splits fail
here, at construction, with a message that lists the sizes that would work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n`` in increasing order."""
    if n < 1:
        raise ValueError(f"divisors() needs a positive integer, got {n}")
    return [d for d in range(1, n + 1) if n % d == 0]


def _format_choices(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


@dataclass(frozen=True)
class ParallelDims:
    """Context-parallel degrees for one run, validated on construction.

    Leave both degrees unset for pure ring attention over the whole world
    (the Wan default ``cp_method="ring"``); set one and the other is derived
    from the world size; set both and their product must equal it.
    """

    world_size: int
    """Number of ranks taking part (``torch.distributed.get_world_size()``)."""
    ulysses_degree: int | None = None
    """Ranks per Ulysses group (contiguous ranks); derived when unset."""
    ring_degree: int | None = None
    """Ranks per ring group (strided ranks); derived when unset."""
    num_heads: int | None = None
    """Attention heads of the network; the Ulysses degree must divide it."""

    def __post_init__(self) -> None:
        world_size = self.world_size
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        valid = divisors(world_size)
        ulysses, ring = self.ulysses_degree, self.ring_degree
        for name, value in (("ulysses_degree", ulysses), ("ring_degree", ring)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if value is not None and world_size % value != 0:
                raise ValueError(
                    f"world size {world_size}: {name} must be one of "
                    f"{_format_choices(valid)}; got {value}"
                )
        if ulysses is None and ring is None:
            ulysses, ring = 1, world_size
        elif ulysses is None:
            ulysses = world_size // ring
        elif ring is None:
            ring = world_size // ulysses
        if ulysses * ring != world_size:
            raise ValueError(
                f"ulysses_degree x ring_degree must equal the world size {world_size}; "
                f"got {ulysses} x {ring} = {ulysses * ring}"
            )
        if self.num_heads is not None:
            if not isinstance(self.num_heads, int) or self.num_heads < 1:
                raise ValueError(f"num_heads must be a positive integer, got {self.num_heads!r}")
            if self.num_heads % ulysses != 0:
                head_choices = divisors(self.num_heads)
                usable = [d for d in head_choices if world_size % d == 0]
                raise ValueError(
                    f"{self.num_heads} heads: Ulysses degree must be one of "
                    f"{_format_choices(head_choices)}; got {ulysses} "
                    f"(with world size {world_size} use one of {_format_choices(usable)})"
                )
        object.__setattr__(self, "ulysses_degree", ulysses)
        object.__setattr__(self, "ring_degree", ring)

    @property
    def cp_degree(self) -> int:
        """Total context-parallel size, ``ulysses_degree * ring_degree``."""
        return self.ulysses_degree * self.ring_degree

    @property
    def method(self) -> Literal["none", "ring", "ulysses", "usp"]:
        """Which attention scheme these degrees select."""
        if self.cp_degree == 1:
            return "none"
        if self.ulysses_degree == 1:
            return "ring"
        if self.ring_degree == 1:
            return "ulysses"
        return "usp"

    @classmethod
    def from_cp_method(
        cls,
        world_size: int,
        cp_method: Literal["ring", "ulysses", "usp"],
        num_heads: int | None = None,
    ) -> ParallelDims:
        """Degrees for a named scheme.

        ``"ring"`` puts every rank in one ring; ``"ulysses"`` puts every rank in
        one Ulysses group (the head count must divide by the world size);
        ``"usp"`` uses the largest Ulysses degree that divides both the head
        count and the world size, and a ring across the rest.
        """
        if cp_method == "ring":
            return cls(world_size, ulysses_degree=1, num_heads=num_heads)
        if cp_method == "ulysses":
            return cls(world_size, ulysses_degree=world_size, num_heads=num_heads)
        if cp_method == "usp":
            if num_heads is None:
                raise ValueError("cp_method='usp' needs num_heads to choose the Ulysses degree")
            ulysses = max(d for d in divisors(world_size) if num_heads % d == 0)
            return cls(world_size, ulysses_degree=ulysses, num_heads=num_heads)
        raise ValueError(f"cp_method must be one of 'ring', 'ulysses', 'usp'; got {cp_method!r}")
