"""The cold-start loading path: safetensors read into aligned tensors, meta-device builds."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from flashdreams.core.checkpoint import empty_init, load_checkpoint, load_state_dict_into_module
from flashdreams.recipes.wan.transformer import Wan21TransformerConfig, WanDiTNetworkTinyConfig


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def test_safetensors_reader_matches_the_reference_bytes_and_aligns(tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    state_dict = {
        "matrix": torch.randn(3, 5, generator=generator),
        "half": torch.randn(7, generator=generator).to(torch.bfloat16),
        "scalar": torch.tensor(3.0),
        "ids": torch.arange(5),
        "empty": torch.zeros(0, 4),
        "flags": torch.tensor([True, False, True]),
        "fp8": torch.randn(4, generator=generator).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "weights.safetensors"
    save_file(state_dict, str(path), metadata={"format": "pt"})
    reference = load_file(str(path))
    loaded = load_checkpoint(path)
    assert list(sorted(loaded)) == sorted(reference)
    for key, tensor in reference.items():
        assert loaded[key].dtype == tensor.dtype and loaded[key].shape == tensor.shape, key
        assert torch.equal(_byte_view(loaded[key]), _byte_view(tensor)), key
        if tensor.numel():
            assert loaded[key].data_ptr() % 64 == 0, key


def test_truncated_safetensors_names_the_file_and_the_tensor(tmp_path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.ones(16), "b": torch.ones(1024)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"cut\.safetensors' is truncated or corrupt: tensor 'b'"):
        load_checkpoint(path)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="is not a valid .safetensors file"):
        load_checkpoint(path)


def test_empty_init_assigns_checkpoint_tensors_and_refuses_gaps() -> None:
    with empty_init():
        module = nn.Linear(4, 3)
    assert module.weight.is_meta
    weight, bias = torch.randn(3, 4), torch.randn(3)
    load_state_dict_into_module(module, {"weight": weight, "bias": bias})
    assert module.weight.data_ptr() == weight.data_ptr()  # assigned, not copied
    assert torch.equal(module(torch.ones(1, 4)), torch.ones(1, 4) @ weight.t() + bias)

    with empty_init():
        partial = nn.Linear(4, 3)
    with pytest.raises(KeyError, match=r"leaves parameters of Linear without values: bias"):
        load_state_dict_into_module(partial, {"weight": weight}, strict=False)


@torch.no_grad()
def test_wan_transformer_from_checkpoint_holds_the_file_weights(tmp_path) -> None:
    torch.manual_seed(0)
    random_config = Wan21TransformerConfig(network=WanDiTNetworkTinyConfig(), dtype=torch.float32)
    # The unfused layout a checkpoint has: build a fresh network and save it.
    from flashdreams.recipes.wan.transformer.impl.network import WanDiTNetwork

    source = WanDiTNetwork(random_config.network)
    path = tmp_path / "wan.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    config = Wan21TransformerConfig(
        network=WanDiTNetworkTinyConfig(), dtype=torch.float32, checkpoint_path=str(path)
    )
    transformer = config.setup()
    assert not any(p.is_meta for p in transformer.network.parameters())
    block = transformer.network.blocks[0].self_attn
    dim = source.config.dim
    assert torch.equal(block.qkv.weight[:dim], source.blocks[0].self_attn.q.weight)
    assert torch.equal(block.qkv.weight[2 * dim :], source.blocks[0].self_attn.v.weight)
    assert torch.equal(
        transformer.network.text_embedding[0].weight, source.text_embedding[0].weight
    )
