"""3D rotary position embedding of the Wan DiT over (frame, height, width).

The head dim is split into three parts, one per axis: ``h_dim = w_dim =
2 * (head_dim // 6)`` and ``t_dim = head_dim - h_dim - w_dim``. Each part
rotates channel pairs ``(2i, 2i+1)`` by ``position * theta**(-2i/axis_dim)``.
Frequencies are complex tensors ``[L, 1, head_dim // 2]`` (L tokens, one
entry broadcast over heads); tokens are laid out frame-major
(``(t h w)``), the same order as the patchified latent.

Angles are computed in float64 and rounded to complex64, as upstream does.
"""

from __future__ import annotations

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels given to the (t, h, w) axes for ``head_dim``."""
    if head_dim % 2 != 0:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    h_dim = w_dim = 2 * (head_dim // 6)
    return head_dim - h_dim - w_dim, h_dim, w_dim


def _axis_angles(positions: torch.Tensor, axis_dim: int, theta: float) -> torch.Tensor:
    """``[N]`` float64 positions -> ``[N, axis_dim // 2]`` float64 angles."""
    exponents = torch.arange(0, axis_dim, 2, dtype=torch.float64)[: axis_dim // 2] / axis_dim
    inv_freq = 1.0 / (theta**exponents)
    return torch.outer(positions, inv_freq)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, L, H, D]`` by complex ``freqs`` ``[L, 1, D // 2]``; keeps ``x.dtype``."""
    # [B, L, H, D] -> [B, L, H, D/2] complex
    x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = torch.view_as_real(x_complex * freqs).flatten(-2)
    return rotated.type_as(x)


class WanRope:
    """RoPE table for one rollout's spatial grid.

    Args:
        head_dim: attention head dim.
        num_height_tokens, num_width_tokens: patch grid of one latent frame.
        h_extrapolation_ratio, w_extrapolation_ratio: height / width positions
            are divided by these (position interpolation), so a grid that is
            ``ratio`` times larger than the trained one reuses the trained
            position range. ``1.0`` keeps integer positions.
        theta: RoPE base.
    """

    def __init__(
        self,
        *,
        head_dim: int,
        num_height_tokens: int,
        num_width_tokens: int,
        h_extrapolation_ratio: float = 1.0,
        w_extrapolation_ratio: float = 1.0,
        theta: float = 10000.0,
        device: torch.device | str | None = None,
    ) -> None:
        if h_extrapolation_ratio <= 0 or w_extrapolation_ratio <= 0:
            raise ValueError(
                "extrapolation ratios must be positive, got "
                f"h={h_extrapolation_ratio}, w={w_extrapolation_ratio}"
            )
        self.head_dim = head_dim
        self.theta = theta
        self.num_height_tokens = num_height_tokens
        self.num_width_tokens = num_width_tokens
        self.device = device
        self.t_dim, h_dim, w_dim = rope_axis_dims(head_dim)
        h_pos = torch.arange(num_height_tokens, dtype=torch.float64) / h_extrapolation_ratio
        w_pos = torch.arange(num_width_tokens, dtype=torch.float64) / w_extrapolation_ratio
        h_angles = _axis_angles(h_pos, h_dim, theta)
        w_angles = _axis_angles(w_pos, w_dim, theta)
        # [Hn, Wn, (h_dim + w_dim) / 2]: the spatial part of one frame, frame-major order
        spatial = torch.cat(
            [
                h_angles[:, None, :].expand(-1, num_width_tokens, -1),
                w_angles[None, :, :].expand(num_height_tokens, -1, -1),
            ],
            dim=-1,
        )
        self._spatial_angles = spatial.reshape(num_height_tokens * num_width_tokens, -1)
        self._relative_tables: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def tokens_per_frame(self) -> int:
        return self.num_height_tokens * self.num_width_tokens

    def token_freqs(self, start: int, stop: int) -> torch.Tensor:
        """Complex freqs ``[stop - start, 1, head_dim // 2]`` of tokens ``[start, stop)``.

        Token ``i`` sits at frame ``i // tokens_per_frame`` and at the spatial
        position ``i % tokens_per_frame`` of that frame.
        """
        tokens = torch.arange(start, stop)
        frames = (tokens // self.tokens_per_frame).to(torch.float64)
        t_angles = _axis_angles(frames, self.t_dim, self.theta)
        angles = torch.cat([t_angles, self._spatial_angles[tokens % self.tokens_per_frame]], dim=-1)
        freqs = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
        return freqs[:, None, :].to(self.device)

    def chunk_freqs(self, first_frame: int, num_frames: int) -> torch.Tensor:
        """Freqs of ``num_frames`` whole frames starting at frame ``first_frame``."""
        tpf = self.tokens_per_frame
        return self.token_freqs(first_frame * tpf, (first_frame + num_frames) * tpf)

    def relative(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Rotate ``x`` ``[B, stop - start, H, D]`` as tokens ``[start, stop)`` of ``[cache | current]``.

        Used as the entry point's ``relative_rope`` callback; tables are memoised
        (their number is bounded by the cache capacity).
        """
        key = (start, stop)
        table = self._relative_tables.get(key)
        if table is None or table.device != x.device:
            table = self.token_freqs(start, stop).to(x.device)
            self._relative_tables[key] = table
        return apply_rope(x, table)
