"""UMT5 text encoder and CLIP image encoder: parity with transformers, Wan layouts, errors."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from flashdreams.recipes.wan.encoders import (
    BUILTIN_BYTE_TOKENIZER,
    CLIPImageEncoder,
    CLIPImageEncoderConfig,
    UMT5TextEncoder,
    UMT5TextEncoderConfig,
)
from flashdreams.recipes.wan.encoders.clip import CLIP_MEAN, CLIP_STD
from flashdreams.recipes.wan.encoders.umt5 import ByteTokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT_LEN = 16
WORDS = "a cat dog surfing on the big wave red blue sky at sunset".split()
PROMPTS = ["a cat surfing on the wave", "red dog  at   sunset under a blue sky"]

# Wan T5 layout <- HF UMT5 layout, written independently of the encoder's own remap.
HF_TO_WAN = [
    (
        r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v|o)\.weight$",
        r"blocks.\1.attn.\2.weight",
    ),
    (
        r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$",
        r"blocks.\1.pos_embedding.embedding.weight",
    ),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$", r"blocks.\1.norm1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$", r"blocks.\1.norm2.weight"),
    (
        r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight$",
        r"blocks.\1.ffn.gate.0.weight",
    ),
    (
        r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight$",
        r"blocks.\1.ffn.fc1.weight",
    ),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight$", r"blocks.\1.ffn.fc2.weight"),
    (r"^encoder\.final_layer_norm\.weight$", r"norm.weight"),
    (r"^shared\.weight$", r"token_embedding.weight"),
]


def _tiny_umt5_config():
    return transformers.UMT5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )


@pytest.fixture(scope="module")
def tiny_umt5_folder(tmp_path_factory):
    """A tiny UMT5 encoder saved with save_pretrained, seeded."""
    folder = tmp_path_factory.mktemp("umt5")
    torch.manual_seed(0)
    model = transformers.UMT5EncoderModel(_tiny_umt5_config())
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_tokenizer_folder(tmp_path_factory):
    """An offline word-level tokenizer with T5's special ids (pad 0, eos 1, unk 2)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab[word] = len(vocab)
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(folder))
    return folder


def _encoder(checkpoint_path, tokenizer_path, **fields) -> UMT5TextEncoder:
    return UMT5TextEncoderConfig(
        checkpoint_path=None if checkpoint_path is None else str(checkpoint_path),
        tokenizer_path=str(tokenizer_path),
        text_len=TEXT_LEN,
        dtype=torch.float32,
        **fields,
    ).setup()


def _reference_umt5(folder, tokenizer_folder, prompts):
    """Call transformers directly: tokenizer + UMT5EncoderModel, then keep the real tokens."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder))
    model = transformers.UMT5EncoderModel.from_pretrained(str(folder)).eval()
    cleaned = [" ".join(p.split()) for p in prompts]
    tokens = tokenizer(
        cleaned, padding="max_length", truncation=True, max_length=TEXT_LEN, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**tokens).last_hidden_state
    lengths = tokens["attention_mask"].sum(dim=1)
    expected = torch.zeros_like(hidden)
    for row, length in enumerate(lengths.tolist()):
        expected[row, :length] = hidden[row, :length]
    return expected, lengths


# --- UMT5 ---------------------------------------------------------------------


def test_umt5_matches_transformers_and_zeroes_padding(tiny_umt5_folder, tiny_tokenizer_folder):
    encoder = _encoder(tiny_umt5_folder, tiny_tokenizer_folder)
    assert isinstance(encoder, UMT5TextEncoder)
    out = encoder(PROMPTS)
    expected, lengths = _reference_umt5(tiny_umt5_folder, tiny_tokenizer_folder, PROMPTS)
    assert out.shape == (2, TEXT_LEN, 32)
    assert lengths.tolist() == [7, 9]  # words + end token
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    for row, length in enumerate(lengths.tolist()):
        assert torch.count_nonzero(out[row, length:]) == 0
        assert (out[row, :length].abs().sum(dim=-1) > 0).all()


def test_umt5_padding_does_not_leak_into_real_tokens(tiny_umt5_folder, tiny_tokenizer_folder):
    """A prompt's embedding must not depend on what it is batched with."""
    encoder = _encoder(tiny_umt5_folder, tiny_tokenizer_folder)
    together = encoder(PROMPTS)
    alone = encoder([PROMPTS[0]])
    torch.testing.assert_close(together[:1], alone, atol=1e-6, rtol=1e-6)


def test_umt5_wan_pth_layout_round_trip(tiny_umt5_folder, tiny_tokenizer_folder, tmp_path):
    from flashdreams.core.checkpoint import remap_checkpoint_keys

    reference = transformers.UMT5EncoderModel.from_pretrained(str(tiny_umt5_folder))
    hf_state = {
        k: v for k, v in reference.state_dict().items() if k != "encoder.embed_tokens.weight"
    }
    wan_state = remap_checkpoint_keys(hf_state, HF_TO_WAN)
    assert "token_embedding.weight" in wan_state
    assert "blocks.1.ffn.gate.0.weight" in wan_state
    assert all(not key.startswith(("encoder.", "shared")) for key in wan_state)
    pth = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(wan_state, pth)

    from_folder = _encoder(tiny_umt5_folder, tiny_tokenizer_folder)(PROMPTS)
    # Architecture from the HF config.json ...
    via_config = _encoder(pth, tiny_tokenizer_folder, config_path=str(tiny_umt5_folder))(PROMPTS)
    # ... or from the encoder's own architecture fields.
    via_fields = _encoder(
        pth,
        tiny_tokenizer_folder,
        model_dim=32,
        num_layers=2,
        num_heads=4,
        ffn_dim=48,
        vocab_size=64,
        num_relative_buckets=8,
        relative_max_distance=16,
    )(PROMPTS)
    torch.testing.assert_close(via_config, from_folder, atol=0, rtol=0)
    torch.testing.assert_close(via_fields, from_folder, atol=0, rtol=0)


def test_umt5_wan_pth_with_wrong_architecture_names_the_mismatch(
    tiny_umt5_folder, tiny_tokenizer_folder, tmp_path
):
    reference = transformers.UMT5EncoderModel.from_pretrained(str(tiny_umt5_folder))
    from flashdreams.core.checkpoint import remap_checkpoint_keys

    wan_state = remap_checkpoint_keys(
        {k: v for k, v in reference.state_dict().items() if k != "encoder.embed_tokens.weight"},
        HF_TO_WAN,
    )
    pth = tmp_path / "t5.pth"
    torch.save(wan_state, pth)
    with pytest.raises(KeyError, match=r"missing keys \(\d+\): encoder\.block\.2\."):
        _encoder(
            pth,
            tiny_tokenizer_folder,
            model_dim=32,
            num_layers=3,
            num_heads=4,
            ffn_dim=48,
            vocab_size=64,
            num_relative_buckets=8,
            relative_max_distance=16,
        )


def test_umt5_missing_tokenizer_says_where_to_put_it(tiny_umt5_folder, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        UMT5TextEncoderConfig(checkpoint_path=str(tiny_umt5_folder)).setup()
    message = str(info.value)
    assert "UMT5 tokenizer 'google/umt5-xxl' is not a local folder" in message
    assert "set tokenizer_path to it" in message
    missing = tmp_path / "no_tokenizer"
    with pytest.raises(FileNotFoundError, match=re.escape(f"UMT5 tokenizer '{missing}'")):
        _encoder(tiny_umt5_folder, missing)


def test_umt5_missing_checkpoint_errors(tiny_tokenizer_folder, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"remote address.*models_t5_umt5-xxl-enc-bf16\.pth"
    ):
        UMT5TextEncoderConfig(tokenizer_path=str(tiny_tokenizer_folder)).setup()
    missing = tmp_path / "t5.pth"
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(f"UMT5 text encoder checkpoint not found: '{missing}' does not exist"),
    ):
        _encoder(missing, tiny_tokenizer_folder)
    no_config = tmp_path / "empty_folder"
    no_config.mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        _encoder(no_config, tiny_tokenizer_folder)


def test_byte_tokenizer_layout():
    ids, mask = ByteTokenizer()(["ab", "é" * 10], max_length=6)
    assert ids.tolist() == [
        [ord("a") + 3, ord("b") + 3, 1, 0, 0, 0],
        [0xC3 + 3, 0xA9 + 3] * 2 + [0xC3 + 3, 1],
    ]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]


def test_umt5_random_init_with_builtin_tokenizer_is_seeded():
    fields = dict(model_dim=16, num_layers=1, num_heads=2, ffn_dim=24, vocab_size=300)

    def build():
        torch.manual_seed(123)
        return _encoder(None, BUILTIN_BYTE_TOKENIZER, **fields)

    first, second = build()(["hello world"]), build()(["hello world"])
    assert first.shape == (1, TEXT_LEN, 16)
    assert torch.equal(first, second)
    num_real = len("hello world") + 1
    assert torch.count_nonzero(first[0, num_real:]) == 0
    assert (first[0, :num_real].abs().sum(dim=-1) > 0).all()
    with pytest.raises(ValueError, match=r"byte tokenizer needs vocab_size >= 259"):
        _encoder(None, BUILTIN_BYTE_TOKENIZER, **{**fields, "vocab_size": 100})


def test_umt5_defaults_are_umt5_xxl():
    config = UMT5TextEncoderConfig()
    assert (config.model_dim, config.num_layers, config.num_heads) == (4096, 24, 64)
    assert (config.ffn_dim, config.vocab_size, config.text_len) == (10240, 256384, 512)
    assert config.tokenizer_path == "google/umt5-xxl"
    assert config.dtype == torch.bfloat16


# --- CLIP ---------------------------------------------------------------------


def _tiny_clip_vision_config():
    return transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    transformers.CLIPVisionModel(_tiny_clip_vision_config()).save_pretrained(str(folder))
    return folder


def _clip_encoder(checkpoint_path, **fields) -> CLIPImageEncoder:
    return CLIPImageEncoderConfig(
        checkpoint_path=None if checkpoint_path is None else str(checkpoint_path),
        image_size=28,
        dtype=torch.float32,
        **fields,
    ).setup()


def _image(*shape, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=generator) * 2 - 1


def _reference_clip(folder, image):
    """Resize + normalise by hand, run transformers, take the penultimate block's output."""
    model = transformers.CLIPVisionModel.from_pretrained(str(folder)).eval()
    pixels = F.interpolate(image, size=(28, 28), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = ((pixels + 1) / 2 - mean) / std
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    assert len(out.hidden_states) == 3 + 1
    return out.hidden_states[2]


def test_clip_matches_transformers_penultimate_block(tiny_clip_folder):
    encoder = _clip_encoder(tiny_clip_folder)
    image = _image(2, 3, 40, 52)
    out = encoder(image)
    assert out.shape == (2, 5, 32)  # (28 / 14) ** 2 patches + class token
    torch.testing.assert_close(out, _reference_clip(tiny_clip_folder, image), atol=1e-5, rtol=1e-5)
    # Not the last block and not the final layer norm.
    model = transformers.CLIPVisionModel.from_pretrained(str(tiny_clip_folder)).eval()
    pixels = encoder.preprocess(image)
    with torch.no_grad():
        last = model(pixel_values=pixels).last_hidden_state
    assert (out - last).abs().max() > 1e-2


def test_clip_keeps_leading_dims(tiny_clip_folder):
    encoder = _clip_encoder(tiny_clip_folder)
    image = _image(2, 1, 3, 28, 28)
    out = encoder(image)
    assert out.shape == (2, 1, 5, 32)
    torch.testing.assert_close(out[:, 0], encoder(image[:, 0]), atol=0, rtol=0)


def test_clip_open_clip_pth_round_trip(tiny_clip_folder, tmp_path):
    """Write the tiny tower in Wan's open-clip layout and load it back through the remap."""
    model = transformers.CLIPVisionModel.from_pretrained(str(tiny_clip_folder))
    hf = {k.removeprefix("vision_model."): v for k, v in model.state_dict().items()}
    wan = {
        "visual.patch_embedding.weight": hf["embeddings.patch_embedding.weight"],
        "visual.cls_embedding": hf["embeddings.class_embedding"].view(1, 1, -1),
        "visual.pos_embedding": hf["embeddings.position_embedding.weight"].unsqueeze(0),
        "visual.head": torch.zeros(32, 16),
        "textual.token_embedding.weight": torch.zeros(4, 4),
        "log_scale": torch.tensor(1.0),
    }
    for ours, theirs in (("pre_norm", "pre_layrnorm"), ("post_norm", "post_layernorm")):
        for param in ("weight", "bias"):
            wan[f"visual.{ours}.{param}"] = hf[f"{theirs}.{param}"]
    for index in range(3):
        layer = f"encoder.layers.{index}."
        block = f"visual.transformer.{index}."
        for param in ("weight", "bias"):
            wan[block + "attn.to_qkv." + param] = torch.cat(
                [hf[f"{layer}self_attn.{p}_proj.{param}"] for p in "qkv"]
            )
            wan[block + "attn.proj." + param] = hf[f"{layer}self_attn.out_proj.{param}"]
            wan[block + "norm1." + param] = hf[f"{layer}layer_norm1.{param}"]
            wan[block + "norm2." + param] = hf[f"{layer}layer_norm2.{param}"]
            wan[block + "mlp.0." + param] = hf[f"{layer}mlp.fc1.{param}"]
            wan[block + "mlp.2." + param] = hf[f"{layer}mlp.fc2.{param}"]
    pth = tmp_path / "open_clip.pth"
    torch.save(wan, pth)
    arch = dict(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, patch_size=14)
    image = _image(1, 3, 28, 28)
    torch.testing.assert_close(
        _clip_encoder(pth, **arch)(image), _clip_encoder(tiny_clip_folder)(image), atol=0, rtol=0
    )


def test_clip_random_init_and_errors(tmp_path):
    arch = dict(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, patch_size=14)
    torch.manual_seed(7)
    first = _clip_encoder(None, **arch)(_image(1, 3, 28, 28))
    torch.manual_seed(7)
    second = _clip_encoder(None, **arch)(_image(1, 3, 28, 28))
    assert first.shape == (1, 5, 16)
    assert torch.equal(first, second)
    with pytest.raises(FileNotFoundError, match=r"remote address.*open-clip-xlm-roberta"):
        CLIPImageEncoderConfig().setup()
    missing = tmp_path / "clip"
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(f"CLIP image encoder checkpoint not found: '{missing}' does not exist"),
    ):
        _clip_encoder(missing)
    with pytest.raises(ValueError, match=r"expects images \[\.\.\., 3, H, W\]"):
        _clip_encoder(None, **arch)(torch.zeros(1, 4, 28, 28))


def test_clip_defaults_are_wan_vit_h():
    config = CLIPImageEncoderConfig()
    assert (config.hidden_size, config.num_layers, config.num_heads) == (1280, 32, 16)
    assert (config.image_size, config.patch_size, config.intermediate_size) == (224, 14, 5120)
    assert (config.image_size // config.patch_size) ** 2 + 1 == 257
