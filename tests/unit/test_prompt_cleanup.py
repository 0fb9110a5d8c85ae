"""Wan's prompt clean-up (ftfy, HTML unescaping, whitespace folding) runs before tokenizing."""

from __future__ import annotations

import torch

from flashdreams.recipes.wan.encoders.umt5 import (
    UMT5TextEncoderConfig,
    clean_prompt,
)

# mojibake (UTF-8 read as Latin-1, curly quotes too), a doubly escaped entity, whitespace runs
MOJIBAKE_PROMPT = "  A cafÃ© &amp;amp; a â€œbarâ€\x9d\n\tat   night  "
UPSTREAM_CLEANED = 'A café & a "bar" at night'  # ftfy also straightens quotes


def test_clean_prompt_repairs_mojibake_and_entities_as_upstream():
    assert clean_prompt(MOJIBAKE_PROMPT) == UPSTREAM_CLEANED
    assert clean_prompt("&lt;b&gt; bold") == "<b> bold"
    assert clean_prompt("plain prompt") == "plain prompt"


def test_encoder_tokenizes_the_cleaned_prompt():
    encoder = UMT5TextEncoderConfig(
        checkpoint_path=None,
        tokenizer_path="builtin:bytes",
        dtype=torch.float32,
        text_len=64,
        model_dim=16,
        num_layers=1,
        num_heads=2,
        ffn_dim=32,
        vocab_size=300,
    ).setup()
    ids, mask = encoder.tokenize([MOJIBAKE_PROMPT])
    expected_ids, expected_mask = encoder.tokenize([UPSTREAM_CLEANED])
    assert torch.equal(ids, expected_ids) and torch.equal(mask, expected_mask)
    decoded = bytes(int(i) - 3 for i in ids[0] if int(i) >= 3).decode("utf-8")
    assert decoded == UPSTREAM_CLEANED
