"""Weight quantisation of a network's linear layers (the low-precision tier).

Modes (the transformer config field ``quantization``):

* ``"none"``: weights stay in the compute dtype.
* ``"int8_weight_only"``: int8 weights with one scale per output channel, through
  torchao (``Int8WeightOnlyConfig``); the matmul dequantises on the fly, so it runs
  on CPU and GPU. Weight bytes ~0.25x of fp32 (0.5x of bf16).
* ``"fp8"``: float8 e4m3 weights with per-row (output channel) scales and dynamic
  per-token fp8 activations, through torchao (``Float8DynamicActivationFloat8WeightConfig``);
  fp8 GEMMs need a CUDA GPU with compute capability >= 8.9 (Ada, Hopper).
* ``"te_fp8"``: the linears become transformer-engine ``te.Linear`` layers (weights
  copied) run under TE's fp8 autocast (delayed scaling, e4m3 forward); needs CUDA and
  ``transformer-engine`` (the ``[gpu]`` extra).

Quantise after the checkpoint has loaded and the network has its compute dtype: the
quantised weights are tensor subclasses (torchao) or TE modules, not plain parameters
a checkpoint can be copied into. LoRA (run-time ``LoRALinear`` wrappers) does not
compose with a quantised base weight here: fuse LoRA into the weights before
quantising.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

QUANTIZATION_MODES = ("none", "int8_weight_only", "fp8", "te_fp8")
"""Accepted values of the ``quantization`` config field."""

LinearFilter = Callable[[nn.Module, str], bool]


def check_quantization_mode(mode: str, field_name: str = "quantization") -> None:
    """Raise ``ValueError`` unless ``mode`` is one of :data:`QUANTIZATION_MODES`."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(
            f"{field_name} must be one of {', '.join(QUANTIZATION_MODES)}; got {mode!r}"
        )


def fp8_support_problem() -> str | None:
    """Why this machine cannot run fp8 GEMMs, or ``None`` when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name()
        return f"{name} has compute capability {major}.{minor} (fp8 GEMMs need >= 8.9: Ada, Hopper)"
    return None


_NOISY_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")
"""Loggers that report optional kernels a CPU build cannot load (torchao's CUDA extensions)
and deprecations of torch's pytree registry, on import: nothing a user can act on."""


def import_torchao_quantization() -> Any:
    """``torchao.quantization``, imported quietly (its optional CUDA kernels log on CPU builds)."""
    noisy_loggers = [logging.getLogger(name) for name in _NOISY_IMPORT_LOGGERS]
    levels = [noisy.level for noisy in noisy_loggers]
    for noisy in noisy_loggers:
        noisy.setLevel(logging.ERROR)
    try:
        import torchao.quantization as quantization
    except ImportError as error:
        raise ImportError(
            f"quantization needs torchao ({error}); install it with `pip install torchao`"
        ) from None
    finally:
        for noisy, level in zip(noisy_loggers, levels, strict=True):
            noisy.setLevel(level)
    return quantization


def import_transformer_engine() -> Any:
    """``transformer_engine.pytorch``, or an ``ImportError`` of one line saying what to install."""
    if not torch.cuda.is_available():
        raise ImportError(
            "transformer-engine needs a CUDA GPU and none is available; use another mode "
            "(quantization=int8_weight_only, attention backend sdpa)"
        )
    try:
        import transformer_engine.pytorch as te
    except ImportError:
        raise ImportError(
            "transformer-engine is not installed; install the GPU extra: "
            "pip install -e '.[gpu]' (or pip install transformer-engine[pytorch])"
        ) from None
    return te


def quantize_linear_weights(
    module: nn.Module, mode: str, *, filter_fn: LinearFilter | None = None
) -> None:
    """Quantise the ``nn.Linear`` layers of ``module`` in place.

    Args:
        module: the network, checkpoint loaded, in its compute dtype.
        mode: one of :data:`QUANTIZATION_MODES`; ``"none"`` does nothing.
        filter_fn: ``(linear, qualified_name) -> bool`` choosing the linears; all
            ``nn.Linear`` layers by default.

    ``fp8`` and ``te_fp8`` layers are converted on the current CUDA device (one layer at a
    time, so the full-precision network never has to fit there); the rest of the network
    follows with the pipeline's ``.to(device)``. Raises ``ValueError`` for ``fp8`` on
    hardware without fp8 GEMMs and ``ImportError`` (one line) for ``te_fp8`` without
    transformer-engine or CUDA.
    """
    check_quantization_mode(mode)
    if mode == "none":
        return

    def chosen(child: nn.Module, name: str) -> bool:
        if not isinstance(child, nn.Linear):
            return False
        return filter_fn is None or filter_fn(child, name)

    targets = [(name, child) for name, child in module.named_modules() if chosen(child, name)]
    if mode == "te_fp8":
        _swap_to_te_linear(module, targets)
        return
    if mode == "fp8":
        problem = fp8_support_problem()
        if problem is not None:
            raise ValueError(
                f"quantization=fp8 cannot run here: {problem}; use "
                "quantization=int8_weight_only (CPU and GPU) or none"
            )
    quantization = import_torchao_quantization()
    if mode == "int8_weight_only":
        config = quantization.Int8WeightOnlyConfig()
    else:
        config = quantization.Float8DynamicActivationFloat8WeightConfig(
            granularity=quantization.PerRow()
        )
    # One linear at a time: at most one layer is held at full precision on the GPU.
    for _, linear in targets:
        if mode == "fp8":
            linear.to(torch.device("cuda", torch.cuda.current_device()))
        quantization.quantize_(linear, config)


def _swap_to_te_linear(module: nn.Module, targets: list[tuple[str, nn.Linear]]) -> None:
    """Replace the ``targets`` (qualified name, linear) by CUDA ``te.Linear`` layers, same weights."""
    te = import_transformer_engine()
    for name, linear in targets:
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        replacement = te.Linear(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            params_dtype=linear.weight.dtype,
            device=torch.device("cuda", torch.cuda.current_device()),
        )
        with torch.no_grad():
            replacement.weight.copy_(linear.weight)
            if linear.bias is not None:
                replacement.bias.copy_(linear.bias)
        setattr(parent, attribute, replacement)


def te_fp8_autocast(enabled: bool) -> Any:
    """TE's fp8 autocast context for a ``te_fp8`` network (a null context otherwise)."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    te = import_transformer_engine()
    from transformer_engine.common import recipe

    return te.fp8_autocast(enabled=True, fp8_recipe=recipe.DelayedScaling())


def tensor_storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, counting the inner tensors of a quantised tensor subclass."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        inner_names, _ = tensor.__tensor_flatten__()
        return sum(
            tensor_storage_bytes(inner)
            for inner in (getattr(tensor, name) for name in inner_names)
            if isinstance(inner, torch.Tensor)
        )
    return tensor.numel() * tensor.element_size()


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of all parameters of ``module`` (quantised weights counted at their storage size)."""
    return sum(tensor_storage_bytes(parameter) for parameter in module.parameters())
