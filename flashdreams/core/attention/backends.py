"""Attention backends, registered with the constraints they impose.

Layout everywhere in this package (the Wan network's layout)::

    q    [B, Lq, H, D]      B batch, Lq query tokens, H heads, D head dim
    k, v [B, Lk, H, D]      Lk key tokens
    key_padding_mask [B, Lk] bool, True = real key, False = padding (or None)
    out  [B, Lq, H, D]      in q.dtype
    lse  [B, H, Lq]         float32 log-sum-exp of the scaled scores per query

Ring attention needs ``lse`` to merge partial results. Torch's fused kernels
that return it are CUDA-only, so the ``"math"`` backend computes it
explicitly (fp32, chunked over queries) and is the CPU path.

Backends:

* ``"math"``: CPU and CUDA, any float dtype, masks, returns lse.
* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``; CPU and
  CUDA, masks, no lse.
* ``"torch_efficient"``: torch's memory-efficient CUDA kernel through
  ``aten._scaled_dot_product_efficient_attention``; returns lse, no mask.
* ``"flash_attn"``: the optional ``flash-attn`` package (``pip install
  'flashdreams[gpu]'``); CUDA, fp16/bf16, returns lse, no mask.
* ``"cudnn"``: torch SDPA pinned to the cuDNN kernel; CUDA, no lse, no mask.
* ``"te_fused"``: transformer-engine's fused attention (``DotProductAttention``,
  ``pip install -e '.[gpu]'``); CUDA, fp16/bf16, no lse (so not under ring CP), no
  mask; imported on first use only.

A backend without mask support still serves a padding mask that is a prefix
(real keys first, padding after, the same count in every batch row), which
is what :mod:`flashdreams.core.distributed.sharding` produces: the padded keys
are sliced off instead of masked.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec

import torch

# (q, k, v, key_padding_mask or None) -> (out [B, Lq, H, D], lse [B, H, Lq] fp32 or None)
AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"],
    "tuple[torch.Tensor, torch.Tensor | None]",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class AttentionBackend:
    """One attention implementation and what it can do."""

    name: str
    """Registry key, e.g. ``"sdpa"``."""
    fn: AttentionFn
    """Computes ``(out, lse or None)`` for ``[B, L, H, D]`` inputs."""
    device_types: tuple[str, ...]
    """Device types it runs on (``"cpu"``, ``"cuda"``)."""
    dtypes: tuple[torch.dtype, ...]
    """Input dtypes it accepts."""
    supports_mask: bool
    """Whether it applies an arbitrary key padding mask."""
    returns_lse: bool
    """Whether it returns the log-sum-exp needed by ring merges."""
    is_available: Callable[[], bool] = lambda: True
    """Whether its dependencies are installed (checked lazily, never at import)."""
    install_hint: str = ""
    """What to install when it is unavailable."""

    def unsupported_reason(self, q: torch.Tensor, *, need_lse: bool, need_mask: bool) -> str | None:
        """Why this backend cannot serve the call, or ``None`` if it can."""
        if q.device.type not in self.device_types:
            return f"runs on {'/'.join(self.device_types)}, not {q.device.type}"
        if q.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"accepts dtypes {names}, not {str(q.dtype).removeprefix('torch.')}"
        if need_lse and not self.returns_lse:
            return "does not return the log-sum-exp"
        if need_mask and not self.supports_mask:
            return "does not support a key padding mask that is not a prefix"
        if not self.is_available():
            return f"is not installed ({self.install_hint})"
        return None


_REGISTRY: dict[str, AttentionBackend] = {}
# Order "auto" tries: fastest first on each device.
_AUTO_ORDER = ["flash_attn", "torch_efficient", "sdpa", "cpu_flash", "math"]


def register_attention_backend(backend: AttentionBackend, *, overwrite: bool = False) -> None:
    """Add a backend to the registry (``overwrite=True`` to replace one)."""
    if backend.name in _REGISTRY and not overwrite:
        raise ValueError(f"attention backend {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend


def list_attention_backends() -> list[str]:
    """Names of all registered backends (available or not)."""
    return sorted(_REGISTRY)


def get_attention_backend(name: str) -> AttentionBackend:
    """Look up a backend by name; ``KeyError`` lists the registered ones."""
    if name not in _REGISTRY:
        raise KeyError(
            f"unknown attention backend {name!r}; registered: {', '.join(list_attention_backends())}"
        )
    return _REGISTRY[name]


def select_attention_backend(
    q: torch.Tensor, *, need_lse: bool, need_mask: bool = False, backend: str = "auto"
) -> AttentionBackend:
    """Resolve ``backend`` (a name or ``"auto"``) for these inputs.

    ``"auto"`` takes the first backend of flash_attn, torch_efficient, sdpa,
    cpu_flash, math that fits. A named backend that cannot serve the call raises
    ``ValueError`` saying why.
    """
    if backend != "auto":
        chosen = get_attention_backend(backend)
        reason = chosen.unsupported_reason(q, need_lse=need_lse, need_mask=need_mask)
        if reason is not None:
            raise ValueError(f"attention backend {backend!r} {reason}")
        return chosen
    for name in _AUTO_ORDER + [n for n in _REGISTRY if n not in _AUTO_ORDER]:
        candidate = _REGISTRY.get(name)
        if candidate is None:
            continue
        if candidate.unsupported_reason(q, need_lse=need_lse, need_mask=need_mask) is None:
            return candidate
    raise ValueError(
        f"no attention backend serves device={q.device.type} dtype={q.dtype} "
        f"need_lse={need_lse} need_mask={need_mask}"
    )


def _check_shapes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "attention expects q, k, v of shape [B, L, H, D]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads and head dim"
        )
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or key_padding_mask.shape != k.shape[:2]
    ):
        raise ValueError(
            f"key_padding_mask must be bool [B, Lk] = {tuple(k.shape[:2])}; got "
            f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )


def _prefix_length(key_padding_mask: torch.Tensor) -> int | None:
    """Shared valid-prefix length of a mask, or ``None`` if it is not a prefix mask."""
    counts = key_padding_mask.sum(dim=1)
    count = int(counts[0])
    if not bool((counts == count).all()):
        return None
    if not bool(key_padding_mask[:, :count].all()):
        return None
    return count


def _empty_result(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, lq, h, _ = q.shape
    out = torch.zeros_like(q)
    lse = torch.full((b, h, lq), -math.inf, dtype=torch.float32, device=q.device)
    return out, lse


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention returning ``(out, lse)``; see the module legend for shapes.

    Query rows with no valid key get ``out = 0`` and ``lse = -inf`` so an
    LSE merge ignores them. The scale is ``1/sqrt(D)``.
    """
    _check_shapes(q, k, v, key_padding_mask)
    return _dispatch(q, k, v, key_padding_mask, backend, need_lse=True)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention ``[B, Lq, H, D]``; rows with no valid key are zero."""
    _check_shapes(q, k, v, key_padding_mask)
    out, _ = _dispatch(q, k, v, key_padding_mask, backend, need_lse=False)
    return out


def _dispatch(q, k, v, key_padding_mask, backend, *, need_lse):
    if key_padding_mask is not None:
        chosen = None
        if backend == "auto":
            # Prefer a fast mask-free kernel when the mask is only trailing padding.
            fast = select_attention_backend(q, need_lse=need_lse, backend="auto")
            if not fast.supports_mask:
                chosen = fast
        else:
            chosen = get_attention_backend(backend)
        if chosen is not None and not chosen.supports_mask:
            prefix = _prefix_length(key_padding_mask)
            if prefix is not None:
                if prefix == 0:
                    return _empty_result(q)
                chosen = select_attention_backend(q, need_lse=need_lse, backend=chosen.name)
                return chosen.fn(q, k[:, :prefix], v[:, :prefix], None)
            if backend != "auto":
                select_attention_backend(q, need_lse=need_lse, need_mask=True, backend=backend)
        chosen = select_attention_backend(q, need_lse=need_lse, need_mask=True, backend=backend)
        return chosen.fn(q, k, v, key_padding_mask)
    if k.shape[1] == 0:
        return _empty_result(q)
    chosen = select_attention_backend(q, need_lse=need_lse, backend=backend)
    return chosen.fn(q, k, v, None)


# --------------------------------------------------------------------------- math
# Bound on the fp32 score block held at once, in elements (B * H * q_chunk * Lk).
_MATH_MAX_SCORE_ELEMENTS = 1 << 25


def _math_attention(q, k, v, key_padding_mask):
    """Explicit fp32 attention with log-sum-exp, chunked over queries."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    scale = 1.0 / math.sqrt(d)
    # [B, L, H, D] -> [B, H, L, D]
    qh = q.transpose(1, 2).float()
    kh = k.transpose(1, 2).float()
    vh = v.transpose(1, 2).float()
    bias = None
    if key_padding_mask is not None:
        # [B, Lk] -> additive [B, 1, 1, Lk]
        bias = torch.zeros(b, 1, 1, lk, dtype=torch.float32, device=q.device)
        bias.masked_fill_(~key_padding_mask[:, None, None, :], -math.inf)
    q_chunk = max(1, _MATH_MAX_SCORE_ELEMENTS // max(1, b * h * lk))
    outs, lses = [], []
    for start in range(0, lq, q_chunk):
        scores = torch.matmul(qh[:, :, start : start + q_chunk], kh.transpose(-1, -2))
        scores.mul_(scale)
        if bias is not None:
            scores.add_(bias)
        lse = torch.logsumexp(scores, dim=-1)  # [B, H, q]
        # Rows with no valid key: lse = -inf; keep exp() finite and the row at zero.
        safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        probs = torch.exp(scores.sub_(safe_lse[..., None]))
        outs.append(torch.matmul(probs, vh))
        lses.append(lse)
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    return out, torch.cat(lses, dim=2)


# --------------------------------------------------------------------------- sdpa
def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch SDPA in the ``[B, L, H, D]`` layout with a general boolean mask.

    ``mask`` is ``[B or 1, Lq or 1, Lk]`` (True = attend) or ``None``. Query rows
    that end up with no allowed key return zeros (some kernels give NaN there).
    """
    import torch.nn.functional as F

    # [B|1, Lq|1, Lk] -> [B|1, 1, Lq|1, Lk]
    attn_mask = None if mask is None else mask[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
    ).transpose(1, 2)
    if mask is not None:
        # [B|1, Lq|1, Lk] -> [B|1, Lq|1, 1, 1]
        has_key = mask.any(dim=-1)[..., None, None]
        out = torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.contiguous()


def _sdpa_attention(q, k, v, key_padding_mask):
    # [B, Lk] -> [B, 1, Lk]
    mask = None if key_padding_mask is None else key_padding_mask[:, None]
    return sdpa_attention(q, k, v, mask), None


def _cudnn_attention(q, k, v, key_padding_mask):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return _sdpa_attention(q, k, v, key_padding_mask)


def _cudnn_available() -> bool:
    return torch.cuda.is_available() and torch.backends.cudnn.is_available()


# ---------------------------------------------------------------- torch_efficient
def _torch_efficient_attention(q, k, v, key_padding_mask):
    assert key_padding_mask is None
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True
    )[:2]
    # The kernel may pad lse along the query axis to its block size.
    return out.transpose(1, 2).contiguous(), lse[..., : q.shape[1]].float()


# ---------------------------------------------------------------------- cpu_flash
def _cpu_flash_attention(q, k, v, key_padding_mask):
    """torch's fused CPU flash kernel, which also returns the log-sum-exp (ring on CPU)."""
    assert key_padding_mask is None
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    )[:2]
    return out.transpose(1, 2).contiguous(), lse.float()


def _cpu_flash_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


# ---------------------------------------------------------------------- flash_attn
def _flash_attn_attention(q, k, v, key_padding_mask):
    assert key_padding_mask is None
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    return out, lse.float()


def _flash_attn_available() -> bool:
    return torch.cuda.is_available() and find_spec("flash_attn") is not None


register_attention_backend(
    AttentionBackend(
        name="math",
        fn=_math_attention,
        device_types=("cpu", "cuda"),
        dtypes=_FLOAT_DTYPES,
        supports_mask=True,
        returns_lse=True,
    )
)
register_attention_backend(
    AttentionBackend(
        name="sdpa",
        fn=_sdpa_attention,
        device_types=("cpu", "cuda"),
        dtypes=_FLOAT_DTYPES,
        supports_mask=True,
        returns_lse=False,
    )
)
register_attention_backend(
    AttentionBackend(
        name="cpu_flash",
        fn=_cpu_flash_attention,
        device_types=("cpu",),
        dtypes=(torch.float32, torch.bfloat16),
        supports_mask=False,
        returns_lse=True,
        is_available=_cpu_flash_available,
        install_hint="needs torch >= 2.3",
    )
)
register_attention_backend(
    AttentionBackend(
        name="torch_efficient",
        fn=_torch_efficient_attention,
        device_types=("cuda",),
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
        supports_mask=False,
        returns_lse=True,
        is_available=torch.cuda.is_available,
        install_hint="needs a CUDA build of torch",
    )
)
register_attention_backend(
    AttentionBackend(
        name="flash_attn",
        fn=_flash_attn_attention,
        device_types=("cuda",),
        dtypes=(torch.float16, torch.bfloat16),
        supports_mask=False,
        returns_lse=True,
        is_available=_flash_attn_available,
        install_hint="pip install 'flashdreams[gpu]' on a CUDA machine",
    )
)
register_attention_backend(
    AttentionBackend(
        name="cudnn",
        fn=_cudnn_attention,
        device_types=("cuda",),
        dtypes=(torch.float16, torch.bfloat16),
        supports_mask=False,
        returns_lse=False,
        is_available=_cudnn_available,
        install_hint="needs a CUDA build of torch with cuDNN",
    )
)


# ------------------------------------------------------------- transformer-engine
def _te_fused_attention(q, k, v, key_padding_mask):
    assert key_padding_mask is None
    batch, num_queries, num_heads, head_dim = q.shape
    out = _te_dot_product_attention(num_heads, head_dim)(q, k, v)
    # [B, Lq, H*D] -> [B, Lq, H, D]
    return out.reshape(batch, num_queries, num_heads, head_dim), None


@functools.cache
def _te_dot_product_attention(num_heads: int, head_dim: int):  # noqa: ANN202
    """TE's fused attention module for ``[B, L, H, D]`` inputs without a mask (built once)."""
    from flashdreams.core.quantization import import_transformer_engine

    te = import_transformer_engine()
    return te.DotProductAttention(
        num_heads, head_dim, qkv_format="bshd", attn_mask_type="no_mask", attention_dropout=0.0
    )


def _te_available() -> bool:
    return torch.cuda.is_available() and find_spec("transformer_engine") is not None


register_attention_backend(
    AttentionBackend(
        name="te_fused",
        fn=_te_fused_attention,
        device_types=("cuda",),
        dtypes=(torch.float16, torch.bfloat16),
        supports_mask=False,
        returns_lse=False,
        is_available=_te_available,
        install_hint="pip install -e '.[gpu]' (transformer-engine[pytorch]) on a CUDA machine",
    )
)
