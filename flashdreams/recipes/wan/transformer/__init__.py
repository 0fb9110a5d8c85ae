"""Wan DiT transformers: the network, Wan 2.1 and Wan 2.2 wrappers, I2V control, checkpoints."""

from flashdreams.recipes.wan.transformer.checkpoint import (
    WAN_DIFFUSERS_KEY_PATTERNS,
    wan_diffusers_state_dict_transform,
)
from flashdreams.recipes.wan.transformer.cuda_graph import CUDAGraphWrapper
from flashdreams.recipes.wan.transformer.i2v import I2VCtrl
from flashdreams.recipes.wan.transformer.impl.network import (
    WanDiTNetwork,
    WanDiTNetwork1pt3BConfig,
    WanDiTNetwork14BConfig,
    WanDiTNetworkCache,
    WanDiTNetworkConfig,
    WanDiTNetworkTI2V5BConfig,
    WanDiTNetworkTinyConfig,
)
from flashdreams.recipes.wan.transformer.wan21 import (
    Wan21Transformer,
    Wan21TransformerCache,
    Wan21TransformerConfig,
)
from flashdreams.recipes.wan.transformer.wan22 import (
    Wan22Transformer,
    Wan22TransformerCache,
    Wan22TransformerConfig,
)

__all__ = [
    "CUDAGraphWrapper",
    "I2VCtrl",
    "WAN_DIFFUSERS_KEY_PATTERNS",
    "Wan21Transformer",
    "Wan21TransformerCache",
    "Wan21TransformerConfig",
    "Wan22Transformer",
    "Wan22TransformerCache",
    "Wan22TransformerConfig",
    "WanDiTNetwork",
    "WanDiTNetwork14BConfig",
    "WanDiTNetwork1pt3BConfig",
    "WanDiTNetworkCache",
    "WanDiTNetworkConfig",
    "WanDiTNetworkTI2V5BConfig",
    "WanDiTNetworkTinyConfig",
    "wan_diffusers_state_dict_transform",
]
