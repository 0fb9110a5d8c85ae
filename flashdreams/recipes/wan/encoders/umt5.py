"""UMT5 text encoder for Wan: prompts -> [B, text_len, dim] embeddings, zero after the prompt.

Runs transformers' ``UMT5EncoderModel``. Weights come from a local Hugging
Face folder, from Wan's original ``models_t5_umt5-xxl-enc-bf16.pth`` (its
key layout is remapped here), or, for tests and demos, from a random
initialisation. ``transformers`` is imported only when an encoder is built.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flashdreams.core.checkpoint import (
    empty_init,
    load_checkpoint,
    load_state_dict_into_module,
    remap_checkpoint_keys,
    resolve_local_checkpoint,
)
from flashdreams.infra.encoder import Encoder, EncoderConfig

BUILTIN_BYTE_TOKENIZER = "builtin:bytes"
"""``tokenizer_path`` value selecting the file-free byte tokenizer (tests and demos only)."""

WAN_UMT5_CHECKPOINT_URL = (
    "https://huggingface.co/Wan-AI/Wan2.1-T2V-14B/resolve/main/models_t5_umt5-xxl-enc-bf16.pth"
)

# Wan's T5 encoder layout -> transformers' UMT5EncoderModel layout.
WAN_T5_TO_HF_UMT5_PATTERNS: list[tuple[str, str]] = [
    (
        r"^blocks\.(\d+)\.attn\.(q|k|v|o)\.weight$",
        r"encoder.block.\1.layer.0.SelfAttention.\2.weight",
    ),
    (
        r"^blocks\.(\d+)\.pos_embedding\.embedding\.weight$",
        r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    (r"^blocks\.(\d+)\.norm1\.weight$", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"^blocks\.(\d+)\.norm2\.weight$", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (
        r"^blocks\.(\d+)\.ffn\.gate\.0\.weight$",
        r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight",
    ),
    (r"^blocks\.(\d+)\.ffn\.fc1\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"^blocks\.(\d+)\.ffn\.fc2\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
    (r"^norm\.weight$", r"encoder.final_layer_norm.weight"),
    (r"^token_embedding\.weight$", r"shared.weight"),
]
"""``(regex, replacement)`` pairs for :func:`remap_checkpoint_keys` (Wan T5 -> HF UMT5)."""


def wan_t5_state_dict_transform(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Wan's original T5 encoder keys to ``UMT5EncoderModel`` keys.

    The token embedding is shared: it is written to both ``shared.weight`` and
    ``encoder.embed_tokens.weight``.
    """
    remapped = remap_checkpoint_keys(sd, WAN_T5_TO_HF_UMT5_PATTERNS)
    if "shared.weight" in remapped:
        remapped["encoder.embed_tokens.weight"] = remapped["shared.weight"]
    return remapped


def clean_prompt(text: str) -> str:
    """Wan's prompt clean-up before tokenizing, step for step as upstream does it.

    ``ftfy.fix_text`` (repairs mojibake such as ``"cafÃ©"`` and odd quotes), HTML
    unescaping twice (``"&amp;amp;"`` -> ``"&"``), then whitespace runs folded to one
    space and the ends stripped.
    """
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class ByteTokenizer:
    """File-free tokenizer for tests and demos: UTF-8 bytes shifted past the special ids.

    ids: ``0`` = pad, ``1`` = end of sequence, ``2`` = unknown (unused),
    byte ``b`` -> ``b + 3``. Each prompt is cut so that it plus the end token
    fit in ``max_length``, then padded with ``0``.
    """

    pad_id = 0
    eos_id = 1
    byte_offset = 3
    vocab_size = 256 + byte_offset

    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(input_ids, attention_mask)``, both [B, max_length] int64."""
        input_ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [byte + self.byte_offset for byte in text.encode("utf-8")][: max_length - 1]
            ids.append(self.eos_id)
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask


@dataclass(kw_only=True)
class UMT5TextEncoderConfig(EncoderConfig):
    """Config for :class:`UMT5TextEncoder`; architecture defaults are UMT5-XXL as Wan uses it."""

    _target: type[UMT5TextEncoder] = field(default_factory=lambda: UMT5TextEncoder)
    """Always :class:`UMT5TextEncoder`."""

    checkpoint_path: str | None = WAN_UMT5_CHECKPOINT_URL
    """Local weights: a Hugging Face folder (``config.json`` + safetensors, e.g. a
    ``UMT5EncoderModel`` or the full ``google/umt5-xxl``), or Wan's original
    ``models_t5_umt5-xxl-enc-bf16.pth`` (remapped from Wan's layout). The default
    names the upstream file, which is never downloaded. ``None`` builds a randomly
    initialised encoder from the architecture fields (tests and demos only;
    deterministic under ``torch.manual_seed``)."""

    config_path: str | None = None
    """Architecture for a ``.pth`` checkpoint: a ``config.json`` or a folder holding one.
    ``None`` uses the architecture fields below. Ignored for Hugging Face folders."""

    tokenizer_path: str = "google/umt5-xxl"
    """Local tokenizer folder for ``AutoTokenizer`` (Wan ships it as
    ``google/umt5-xxl/`` inside its checkpoint folder). Only local folders are read.
    ``"builtin:bytes"`` selects a file-free byte tokenizer (tests and demos only)."""

    text_len: int = 512
    """Tokens per prompt: prompts are cut / padded to this length."""

    dtype: torch.dtype = torch.bfloat16
    """Parameter and output dtype."""

    model_dim: int = 4096
    """Hidden size (``d_model``) for random init or a ``.pth`` without ``config_path``."""

    num_layers: int = 24
    """Encoder blocks."""

    num_heads: int = 64
    """Attention heads; the head size is ``model_dim // num_heads``."""

    ffn_dim: int = 10240
    """Gated-GELU feed-forward width."""

    vocab_size: int = 256384
    """Token embedding rows."""

    num_relative_buckets: int = 32
    """Relative-position buckets per block."""

    relative_max_distance: int = 128
    """Distance at which relative positions saturate."""


class UMT5TextEncoder(Encoder):
    """UMT5 encoder: ``forward(prompts)`` -> [B, text_len, dim].

    Positions after each prompt's real tokens (its end token included) are
    exactly zero, as Wan's cross-attention expects.
    """

    def __init__(self, config: UMT5TextEncoderConfig) -> None:
        super().__init__(config)
        self.config: UMT5TextEncoderConfig = config
        if config.text_len < 2:
            raise ValueError(
                f"text_len must be at least 2 (a token and the end token); got {config.text_len}"
            )
        self.tokenizer = _load_tokenizer(config.tokenizer_path)
        self.model = _build_model(config)
        self.model.to(config.dtype).eval()
        self.model.requires_grad_(False)
        if (
            isinstance(self.tokenizer, ByteTokenizer)
            and self.model.config.vocab_size < ByteTokenizer.vocab_size
        ):
            raise ValueError(
                f"the builtin byte tokenizer needs vocab_size >= {ByteTokenizer.vocab_size}; "
                f"the model has {self.model.config.vocab_size}"
            )

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(input_ids, attention_mask)`` [B, text_len] for cleaned prompts."""
        cleaned = [clean_prompt(prompt) for prompt in prompts]
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer(cleaned, max_length=self.config.text_len)
        tokens = self.tokenizer(
            cleaned,
            padding="max_length",
            truncation=True,
            max_length=self.config.text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return tokens["input_ids"], tokens["attention_mask"]

    @torch.no_grad()
    def forward(self, input: list[str] | str) -> torch.Tensor:
        """Encode prompts to [B, text_len, dim] in ``config.dtype``, zero after the real tokens."""
        prompts = [input] if isinstance(input, str) else list(input)
        if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
            raise ValueError("UMT5TextEncoder expects a non-empty list of prompt strings")
        device = next(self.model.parameters()).device
        input_ids, attention_mask = self.tokenize(prompts)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)


def _load_tokenizer(tokenizer_path: str) -> Any:
    if tokenizer_path == BUILTIN_BYTE_TOKENIZER:
        return ByteTokenizer()
    local = Path(tokenizer_path).expanduser()
    if not local.is_dir():
        raise FileNotFoundError(
            f"UMT5 tokenizer '{tokenizer_path}' is not a local folder, and this stack never "
            f"downloads files. Put the tokenizer files (e.g. the 'google/umt5-xxl' folder that "
            f"ships with the Wan 2.1 checkpoints: tokenizer.json / spiece.model and "
            f"tokenizer_config.json) in a folder and set tokenizer_path to it, or use "
            f"tokenizer_path='{BUILTIN_BYTE_TOKENIZER}' for tests."
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(local), local_files_only=True)


def _config_from_fields(config: UMT5TextEncoderConfig) -> Any:
    from transformers import UMT5Config

    if config.model_dim % config.num_heads != 0:
        raise ValueError(
            f"model_dim ({config.model_dim}) must be divisible by num_heads ({config.num_heads})"
        )
    return UMT5Config(
        vocab_size=config.vocab_size,
        d_model=config.model_dim,
        d_kv=config.model_dim // config.num_heads,
        d_ff=config.ffn_dim,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.num_relative_buckets,
        relative_attention_max_distance=config.relative_max_distance,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=True,
    )


def _build_model(config: UMT5TextEncoderConfig) -> Any:
    from transformers import UMT5Config, UMT5EncoderModel

    if config.checkpoint_path is None:
        return UMT5EncoderModel(_config_from_fields(config))
    local = resolve_local_checkpoint(config.checkpoint_path, what="UMT5 text encoder checkpoint")
    if local.is_dir():
        if not (local / "config.json").exists():
            raise FileNotFoundError(
                f"UMT5 checkpoint folder '{local}' has no config.json; expected a Hugging Face "
                f"model folder (save_pretrained layout)"
            )
        return UMT5EncoderModel.from_pretrained(str(local), local_files_only=True)
    if config.config_path is not None:
        config_file = Path(config.config_path).expanduser()
        if config_file.is_dir():
            config_file = config_file / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"UMT5 config not found: '{config_file}' does not exist")
        model_config = UMT5Config.from_json_file(str(config_file))
    else:
        model_config = _config_from_fields(config)
    # Every weight comes from the file: build without random initialisation.
    with empty_init():
        model = UMT5EncoderModel(model_config)
    state_dict = load_checkpoint(local)
    if "token_embedding.weight" in state_dict:
        state_dict = wan_t5_state_dict_transform(state_dict)
    load_state_dict_into_module(model, state_dict, source=f"UMT5 checkpoint '{local}'")
    return model
