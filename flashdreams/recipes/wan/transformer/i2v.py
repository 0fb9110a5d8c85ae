"""Image-to-video control payload of the Wan transformer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class I2VCtrl:
    """Known image latent and where it applies, for one AR step.

    Unpatchified (as the I2V control encoder emits it)::

        latent [*batch, T, C, H, W]   image latent at the conditioned frames (zeros elsewhere)
        mask   [*batch, T, Cm, H, W]  1 where ``latent`` is known, 0 elsewhere

    ``Cm`` is 1 or ``C`` for mask-inject I2V (``stamp_image_latent``), and 4
    for the Wan 2.1 14B channel-concat layout (``concat_image_mask_to_latent``).
    The transformer patchifies both fields independently, so after
    ``patchify_and_maybe_split_cp`` they are ``[*batch, L, C*k]`` and
    ``[*batch, L, Cm*k]`` with ``k = kt*kh*kw``.
    """

    latent: torch.Tensor
    """Image latent, same channel count as the noise."""
    mask: torch.Tensor
    """Conditioning mask, 1 = known."""


def stamp_mask_features(
    mask_tokens: torch.Tensor, num_channels: int, patch_volume: int
) -> torch.Tensor:
    """Patchified mask ``[..., L, Cm*k]`` -> ``[..., L, num_channels*k]`` (layout ``(c k)``).

    A position counts as known when any mask channel marks it.
    """
    # [..., L, Cm*k] -> [..., L, Cm, k] -> [..., L, k]
    per_position = mask_tokens.unflatten(-1, (-1, patch_volume)).amax(dim=-2)
    return per_position.repeat(*([1] * (per_position.ndim - 1)), num_channels)


def stamp_image_latent(
    latent_tokens: torch.Tensor, ctrl: I2VCtrl, patch_volume: int
) -> torch.Tensor:
    """Overwrite the known positions of patchified ``latent_tokens`` with ``ctrl.latent``."""
    num_channels = latent_tokens.shape[-1] // patch_volume
    if ctrl.latent.shape != latent_tokens.shape:
        raise ValueError(
            f"I2V image latent {tuple(ctrl.latent.shape)} does not match the latent "
            f"{tuple(latent_tokens.shape)} (patchified)"
        )
    mask = stamp_mask_features(ctrl.mask, num_channels, patch_volume).to(latent_tokens.dtype)
    image = ctrl.latent.to(latent_tokens.dtype)
    return latent_tokens * (1 - mask) + image * mask


def conditioned_tokens(ctrl: I2VCtrl, patch_volume: int) -> torch.Tensor:
    """``[..., L]`` bool: tokens whose patch contains a known (masked) position."""
    return ctrl.mask.unflatten(-1, (-1, patch_volume)).amax(dim=(-2, -1)) > 0.5
