"""Decoded video tensors -> frames a writer takes."""

from __future__ import annotations

import numpy as np
import torch


def video_to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``[T, 3, H, W]`` in ``[-1, 1]`` -> ``[T, H, W, 3]`` uint8."""
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"expected a video chunk of shape [T, 3, H, W], got {tuple(video.shape)}")
    pixels = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
