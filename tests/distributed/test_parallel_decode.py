"""Exact parallel (row-slab) decode on gloo ranks: a streamed multi-chunk decode equals one rank's."""

from __future__ import annotations

import pytest
import torch
from _parallel_decode_models import build_tiny_decoder, latent_channels

from flashdreams.core.distributed.row_slabs import split_rows
from flashdreams.infra.decoder.row_parallel import RowParallelDecoder
from flashdreams.testing import run_on_ranks

KINDS = ("wan21", "wan22", "taehv")
LATENT_HEIGHT = 7  # divides by none of 2, 3, 4
LATENT_WIDTH = 5
CHUNK_SIZES = (1, 2, 1)  # latent frames per streamed chunk
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
"""fp32 is the production CPU path (oneDNN picks kernels by slab shape, so the summation
order differs); fp64 shows the slab decode is the same computation, not an approximation."""


def _streamed(decode, cache, latent: torch.Tensor) -> list[torch.Tensor | None]:
    outputs, begin = [], 0
    for index, size in enumerate(CHUNK_SIZES):
        outputs.append(decode(latent[:, begin : begin + size], index, cache))
        begin += size
    return outputs


def _parity_on_rank(rank: int, world_size: int, errors_path: str) -> None:
    lines = []
    for kind in KINDS:
        for dtype in TOLERANCE:
            decoder = build_tiny_decoder(kind, dtype)
            generator = torch.Generator().manual_seed(1)
            shape = (1, sum(CHUNK_SIZES), latent_channels(kind), LATENT_HEIGHT, LATENT_WIDTH)
            latent = torch.randn(shape, generator=generator, dtype=dtype)
            reference = _streamed(decoder, decoder.initialize_autoregressive_cache(), latent)
            parallel = RowParallelDecoder(decoder, None)
            outputs = _streamed(parallel, parallel.initialize_autoregressive_cache(), latent)
            if rank != 0:
                assert all(output is None for output in outputs)
                continue
            for index, (expected, got) in enumerate(zip(reference, outputs)):
                assert got is not None and got.shape == expected.shape, (kind, index)
                assert expected.std() > 0.05, f"{kind}: trivial reference video"
                error = (got - expected).abs().max().item()
                lines.append(f"{kind} {str(dtype)[6:]} {index} {error:.3e}")
    if rank == 0:
        with open(errors_path, "w") as handle:
            handle.write("\n".join(lines))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_parallel_decode_equals_one_rank(world_size, tmp_path):
    errors_path = tmp_path / "errors.txt"
    run_on_ranks(_parity_on_rank, world_size, str(errors_path))
    lines = errors_path.read_text().splitlines()
    assert len(lines) == len(KINDS) * len(TOLERANCE) * len(CHUNK_SIZES)
    for line in lines:
        kind, dtype, index, error = line.split()
        tolerance = TOLERANCE[getattr(torch, dtype)]
        assert float(error) <= tolerance, (
            f"world size {world_size}, {kind} {dtype} chunk {index}: {error}"
        )


def test_split_rows():
    assert split_rows(7, 4) == [2, 2, 2, 1]
    assert split_rows(6, 3) == [2, 2, 2]
    with pytest.raises(
        ValueError,
        match=r"a frame of 2 latent rows cannot be split into 3 row slabs \(every rank needs at least one row\)",
    ):
        split_rows(2, 3)
