"""LoRA adapters for the Wan DiT: read the common file layouts, apply them with a strength,
fuse them into the weights or run them at run time, swap and re-weight them in place.

Layouts understood (``.safetensors`` files only; rank and alpha come from the file):

* **diffusers / PEFT**: ``[transformer.]blocks.N.attn1.to_q.lora_A.weight``,
  ``lora_B.weight`` (and ``lora_B.bias``); alpha from the ``lora_adapter_metadata``
  header diffusers writes (``lora_alpha``, ``alpha_pattern``, ``use_rslora``), else
  alpha = rank.
* **kohya / musubi-tuner**: ``lora_unet_blocks_N_self_attn_q.lora_down.weight``,
  ``lora_up.weight``, ``alpha``.
* **original Wan keys** (LightX2V, CausVid): ``[diffusion_model.]blocks.N.self_attn.q``
  followed by ``.lora_A.weight`` / ``.lora_B.weight`` or ``.lora_down.weight`` /
  ``.lora_up.weight``, ``.alpha``, ``.diff`` (a full weight delta) and ``.diff_b``
  (a bias delta).

The update of a module with weight ``W`` ``[out, in]`` and bias ``b`` at strength ``s``::

    W += s * (alpha / rank) * up @ down + s * diff        (rsLoRA: alpha / sqrt(rank))
    b += s * diff_b                                     (PEFT lora_B.bias: s * alpha/rank * bias)

Names are mapped to the original Wan module names the network uses; a LoRA on the
self-attention ``q``, ``k`` or ``v`` lands in its third of the fused ``qkv`` projection,
and one on the output head follows the head's row reorder
(:meth:`WanDiTNetwork.update_parameters_after_loading_checkpoint`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from flashdreams.infra.config import PrintableConfig
from flashdreams.recipes.wan.transformer.checkpoint import WAN_DIFFUSERS_KEY_PATTERNS

if TYPE_CHECKING:
    from flashdreams.recipes.wan.transformer.impl.network import WanDiTNetwork

LAYOUTS_UNDERSTOOD = (
    "diffusers/PEFT ('[transformer.]blocks.N.attn1.to_q.lora_A.weight'), "
    "kohya/musubi-tuner ('lora_unet_blocks_N_self_attn_q.lora_down.weight' + '.alpha'), "
    "original Wan ('[diffusion_model.]blocks.N.self_attn.q.lora_A.weight' / "
    "'.lora_down.weight' / '.alpha' / '.diff' / '.diff_b')"
)
"""The key layouts :func:`load_lora` reads, as quoted in its error messages."""

_MAX_LISTED = 5

# key suffix -> part of the update it holds; longest suffixes first
_PART_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "down"),
    (".lora_down.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_up.weight", "up"),
    (".lora_B.bias", "up_bias"),
    (".alpha", "alpha"),
    (".diff_b", "bias_diff"),
    (".diff", "weight_diff"),
)

# key prefix -> layout name; a key with none of them is read as diffusers or original Wan
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "kohya"),
    ("model.diffusion_model.", "wan"),
    ("diffusion_model.", "wan"),
    ("base_model.model.", "diffusers"),
    ("transformer.", "diffusers"),
)

# kohya joins the module path with underscores; these put the dots back
_KOHYA_NAME_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^blocks_(\d+)_(self_attn|cross_attn)_(.+)$", r"blocks.\1.\2.\3"),
        (r"^blocks_(\d+)_ffn_(\d+)$", r"blocks.\1.ffn.\2"),
        (r"^blocks_(\d+)_(.+)$", r"blocks.\1.\2"),
        (r"^head_(head|modulation)$", r"head.\1"),
        (r"^(text_embedding|time_embedding|time_projection)_(\d+)$", r"\1.\2"),
        (r"^img_emb_proj_(\d+)$", r"img_emb.proj.\1"),
    )
)

_DIFFUSERS_NAME_PATTERNS = tuple(
    (re.compile(pattern), replacement) for pattern, replacement in WAN_DIFFUSERS_KEY_PATTERNS
)

WAN_MODULE_NAME = re.compile(
    r"^(?:blocks\.\d+\.(?:self_attn\.(?:q|k|v|o|norm_q|norm_k)"
    r"|cross_attn\.(?:q|k|v|o|k_img|v_img|norm_q|norm_k|norm_k_img)"
    r"|ffn\.[02]|norm3|modulation)"
    r"|head\.(?:head|modulation)|patch_embedding|text_embedding\.[02]|time_embedding\.[02]"
    r"|time_projection\.1|img_emb\.proj\.[0134])$"
)
"""Original Wan names of the modules (and the modulation parameters) a LoRA may target."""

_QKV_INDEX = {"q": 0, "k": 1, "v": 2}
_SELF_QKV = re.compile(r"^blocks\.(\d+)\.self_attn\.(q|k|v)$")
_CONTEXT_PROJECTION = re.compile(
    r"^(?:blocks\.\d+\.cross_attn\.(?:k|v|k_img|v_img|norm_k|norm_k_img)"
    r"|text_embedding\.[02]|img_emb\.proj\.[0134])$"
)


@dataclass(kw_only=True)
class LoRAConfig(PrintableConfig):
    """One LoRA adapter of a Wan transformer (``transformer.loras`` list entry)."""

    path: str
    """Local ``.safetensors`` file in one of the layouts of :data:`LAYOUTS_UNDERSTOOD`."""
    strength: float = 1.0
    """Multiplier of the adapter's update (``0`` turns it off, ``1`` applies it as trained)."""
    fused: bool = True
    """``True``: fold the update into the weights (no run-time cost). ``False``: apply the
    low-rank update at run time (each projection pays two thin matmuls), so swapping or
    re-weighting the adapter touches only its own small matrices. Full-size ``diff``
    deltas of linear layers then run at run time too (one more full matmul each); updates
    of modules that are not plain linear layers (norms, modulation, the patch embedding)
    are always folded."""
    name: str | None = None
    """Name used to re-weight, fuse or remove the adapter; default: the file name without
    its extension."""


@dataclass
class LoRAUpdate:
    """What one adapter does to one module (original Wan name), before the strength."""

    down: torch.Tensor | None = None
    """``[rank, in]`` (``lora_A`` / ``lora_down``)."""
    up: torch.Tensor | None = None
    """``[out, rank]`` (``lora_B`` / ``lora_up``)."""
    scale: float = 1.0
    """``alpha / rank`` of the low-rank part."""
    weight_diff: torch.Tensor | None = None
    """Full-size weight delta (``diff``)."""
    bias_diff: torch.Tensor | None = None
    """Bias delta (``diff_b``, or PEFT's ``lora_B.bias`` times ``scale``)."""
    device_copies: dict[tuple, tuple] = field(default_factory=dict, repr=False, compare=False)
    """Run-time copies ``(down, up, diff, bias)`` per (device, dtype, reordered rows), kept
    across re-weights: a re-weight only rescales the device copies, nothing is re-sent."""

    @property
    def rank(self) -> int | None:
        return None if self.down is None else self.down.shape[0]


@dataclass
class LoRAAdapter:
    """A LoRA file read into original-Wan module names (not yet applied to a network)."""

    name: str
    """Name of the adapter."""
    path: str
    """File it was read from."""
    layout: str
    """Key layout found in the file: ``"diffusers"``, ``"kohya"`` or ``"wan"``."""
    updates: dict[str, LoRAUpdate] = field(default_factory=dict)
    """Original Wan module name -> its update."""


# --------------------------------------------------------------------------- reading
def _listed(items: Iterable[str]) -> str:
    items = sorted(items)
    more = len(items) - _MAX_LISTED
    return ", ".join(items[:_MAX_LISTED]) + (f", ... ({more} more)" if more > 0 else "")


def read_safetensors_with_metadata(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and header metadata of a local ``.safetensors`` LoRA file.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for anything that
    is not a safetensors file (pickled ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` files are
    refused without being opened: unpickling can run code).
    """
    from safetensors import SafetensorError, safe_open

    from flashdreams.core.checkpoint import resolve_local_checkpoint

    local = resolve_local_checkpoint(path, what="LoRA file")
    if local.is_dir():
        raise ValueError(f"LoRA file '{local}' is a folder; give the .safetensors file in it")
    if local.suffix != ".safetensors":
        raise ValueError(
            f"LoRA file '{local}' is not a .safetensors file; pickled formats (.pt, .pth, "
            ".bin, .ckpt) are refused because unpickling can run arbitrary code. Convert it "
            "with safetensors.torch.save_file"
        )
    try:
        with safe_open(str(local), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"LoRA file '{local}' is not a readable safetensors file: {error}"
        ) from None
    return tensors, metadata


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``key`` -> ``(layout, original Wan module name, part)``, or ``None`` if not understood."""
    found = next(((s, p) for s, p in _PART_SUFFIXES if key.endswith(s)), None)
    if found is None:
        return None
    suffix, part = found
    module = key[: -len(suffix)]
    layout = "wan"
    for prefix, prefix_layout in _PREFIXES:
        if module.startswith(prefix):
            module, layout = module[len(prefix) :], prefix_layout
            break
    if layout == "kohya":
        for pattern, replacement in _KOHYA_NAME_PATTERNS:
            if pattern.match(module):
                module = pattern.sub(replacement, module)
                break
    else:
        renamed = module + ".weight"  # the diffusers patterns match parameter names
        for pattern, replacement in _DIFFUSERS_NAME_PATTERNS:
            renamed = pattern.sub(replacement, renamed)
        if renamed != module + ".weight":
            layout = "diffusers"
        module = renamed.removesuffix(".weight")
    if not WAN_MODULE_NAME.match(module):
        return None
    return layout, module, part


def _peft_alpha(metadata: dict, peft_name: str, rank: int) -> float:
    """Scale ``alpha / rank`` of one module from diffusers' ``lora_adapter_metadata``."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return 1.0
    config = json.loads(raw)
    if any(key.startswith("transformer.") for key in config):
        # a pipeline-level save (WanPipeline.save_lora_weights) prefixes the component
        config = {
            key.removeprefix("transformer."): value
            for key, value in config.items()
            if key.startswith("transformer.")
        }
    if config.get("use_dora"):
        raise ValueError("DoRA adapters (use_dora=True) are not supported")
    alpha = float(config.get("lora_alpha", rank))
    for pattern, pattern_alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", peft_name):
            alpha = float(pattern_alpha)
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def parse_lora_state_dict(
    state_dict: dict[str, torch.Tensor], metadata: dict, *, name: str, path: str
) -> LoRAAdapter:
    """Group a LoRA state dict by original Wan module name and check each group is whole."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    peft_names: dict[str, str] = {}
    layouts: set[str] = set()
    unknown = []
    for key, tensor in state_dict.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        layout, module, part = split
        layouts.add(layout)
        module_parts = parts.setdefault(module, {})
        if part in module_parts:
            raise ValueError(f"LoRA file '{path}': two keys give '{part}' of module '{module}'")
        module_parts[part] = tensor
        if part == "down":
            peft_names[module] = key.removesuffix(".lora_A.weight")
    if unknown:
        raise ValueError(
            f"LoRA file '{path}' has {len(unknown)} key(s) that are not a Wan DiT LoRA "
            f"(e.g. {_listed(unknown)}); is it for another model? Layouts understood: "
            f"{LAYOUTS_UNDERSTOOD}"
        )
    if not parts:
        raise ValueError(f"LoRA file '{path}' holds no tensors")
    updates = {}
    for module, module_parts in parts.items():
        peft_name = peft_names.get(module, module)
        updates[module] = _build_update(module, module_parts, metadata, peft_name, path)
    layout = "+".join(sorted(layouts))
    return LoRAAdapter(name=name, path=str(path), layout=layout, updates=updates)


def _build_update(
    module: str, parts: dict[str, torch.Tensor], metadata: dict, peft_name: str, path: str
) -> LoRAUpdate:
    down, up = parts.get("down"), parts.get("up")
    if (down is None) != (up is None):
        have, missing = ("down", "up") if up is None else ("up", "down")
        raise ValueError(
            f"LoRA file '{path}': module '{module}' has a {have} matrix but no {missing} matrix"
        )
    if down is None and any(p in parts for p in ("alpha", "up_bias")):
        raise ValueError(
            f"LoRA file '{path}': module '{module}' has an alpha or bias but no up/down"
        )
    update = LoRAUpdate(down=down, up=up, weight_diff=parts.get("weight_diff"))
    if down is not None:
        assert up is not None
        if down.ndim < 2 or up.ndim < 2 or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"LoRA file '{path}': module '{module}' has mismatched rank shapes: down "
                f"{tuple(down.shape)}, up {tuple(up.shape)} (want down [rank, in], up [out, rank])"
            )
        rank = down.shape[0]
        if "alpha" in parts:
            alpha = parts["alpha"]
            if alpha.numel() != 1:
                raise ValueError(f"LoRA file '{path}': alpha of '{module}' is not a scalar")
            update.scale = float(alpha.item()) / rank
        else:
            update.scale = _peft_alpha(metadata, peft_name, rank)
    bias = parts.get("bias_diff")
    if "up_bias" in parts:
        if bias is not None:
            raise ValueError(
                f"LoRA file '{path}': module '{module}' has both diff_b and lora_B.bias"
            )
        bias = parts["up_bias"].float() * update.scale
    update.bias_diff = bias
    return update


def load_lora(path: str | Path, *, name: str | None = None) -> LoRAAdapter:
    """Read a LoRA ``.safetensors`` file (any layout of :data:`LAYOUTS_UNDERSTOOD`)."""
    tensors, metadata = read_safetensors_with_metadata(path)
    adapter_name = name if name is not None else Path(str(path)).name.removesuffix(".safetensors")
    return parse_lora_state_dict(tensors, metadata, name=adapter_name, path=str(path))


# --------------------------------------------------------------------------- targets
@dataclass(eq=False)
class _Target:
    """Where a module's update lands in the (possibly fused) network."""

    weight: nn.Parameter
    """The parameter the weight part updates."""
    bias: nn.Parameter | None
    """The parameter the bias part updates."""
    rows: slice | None = None
    """Rows of ``weight`` / ``bias`` belonging to this module (``q``/``k``/``v`` in ``qkv``)."""
    row_order: torch.Tensor | None = None
    """Output rows reorder applied at load time (the output head): ``new = old[row_order]``."""
    linear_name: str | None = None
    """Name of the linear layer holding ``weight`` in the network, when the update can
    run at run time."""

    @property
    def num_rows(self) -> int:
        if self.rows is None:
            return self.weight.shape[0]
        return self.rows.stop - self.rows.start


def _resolve_target(network: WanDiTNetwork, module_name: str) -> _Target | None:
    qkv_match = _SELF_QKV.match(module_name)
    if qkv_match is not None:
        block_index = int(qkv_match.group(1))
        if block_index >= len(network.blocks):
            return None
        attention = network.blocks[block_index].self_attn
        if attention.qkv is not None:
            dim = network.config.dim
            start = _QKV_INDEX[qkv_match.group(2)] * dim
            fused = attention.qkv
            rows = slice(start, start + dim)
            name = f"blocks.{block_index}.self_attn.qkv"
            return _Target(fused.weight, fused.bias, rows, linear_name=name)
    try:
        module = network.get_submodule(module_name)
    except AttributeError:
        try:
            return _Target(network.get_parameter(module_name), None)
        except AttributeError:
            return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        return None
    bias = getattr(module, "bias", None)
    target = _Target(weight, bias if isinstance(bias, nn.Parameter) else None)
    if isinstance(module, nn.Linear):
        target.linear_name = module_name
    if module_name == "head.head" and network._head_channels_first:
        out_dim = network.config.out_dim
        order = torch.arange(weight.shape[0]).reshape(network.patch_volume, out_dim).t()
        target.row_order = order.reshape(-1)
    return target


def _check_shapes(adapter: LoRAAdapter, module: str, update: LoRAUpdate, target: _Target) -> None:
    rows = target.num_rows
    trailing = tuple(target.weight.shape[1:])
    where = f"LoRA '{adapter.name}' ({adapter.path}), module '{module}'"
    if update.down is not None:
        assert update.up is not None
        if tuple(update.down.shape[1:]) != trailing or update.up.shape[0] != rows:
            raise ValueError(
                f"{where}: shapes do not fit the network: down {tuple(update.down.shape)}, up "
                f"{tuple(update.up.shape)} vs weight {(rows, *trailing)} (another model size?)"
            )
        if update.up.numel() != rows * update.down.shape[0]:
            raise ValueError(f"{where}: up {tuple(update.up.shape)} is not [out, rank]")
    if update.weight_diff is not None and tuple(update.weight_diff.shape) != (rows, *trailing):
        raise ValueError(
            f"{where}: diff {tuple(update.weight_diff.shape)} vs weight {(rows, *trailing)}"
        )
    if update.bias_diff is not None:
        if target.bias is None:
            raise ValueError(f"{where}: has a bias delta but the module has no bias")
        if tuple(update.bias_diff.shape) != (rows,):
            raise ValueError(
                f"{where}: bias delta {tuple(update.bias_diff.shape)} vs bias ({rows},)"
            )


def _resolve_adapter(network: WanDiTNetwork, adapter: LoRAAdapter) -> dict[str, _Target]:
    """Targets of every module of ``adapter``; raises before anything is changed."""
    targets = {module: _resolve_target(network, module) for module in adapter.updates}
    missing = [module for module, target in targets.items() if target is None]
    if missing:
        raise ValueError(
            f"LoRA '{adapter.name}' ({adapter.path}) targets {len(missing)} module(s) this "
            f"network does not have: {_listed(missing)} (a LoRA for another Wan model? the "
            f"network has {len(network.blocks)} blocks, image cross-attention "
            f"{network.config.cross_attn_enable_img})"
        )
    for module, update in adapter.updates.items():
        _check_shapes(adapter, module, update, targets[module])  # type: ignore[arg-type]
    return targets  # type: ignore[return-value]


def _ordered(tensor: torch.Tensor, target: _Target) -> torch.Tensor:
    return tensor if target.row_order is None else tensor[target.row_order.to(tensor.device)]


def _weight_delta(update: LoRAUpdate, target: _Target, strength: float, device) -> torch.Tensor:
    """fp32 delta of ``weight[rows]`` in the network's row order."""
    shape = (target.num_rows, *target.weight.shape[1:])
    delta = torch.zeros(shape, dtype=torch.float32, device=device)
    if update.down is not None:
        assert update.up is not None
        up = update.up.to(device, torch.float32).flatten(1)
        down = update.down.to(device, torch.float32).flatten(1)
        delta += (up @ down).reshape(shape) * (update.scale * strength)
    if update.weight_diff is not None:
        delta += update.weight_diff.to(device, torch.float32) * strength
    return _ordered(delta, target)


# --------------------------------------------------------------------------- run-time
@dataclass(frozen=True, eq=False)
class _RuntimeTerm:
    """One adapter's run-time update of one linear layer's output rows, ready to run: on the
    layer's device and dtype, strength and alpha / rank folded into ``up``, ``diff``, ``bias``."""

    rows: slice | None
    down: torch.Tensor | None
    up: torch.Tensor | None
    diff: torch.Tensor | None
    bias: torch.Tensor | None

    def output_delta(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        if self.down is not None:
            out = F.linear(F.linear(x, self.down), self.up)
        if self.diff is not None:
            full = F.linear(x, self.diff)
            out = full if out is None else out + full
        if self.bias is not None:
            out = self.bias if out is None else out + self.bias
        assert out is not None
        return out

    def apply(self, fn: Any) -> _RuntimeTerm:
        """The term with ``fn`` (a ``Module._apply`` function: ``.to()``, ...) on its tensors."""

        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return _RuntimeTerm(
            self.rows, moved(self.down), moved(self.up), moved(self.diff), moved(self.bias)
        )


def _device_copies(update: LoRAUpdate, target: _Target) -> tuple:
    """``(down, up, diff, bias)`` of ``update`` on the target's device and dtype, rows ordered."""
    like = target.weight
    key = (like.device, like.dtype, target.row_order is not None)
    if key not in update.device_copies:

        def cast(t: torch.Tensor | None, *, ordered: bool = True) -> torch.Tensor | None:
            if t is None:
                return None
            return (_ordered(t, target) if ordered else t).to(like.device, like.dtype)

        update.device_copies[key] = (
            cast(update.down, ordered=False),
            cast(update.up),
            cast(update.weight_diff),
            cast(update.bias_diff),
        )
    return update.device_copies[key]


def _runtime_term(parts: list[tuple[LoRAUpdate, _Target]], strength: float) -> _RuntimeTerm:
    """One adapter's run-time term of one linear layer. Several parts (``q``, ``k``, ``v`` of
    the fused ``qkv``) merge into one term: their down matrices stacked, their up matrices
    placed block-diagonally, so the layer runs one pair of thin matmuls per adapter."""
    if len(parts) == 1:
        (update, target), factor = parts[0], parts[0][0].scale * strength
        down, up, diff, bias = _device_copies(update, target)
        return _RuntimeTerm(
            target.rows, down, None if up is None else up * factor,
            None if diff is None else diff * strength, None if bias is None else bias * strength,
        )  # fmt: skip
    weight = parts[0][1].weight
    zeros = dict(device=weight.device, dtype=weight.dtype)
    total_rank = sum(update.rank or 0 for update, _ in parts)
    downs: list[torch.Tensor] = []
    up = torch.zeros(weight.shape[0], total_rank, **zeros)  # type: ignore[arg-type]
    diff = bias = None
    for update, target in parts:
        part_down, part_up, part_diff, part_bias = _device_copies(update, target)
        rows = slice(None) if target.rows is None else target.rows
        if part_down is not None:
            start = sum(d.shape[0] for d in downs)
            up[rows, start : start + part_down.shape[0]] = part_up * (update.scale * strength)
            downs.append(part_down)
        if part_diff is not None:
            diff = torch.zeros_like(weight) if diff is None else diff
            diff[rows] = part_diff * strength
        if part_bias is not None:
            bias = torch.zeros(weight.shape[0], **zeros) if bias is None else bias  # type: ignore[arg-type]
            bias[rows] = part_bias * strength
    if not downs:
        return _RuntimeTerm(None, None, None, diff, bias)
    return _RuntimeTerm(None, torch.cat(downs), up, diff, bias)


class LoRALinear(nn.Linear):
    """A linear layer plus run-time LoRA terms, standing in for the layer it wraps.

    It shares that layer's weight and bias (the state dict is unchanged). ``torch.compile``
    sees the terms' tensors as graph inputs: a re-weight, or a swap to adapters of the same
    ranks, reuses the compiled graph; adding or removing a term recompiles the block.
    """

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.train(base.training)
        self.terms: list[_RuntimeTerm] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        for term in self.terms:
            # out is a fresh tensor: update it in place
            if term.rows is None:
                out += term.output_delta(x)
            else:
                out[..., term.rows] += term.output_delta(x)
        return out

    def _apply(self, fn: Any, recurse: bool = True) -> LoRALinear:
        super()._apply(fn, recurse)
        self.terms = [term.apply(fn) for term in self.terms]
        return self


def _set_submodule(network: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(network.get_submodule(parent_name), attribute, module)


# --------------------------------------------------------------------------- the set
def _check_strength(name: str, strength: float) -> None:
    if not math.isfinite(strength):
        raise ValueError(f"LoRA '{name}': strength must be finite, got {strength}")


@dataclass(eq=False)
class _Active:
    """One applied adapter (replaced, not changed, when its strength or mode changes)."""

    adapter: LoRAAdapter
    targets: dict[str, _Target]
    strength: float
    fused: bool
    runtime_terms: dict[tuple, _RuntimeTerm] = field(default_factory=dict)
    """(linear layer name, device, dtype) -> its run-time term, built on first use."""


class WanLoRAs:
    """The LoRA adapters applied to one :class:`WanDiTNetwork`, changed in place.

    Every change (add, remove, re-weight, fuse, unfuse, replace) recomputes each
    touched parameter from its saved original as ``original + sum of the folded
    updates`` (in fp32, adapters in order, one cast), so the weights after any
    sequence of changes are bit for bit those of applying the final set to the
    original network, and :meth:`clear` restores the original exactly. The
    originals of touched parameters are kept on the CPU while a folded update
    touches them. Run-time (unfused) adapters run in :class:`LoRALinear` layers standing in
    for the linear layers they touch (same parameters) and leave the weights alone.

    Apply to the network in its final dtype and layout (after
    ``update_parameters_after_loading_checkpoint`` and the dtype cast). Every
    method checks all its input before changing anything: a failed call leaves
    the network as it was.
    """

    def __init__(
        self, network: WanDiTNetwork, *, on_change: Callable[[], None] | None = None
    ) -> None:
        self.network = network
        # Called after every change (the transformer drops its captured CUDA graphs:
        # they would replay the run-time terms they captured).
        self._on_change = on_change
        self._active: list[_Active] = []
        self._originals: dict[nn.Parameter, torch.Tensor] = {}
        # name -> (original linear layer, the LoRALinear standing in for it)
        self._wrapped: dict[str, tuple[nn.Linear, LoRALinear]] = {}
        self.frozen_reason: str | None = None
        """Why the adapter set can no longer change (see :meth:`freeze`), or ``None``."""

    @classmethod
    def from_configs(
        cls,
        network: WanDiTNetwork,
        configs: Iterable[LoRAConfig],
        *,
        on_change: Callable[[], None] | None = None,
    ) -> WanLoRAs:
        """Read and apply the adapters of ``configs`` (all files are read before any is applied)."""
        loras = cls(network, on_change=on_change)
        configs = list(configs)
        if configs:
            loras.replace(configs)
        return loras

    # -------------------------------------------------------------- queries
    @property
    def names(self) -> list[str]:
        """Names of the applied adapters, in order."""
        return [active.adapter.name for active in self._active]

    def strength(self, name: str) -> float:
        return self._find(name).strength

    def is_fused(self, name: str) -> bool:
        return self._find(name).fused

    @property
    def touches_context_projections(self) -> bool:
        """Whether an adapter changes the text / image key-value path, whose outputs a
        rollout caches (``initialize_cache``): a change then needs that cache rebuilt."""
        return any(
            _CONTEXT_PROJECTION.match(module)
            for active in self._active
            for module in active.adapter.updates
        )

    # -------------------------------------------------------------- changes
    def add(
        self,
        adapter: LoRAAdapter | LoRAConfig | str | Path,
        strength: float = 1.0,
        *,
        fused: bool = True,
        name: str | None = None,
    ) -> None:
        """Apply one more adapter (a file path, a :class:`LoRAConfig` or a read adapter)."""
        entry = self._prepare(adapter, strength, fused, name, taken=set(self.names))
        self._commit([*self._active, entry])

    def remove(self, name: str) -> None:
        """Take an adapter off (its share of the weights is removed exactly)."""
        self._find(name)
        self._commit([active for active in self._active if active.adapter.name != name])

    def set_strength(self, name: str, strength: float) -> None:
        """Re-weight an adapter in place."""
        self._find(name)
        _check_strength(name, strength)
        self._commit(
            [
                _Active(a.adapter, a.targets, strength, a.fused) if a.adapter.name == name else a
                for a in self._active
            ]
        )

    def fuse(self, names: Iterable[str] | None = None) -> None:
        """Fold adapters (default: all) into the weights: no run-time cost."""
        self._set_fused(names, True)

    def unfuse(self, names: Iterable[str] | None = None) -> None:
        """Take adapters (default: all) out of the weights and run them at run time; with
        every adapter unfused the linear weights are the originals, bit for bit."""
        self._set_fused(names, False)

    def replace(
        self,
        adapters: Iterable[LoRAAdapter | LoRAConfig | str | Path],
        *,
        strength: float = 1.0,
        fused: bool = True,
    ) -> None:
        """Swap the whole set for ``adapters`` in one change, exactly as if clearing and
        adding them. A :class:`LoRAConfig` carries its own strength and mode; paths and
        read adapters (:func:`load_lora`, to swap without reading files) get ``strength``
        and ``fused``."""
        entries: list[_Active] = []
        for adapter in adapters:
            taken = {entry.adapter.name for entry in entries}
            entries.append(self._prepare(adapter, strength, fused, None, taken=taken))
        self._commit(entries)

    def clear(self) -> None:
        """Remove every adapter: the weights are the originals again, bit for bit."""
        self._commit([])

    def freeze(self, reason: str) -> None:
        """Keep the applied adapters as they are from now on: every later change raises
        ``ValueError`` with ``reason``. For weights replaced in a way the saved originals
        cannot be folded into again (quantised weights); the originals are released."""
        self.frozen_reason = reason
        self._originals.clear()

    # -------------------------------------------------------------- internals
    def _find(self, name: str) -> _Active:
        for active in self._active:
            if active.adapter.name == name:
                return active
        raise KeyError(
            f"no LoRA adapter named '{name}' is applied (applied: {self.names or 'none'})"
        )

    def _set_fused(self, names: Iterable[str] | None, fused: bool) -> None:
        chosen = set(self.names if names is None else names)
        for name in chosen:
            self._find(name)
        self._commit(
            [
                _Active(a.adapter, a.targets, a.strength, fused) if a.adapter.name in chosen else a
                for a in self._active
            ]
        )

    def _prepare(
        self,
        adapter: LoRAAdapter | LoRAConfig | str | Path,
        strength: float,
        fused: bool,
        name: str | None,
        *,
        taken: set[str],
    ) -> _Active:
        if isinstance(adapter, LoRAConfig):
            strength, fused, name = adapter.strength, adapter.fused, adapter.name
            adapter = adapter.path
        if not isinstance(adapter, LoRAAdapter):
            adapter = load_lora(adapter, name=name)
        elif name is not None and name != adapter.name:
            adapter = LoRAAdapter(name, adapter.path, adapter.layout, adapter.updates)
        _check_strength(adapter.name, strength)
        if adapter.name in taken:
            raise ValueError(
                f"a LoRA adapter named '{adapter.name}' is already applied; give this one "
                "another name"
            )
        return _Active(adapter, _resolve_adapter(self.network, adapter), strength, fused)

    def _folded(self, active: _Active, target: _Target) -> bool:
        return active.fused or target.linear_name is None

    @torch.no_grad()
    def _commit(self, new_active: list[_Active]) -> None:
        """Make the network's weights and run-time layers those of ``new_active`` (all checked)."""
        if self.frozen_reason is not None:
            raise ValueError(f"the LoRA adapters cannot change: {self.frozen_reason}")
        changed = [a for a in self._active if a not in new_active]
        changed += [a for a in new_active if a not in self._active]
        # parameters whose folded updates change (run-time ones leave the weights alone)
        touched: dict[nn.Parameter, None] = {}
        for active in changed:
            for target in active.targets.values():
                if self._folded(active, target):
                    touched[target.weight] = None
                    if target.bias is not None:
                        touched[target.bias] = None
        for param in touched:
            if param not in self._originals:
                self._originals[param] = param.detach().to("cpu", copy=True)
        self._active = new_active
        for param in touched:
            if not self._recompute(param):
                del self._originals[param]
        self._rebuild_runtime()
        if self._on_change is not None:
            self._on_change()

    def _recompute(self, param: nn.Parameter) -> bool:
        """Set ``param`` to its original plus the folded updates; whether there are any."""
        total = self._originals[param].to(param.device, torch.float32, copy=True)
        folded = False
        for active in self._active:
            for module, target in active.targets.items():
                is_weight = target.weight is param
                if not (is_weight or target.bias is param) or not self._folded(active, target):
                    continue
                folded = True
                update = active.adapter.updates[module]
                rows = slice(None) if target.rows is None else target.rows
                if is_weight:
                    if update.down is not None or update.weight_diff is not None:
                        total[rows] += _weight_delta(update, target, active.strength, total.device)
                elif update.bias_diff is not None:
                    bias = _ordered(update.bias_diff.to(total.device, torch.float32), target)
                    total[rows] += bias * active.strength
        param.copy_(total.to(param.dtype))
        return folded

    def _rebuild_runtime(self) -> None:
        """Wrap the linear layers with run-time terms in :class:`LoRALinear`, unwrap the rest."""
        wanted: dict[str, list[_RuntimeTerm]] = {}
        for active in self._active:
            parts: dict[str, list[tuple[LoRAUpdate, _Target]]] = {}
            for module, target in active.targets.items():
                if not self._folded(active, target):
                    assert target.linear_name is not None
                    parts.setdefault(target.linear_name, []).append(
                        (active.adapter.updates[module], target)
                    )
            for name, linear_parts in parts.items():
                weight = linear_parts[0][1].weight
                key = (name, weight.device, weight.dtype)
                if key not in active.runtime_terms:
                    active.runtime_terms[key] = _runtime_term(linear_parts, active.strength)
                wanted.setdefault(name, []).append(active.runtime_terms[key])
        for name in wanted:
            if name not in self._wrapped:
                original = self.network.get_submodule(name)
                wrapper = LoRALinear(original)
                _set_submodule(self.network, name, wrapper)
                self._wrapped[name] = (original, wrapper)
        for name, (original, wrapper) in list(self._wrapped.items()):
            if name in wanted:
                wrapper.terms = wanted[name]
            else:
                _set_submodule(self.network, name, original)
                del self._wrapped[name]
