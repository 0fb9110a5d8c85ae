"""Checkpoint loading: safetensors (single or sharded) and weights-only ``.pth``, key remaps."""

from flashdreams.core.checkpoint.load import (
    empty_init,
    load_checkpoint,
    load_state_dict_into_module,
    resolve_local_checkpoint,
)
from flashdreams.core.checkpoint.remap import remap_checkpoint_keys

__all__ = [
    "empty_init",
    "load_checkpoint",
    "load_state_dict_into_module",
    "remap_checkpoint_keys",
    "resolve_local_checkpoint",
]
