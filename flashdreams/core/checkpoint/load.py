"""Read checkpoints from local files without unpickling arbitrary objects."""

from __future__ import annotations

import contextlib
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


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _load_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file straight into freshly allocated tensors.

    Each tensor's bytes are read from the file into its own (allocator-aligned) storage:
    one pass over the file, no intermediate buffer, so loading runs at the speed of
    reading the file. (``safetensors.torch.load_file`` returns tensors at arbitrary byte
    offsets, which makes some CPU GEMM kernels round differently from aligned copies.)
    """
    with open(path, "rb", buffering=0) as handle:
        size_bytes = handle.read(8)
        header_size = int.from_bytes(size_bytes, "little") if len(size_bytes) == 8 else -1
        file_size = path.stat().st_size
        if header_size < 2 or 8 + header_size > file_size:
            raise ValueError(f"'{path}' is not a valid .safetensors file (bad header size)")
        try:
            header = json.loads(handle.read(header_size))
        except ValueError as error:
            raise ValueError(f"'{path}' is not a valid .safetensors file: {error}") from None
        header.pop("__metadata__", None)
        data_start = 8 + header_size
        tensors: dict[str, torch.Tensor] = {}
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"'{path}': tensor '{name}' has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=dtype)
            if tensor.nbytes != end - begin or data_start + end > file_size:
                raise ValueError(
                    f"'{path}' is truncated or corrupt: tensor '{name}' needs bytes "
                    f"{data_start + begin}-{data_start + end} of a {file_size}-byte file"
                )
            handle.seek(data_start + begin)
            target = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            num_read = 0
            while num_read < len(target):
                chunk = handle.readinto(target[num_read:])
                if not chunk:
                    raise ValueError(f"'{path}' is truncated: tensor '{name}' is cut short")
                num_read += chunk
            tensors[name] = tensor
    return tensors


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
    assign: bool | None = None,
) -> None:
    """Copy ``state_dict`` into ``module`` after checking keys and shapes.

    Shape mismatches always raise ``ValueError`` naming the key and both
    shapes. With ``strict`` (the default) missing or unexpected keys raise a
    ``KeyError`` listing them; otherwise they are ignored.

    ``assign`` makes the checkpoint's tensors the module's parameters (keeping the
    checkpoint's dtype) instead of copying into them: no second copy of the weights.
    ``None`` (the default) assigns exactly when the module was built under
    :func:`empty_init` (its parameters are on the meta device).
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
    if assign is None:
        assign = any(parameter.is_meta for parameter in module.parameters())
    if assign:
        # Remapped tensors can be views (transposes, slices): parameters own dense memory.
        state_dict = {key: tensor.contiguous() for key, tensor in state_dict.items()}
    module.load_state_dict(dict(state_dict), strict=False, assign=assign)
    still_empty = [name for name, tensor in module.state_dict().items() if tensor.is_meta]
    if still_empty:
        raise KeyError(
            f"{source} leaves parameters of {type(module).__name__} without values: "
            f"{_listed(still_empty)}"
        )


def empty_init(enabled: bool = True) -> contextlib.AbstractContextManager:
    """Build modules inside this context without allocating or initialising parameters.

    Parameters land on the meta device; :func:`load_state_dict_into_module` then makes
    the checkpoint's tensors the parameters. Use it only when every parameter comes from
    a checkpoint (buffers computed in ``__init__`` would be meta too). ``enabled=False``
    is a no-op, for the random-initialisation path.
    """
    return torch.device("meta") if enabled else contextlib.nullcontext()
