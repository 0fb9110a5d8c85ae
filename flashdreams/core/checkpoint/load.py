"""Read checkpoints from local files without unpickling arbitrary objects."""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

_REMOTE_PREFIXES = ("http://", "https://", "hf://", "s3://")
_MAX_LISTED_KEYS = 20


def resolve_local_checkpoint(path: str | Path, *, what: str = "checkpoint") -> Path:
    """Return ``path`` as an existing local ``Path`` or raise ``FileNotFoundError``.

    Remote addresses (the documented upstream defaults are hub URLs) are not
    downloaded: the error says to fetch the file and pass its local path.
    """
    text = str(path)
    if text.startswith(_REMOTE_PREFIXES):
        file_name = text.rstrip("/").rsplit("/", 1)[-1]
        raise FileNotFoundError(
            f"{what} '{text}' is a remote address and this stack never downloads weights. "
            f"Download it yourself (e.g. to ./checkpoints/{file_name}) and set the "
            f"checkpoint path to that local file."
        )
    local = Path(text).expanduser()
    if not local.exists():
        raise FileNotFoundError(f"{what} not found: '{local}' does not exist")
    return local


def _load_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _load_sharded_index(index_path: Path) -> dict[str, torch.Tensor]:
    with open(index_path) as handle:
        index = json.load(handle)
    if "weight_map" not in index:
        raise ValueError(f"'{index_path}' is not a safetensors index: it has no 'weight_map'")
    state_dict: dict[str, torch.Tensor] = {}
    for shard_name in sorted(set(index["weight_map"].values())):
        shard_path = index_path.parent / shard_name
        if not shard_path.exists():
            raise FileNotFoundError(f"shard '{shard_path}' listed in '{index_path}' is missing")
        state_dict.update(_load_safetensors_file(shard_path))
    return state_dict


def _plain_first_line(error: Exception) -> str:
    """First line of an error message without terminal colour codes."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()[0]


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load '{path}': it contains pickled objects other than tensors, and "
            f"unpickling them could run arbitrary code. Re-save it as a plain state dict "
            f"(or as .safetensors). Loader said: {_plain_first_line(error)}"
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"'{path}' holds a {type(obj).__name__}, not a state dict of tensors")
    return flatten_nested_state_dict(obj, source=f"'{path}'")


def flatten_nested_state_dict(
    obj: Mapping[str, object], *, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Flatten dicts of state dicts into one state dict with dotted keys.

    Training checkpoints often hold several state dicts in one file (the
    Self-Forcing ``self_forcing_dmd.pt`` is ``{"generator": {...}, "critic":
    {...}, "generator_ema": {...}}``); their tensors come back as
    ``generator_ema.model.blocks.0...``. A flat state dict passes unchanged.
    """
    flat: dict[str, torch.Tensor] = {}

    def visit(prefix: str, mapping: Mapping[str, object]) -> None:
        for key, value in mapping.items():
            name = f"{prefix}{key}"
            if isinstance(value, torch.Tensor):
                flat[name] = value
            elif isinstance(value, Mapping):
                visit(f"{name}.", value)
            else:
                raise ValueError(
                    f"{source}: entry '{name}' is a {type(value).__name__}, not a tensor or a "
                    "dict of tensors"
                )

    visit("", obj)
    return flat


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a local checkpoint.

    Accepts a ``.safetensors`` file, a ``*.safetensors.index.json`` file, a
    folder holding either (a diffusers ``save_pretrained`` folder works), and
    ``.pth`` / ``.pt`` / ``.bin`` files read with ``torch.load(weights_only=True)``.
    """
    local = resolve_local_checkpoint(path)
    if local.is_dir():
        indexes = sorted(local.glob("*.safetensors.index.json"))
        if indexes:
            return _load_sharded_index(indexes[0])
        files = sorted(local.glob("*.safetensors"))
        if len(files) == 1:
            return _load_safetensors_file(files[0])
        if not files:
            raise FileNotFoundError(
                f"checkpoint folder '{local}' holds no .safetensors file or index"
            )
        raise ValueError(
            f"checkpoint folder '{local}' holds several .safetensors files "
            f"({', '.join(f.name for f in files)}) but no *.safetensors.index.json"
        )
    name = local.name
    if name.endswith(".safetensors.index.json"):
        return _load_sharded_index(local)
    if name.endswith(".safetensors"):
        return _load_safetensors_file(local)
    if local.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return _load_torch_file(local)
    raise ValueError(
        f"unsupported checkpoint format '{local}': use .safetensors, "
        "*.safetensors.index.json, a folder of those, or .pth/.pt"
    )


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f", ... ({more} more)" if more > 0 else "")


def load_state_dict_into_module(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    source: str = "checkpoint",
) -> None:
    """Copy ``state_dict`` into ``module`` after checking keys and shapes.

    Shape mismatches always raise ``ValueError`` naming the key and both
    shapes. With ``strict`` (the default) missing or unexpected keys raise a
    ``KeyError`` listing them; otherwise they are ignored.
    """
    expected = module.state_dict()
    mismatched = [
        f"'{key}': checkpoint {tuple(tensor.shape)} vs model {tuple(expected[key].shape)}"
        for key, tensor in state_dict.items()
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape)
    ]
    if mismatched:
        raise ValueError(f"{source}: shape mismatch for " + "; ".join(mismatched))
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
        raise KeyError(f"{source} does not match {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(dict(state_dict), strict=False)
