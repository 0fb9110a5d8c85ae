"""CLIP image encoder for Wan I2V: first frame -> penultimate-block hidden states.

Wan I2V conditions on the ViT-H/14 vision tower of open-clip's
``xlm-roberta-large-vit-huge-14`` with the last transformer block skipped
(``use_31_block=True``): the tokens (class token included) as they leave
block 31 of 32, without the final layer norm. For a 224 x 224 input that is
[B, 257, 1280]. This runs transformers' ``CLIPVisionModel`` and returns its
``hidden_states[-2]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flashdreams.core.checkpoint import (
    load_checkpoint,
    load_state_dict_into_module,
    resolve_local_checkpoint,
)
from flashdreams.infra.encoder import Encoder, EncoderConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean of CLIP's input normalisation (images in [0, 1])."""

CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel std of CLIP's input normalisation."""

WAN_CLIP_CHECKPOINT_URL = (
    "https://huggingface.co/Wan-AI/Wan2.1-I2V-14B-480P/resolve/main/"
    "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
)


def open_clip_visual_to_hf_state_dict(
    sd: dict[str, torch.Tensor], *, key_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Convert the ``visual.*`` weights of Wan's open-clip checkpoint to ``CLIPVisionModel`` keys.

    Text-tower weights (``textual.*``), the projection head and the logit scale
    are dropped. The fused ``to_qkv`` projection is split into q / k / v, and
    the class / position embeddings lose their leading singleton dims.
    ``key_prefix`` is prepended to every output key (``"vision_model."`` when
    the model nests the tower under that name).
    """
    out: dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor) -> None:
        out[key_prefix + name] = tensor

    renames = {"pre_norm": "pre_layrnorm", "post_norm": "post_layernorm"}
    block_renames = {
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "attn.proj": "self_attn.out_proj",
        "mlp.0": "mlp.fc1",
        "mlp.2": "mlp.fc2",
    }
    for key, tensor in sd.items():
        if not key.startswith("visual."):
            continue
        name = key[len("visual.") :]
        if name == "head":
            continue
        if name == "cls_embedding":
            put("embeddings.class_embedding", tensor.reshape(-1))
        elif name == "pos_embedding":
            put("embeddings.position_embedding.weight", tensor.reshape(-1, tensor.shape[-1]))
        elif name.startswith("patch_embedding."):
            put("embeddings." + name, tensor)
        elif name.split(".")[0] in renames:
            module, param = name.split(".", 1)
            put(f"{renames[module]}.{param}", tensor)
        elif name.startswith("transformer."):
            _, index, rest = name.split(".", 2)
            module, param = rest.rsplit(".", 1)
            prefix = f"encoder.layers.{index}."
            if module == "attn.to_qkv":
                for proj, part in zip(("q", "k", "v"), tensor.chunk(3, dim=0), strict=True):
                    put(f"{prefix}self_attn.{proj}_proj.{param}", part)
            elif module in block_renames:
                put(f"{prefix}{block_renames[module]}.{param}", tensor)
            else:
                raise KeyError(f"open-clip checkpoint: unknown vision block entry '{key}'")
        else:
            raise KeyError(f"open-clip checkpoint: unknown vision entry '{key}'")
    return out


@dataclass(kw_only=True)
class CLIPImageEncoderConfig(EncoderConfig):
    """Config for :class:`CLIPImageEncoder`; architecture defaults are Wan's ViT-H/14."""

    _target: type[CLIPImageEncoder] = field(default_factory=lambda: CLIPImageEncoder)
    """Always :class:`CLIPImageEncoder`."""

    checkpoint_path: str | None = WAN_CLIP_CHECKPOINT_URL
    """Local weights: a Hugging Face ``CLIPVisionModel`` (or full ``CLIPModel``) folder, or
    Wan's open-clip ``.pth`` (its ``visual.*`` weights are remapped). The default names the
    upstream file, which is never downloaded. ``None`` builds a randomly initialised tower
    from the architecture fields (tests and demos only)."""

    image_size: int = 224
    """Side the input is resized to (bicubic) before the tower."""

    dtype: torch.dtype = torch.bfloat16
    """Parameter and output dtype."""

    hidden_size: int = 1280
    """Token width, for random init or the open-clip ``.pth``."""

    num_layers: int = 32
    """Transformer blocks in the tower (the output is taken after block ``num_layers - 1``)."""

    num_heads: int = 16
    """Attention heads."""

    intermediate_size: int = 5120
    """MLP width."""

    patch_size: int = 14
    """Patch side; ``(image_size / patch_size) ** 2 + 1`` tokens come out."""


class CLIPImageEncoder(Encoder):
    """``forward(image [..., 3, H, W] in [-1, 1])`` -> [..., num_tokens, hidden_size]."""

    def __init__(self, config: CLIPImageEncoderConfig) -> None:
        super().__init__(config)
        self.config: CLIPImageEncoderConfig = config
        self.model = _build_model(config)
        self.model.to(config.dtype).eval()
        self.model.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> CLIP-normalised [N, 3, size, size] in float32."""
        size = self.config.image_size
        pixels = F.interpolate(
            image.float(), size=(size, size), mode="bicubic", align_corners=False
        )
        pixels = pixels * 0.5 + 0.5
        return (pixels - self.mean) / self.std

    @torch.no_grad()
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Hidden states after the penultimate block, in ``config.dtype``."""
        if input.ndim < 4 or input.shape[-3] != 3:
            raise ValueError(
                f"CLIPImageEncoder expects images [..., 3, H, W] in [-1, 1]; "
                f"got shape {tuple(input.shape)}"
            )
        leading_shape = input.shape[:-3]
        pixels = self.preprocess(input.reshape(-1, *input.shape[-3:]))
        pixels = pixels.to(device=self.mean.device, dtype=self.config.dtype)
        outputs = self.model(pixel_values=pixels, output_hidden_states=True)
        hidden = outputs.hidden_states[-2]
        return hidden.reshape(*leading_shape, *hidden.shape[1:])


def _config_from_fields(config: CLIPImageEncoderConfig) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )


def _build_model(config: CLIPImageEncoderConfig) -> Any:
    from transformers import CLIPVisionModel

    if config.checkpoint_path is None:
        return CLIPVisionModel(_config_from_fields(config))
    local = resolve_local_checkpoint(config.checkpoint_path, what="CLIP image encoder checkpoint")
    if local.is_dir():
        if not (Path(local) / "config.json").exists():
            raise FileNotFoundError(
                f"CLIP checkpoint folder '{local}' has no config.json; expected a Hugging Face "
                f"CLIPVisionModel folder (save_pretrained layout)"
            )
        return CLIPVisionModel.from_pretrained(str(local), local_files_only=True)
    model = CLIPVisionModel(_config_from_fields(config))
    state_dict = load_checkpoint(local)
    if any(key.startswith("visual.") for key in state_dict):
        nested = any(key.startswith("vision_model.") for key in model.state_dict())
        state_dict = open_clip_visual_to_hf_state_dict(
            state_dict, key_prefix="vision_model." if nested else ""
        )
    load_state_dict_into_module(model, state_dict, source=f"CLIP checkpoint '{local}'")
    return model
