"""Bad-input matrix through the real CLI (docs/errors.md records the same table).

Every case runs ``flashdreams-run`` as a subprocess on the tiny Wan slugs and must
exit non-zero with a one-paragraph message that names the problem and the fix,
print no Python traceback from flashdreams (``FLASHDREAMS_TRACEBACK=1`` asks for
one), and leave no run directory behind. The cases run three at a time in one
fixture so the whole matrix costs about as much as a few runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from e2e_helpers import cli_command
from safetensors.torch import save_file

SMALL = ["runner.height=32", "runner.width=32", "runner.num_chunks=1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


@dataclass
class Case:
    args: list[str]
    """CLI arguments after ``flashdreams-run``."""
    expected: list[str]
    """Substrings the error line must contain (problem and fix)."""
    exit_code: int = 2
    torchrun: bool = False
    env: dict[str, str] = field(default_factory=dict)


class _Evil:
    """Unpickling this runs ``open(marker, 'w')``: what an unsafe checkpoint could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _make_inputs(root: Path) -> dict[str, Path]:
    from PIL import Image

    from flashdreams.recipes.wan.transformer import WanDiTNetworkTinyConfig

    paths = {
        "corrupt_image": root / "corrupt.png",
        "wrong_shape": root / "wrong_shape.safetensors",
        "evil": root / "evil.pth",
        "marker": root / "PWNED",
        "good_image": root / "first.png",
        "latin1_prompts": root / "latin1.txt",
        "a_file": root / "a_file",
    }
    paths["latin1_prompts"].write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    paths["a_file"].write_text("not a directory")
    paths["corrupt_image"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(paths["good_image"])
    torch.manual_seed(0)
    state_dict = WanDiTNetworkTinyConfig().setup().state_dict()
    name = next(key for key, value in state_dict.items() if value.ndim == 2)
    state_dict[name] = torch.zeros(state_dict[name].shape[0] + 1, state_dict[name].shape[1])
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(paths["wrong_shape"]))
    paths["wrong_shape_key"] = Path(name)
    paths["flux_lora"] = root / "flux_lora.safetensors"
    flux_key = "transformer.single_transformer_blocks.0.attn.to_q"
    save_file(
        {
            f"{flux_key}.lora_A.weight": torch.zeros(4, 8),
            f"{flux_key}.lora_B.weight": torch.zeros(8, 4),
        },
        str(paths["flux_lora"]),
    )
    torch.save({"weight": torch.zeros(2), "payload": _Evil(str(paths["marker"]))}, paths["evil"])
    return paths


def _cases(paths: dict[str, Path]) -> dict[str, Case]:
    transformer = "pipeline.diffusion_model.transformer"
    return {
        "unknown slug": Case(
            ["wan-tiny-tv2"],
            ["unknown pipeline slug 'wan-tiny-tv2'", "Did you mean 'wan-tiny-t2v'", "--list"],
        ),
        "unknown override key": Case(
            ["wan-tiny-t2v", "runner.num_chunk=3"],
            ["unknown config key 'runner.num_chunk'", "Valid keys at 'runner':", "num_chunks"],
        ),
        "wrong value type": Case(
            ["wan-tiny-t2v", "runner.height=tall"],
            ["runner.height: expected an integer, got 'tall'"],
        ),
        "zero chunks": Case(
            ["wan-tiny-t2v", "runner.num_chunks=0"], ["runner.num_chunks must be >= 1, got 0"]
        ),
        "zero steps": Case(
            ["wan-tiny-t2v", *SMALL, "pipeline.diffusion_model.scheduler.num_inference_steps=0"],
            ["num_inference_steps must be >= 1, got 0"],
        ),
        "resolution not divisible": Case(
            ["wan-tiny-t2v", "runner.height=40", "runner.width=32", "runner.num_chunks=1"],
            [
                "runner.height=40 is not a multiple of 16 (try 32 or 48)",
                "spatial compression 8 x the transformer's patch size 2x2",
            ],
        ),
        "missing prompt file": Case(
            ["wan-tiny-t2v", "runner.prompts_file=prompts.txt"],
            ["runner.prompts_file: no such file 'prompts.txt'"],
        ),
        "missing first frame": Case(
            ["wan-tiny-i2v", "runner.image=nope.png"], ["runner.image: no such file 'nope.png'"]
        ),
        "corrupt first frame": Case(
            ["wan-tiny-i2v", f"runner.image={paths['corrupt_image']}"],
            [f"runner.image: cannot read '{paths['corrupt_image']}' as an image", "PNG or JPEG"],
        ),
        "missing checkpoint": Case(
            ["wan-tiny-t2v", *SMALL, f"{transformer}.checkpoint_path=ckpt/missing.safetensors"],
            ["pipeline.diffusion_model.transformer.checkpoint_path: 'ckpt/missing.safetensors' "
             "does not exist"],
        ),
        "checkpoint with wrong shapes": Case(
            ["wan-tiny-t2v", *SMALL, f"{transformer}.checkpoint_path={paths['wrong_shape']}"],
            ["shape", str(paths["wrong_shape_key"])],
        ),
        "unsafe pickle checkpoint": Case(
            ["wan-tiny-t2v", *SMALL, f"{transformer}.checkpoint_path={paths['evil']}"],
            ["refusing to load", "could run arbitrary code", "safetensors"],
        ),
        "missing LoRA file": Case(
            ["wan-tiny-t2v", *SMALL, f"{transformer}.loras=[{{path: lora/missing.safetensors}}]"],
            ["LoRA file not found: 'lora/missing.safetensors' does not exist"],
        ),
        "LoRA for another model": Case(
            ["wan-tiny-t2v", *SMALL, f"{transformer}.loras=[{{path: {paths['flux_lora']}, strength: 0.8}}]"],
            ["key(s) that are not a Wan DiT LoRA", "single_transformer_blocks", "Layouts understood"],
        ),
        "ulysses degree does not divide heads": Case(
            ["wan-tiny-t2v", *SMALL, f"{transformer}.network.num_heads=1",
             "parallel.ulysses_degree=2"],
            ["1 heads: Ulysses degree must be one of 1; got 2"],
            torchrun=True,
        ),
        "key without a value": Case(
            ["wan-tiny-t2v", "runner.num_chunks"],
            ["'runner.num_chunks' is not KEY=VALUE: write runner.num_chunks=<value>"],
        ),
        "misspelt section": Case(
            ["wan-tiny-t2v", "runer.num_chunks=3"],
            ["unknown config key 'runer.num_chunks'", "Did you mean 'runner.num_chunks'?"],
        ),
        "slug after the overrides": Case(
            ["runner.num_chunks=3", "wan-tiny-t2v"],
            ["the slug 'wan-tiny-t2v' must come first: flashdreams-run wan-tiny-t2v"],
        ),
        "bad override grammar": Case(
            ["wan-tiny-t2v", "runner.seed=[1"], ["no viable alternative at input '[1'"]
        ),
        "--cfg job with a bad key": Case(
            ["wan-tiny-t2v", "runner.num_chunk=3", "--cfg", "job"],
            ["unknown config key 'runner.num_chunk'"],
        ),
        "empty output_dir": Case(
            ["wan-tiny-t2v", *SMALL, "runner.output_dir="], ["runner.output_dir is empty"]
        ),
        "output_dir is a file": Case(
            ["wan-tiny-t2v", *SMALL, f"runner.output_dir={paths['a_file']}"],
            [f"runner.output_dir: '{paths['a_file']}' exists and is not a directory"],
        ),
        "prompts file not UTF-8": Case(
            ["wan-tiny-t2v", f"runner.prompts_file={paths['latin1_prompts']}"],
            [f"runner.prompts_file: '{paths['latin1_prompts']}' is not UTF-8 text (byte 3"],
        ),
        "infinite fps": Case(
            ["wan-tiny-t2v", "runner.fps=inf"], ["runner.fps must be a positive number, got inf"]
        ),
        "seed out of range": Case(
            ["wan-tiny-t2v", "runner.seed=99999999999999999999"],
            ["runner.seed must be between 0 and 2**63 - 1"],
        ),
        "world size does not factor": Case(
            ["wan-tiny-t2v", *SMALL, "parallel.ulysses_degree=3"],
            ["world size 2: ulysses_degree must be one of 1, 2; got 3"],
            torchrun=True,
        ),
    }  # fmt: skip


def _run(case: Case, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **case.env)
    env.pop("FLASHDREAMS_TRACEBACK", None)
    command = cli_command() + case.args
    if case.torchrun:
        command = [*TORCHRUN, "--no-python", "flashdreams-run", *case.args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    paths = _make_inputs(root)
    cases = _cases(paths)
    assert list(cases) == CASE_NAMES
    workdirs = {name: root / re.sub(r"\W+", "_", name) for name in cases}
    for workdir in workdirs.values():
        workdir.mkdir()
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_run, case, workdirs[name]) for name, case in cases.items()}
        results = {name: future.result() for name, future in futures.items()}
    return cases, results, workdirs, paths


CASE_NAMES = [
    "unknown slug",
    "unknown override key",
    "wrong value type",
    "zero chunks",
    "zero steps",
    "resolution not divisible",
    "missing prompt file",
    "missing first frame",
    "corrupt first frame",
    "missing checkpoint",
    "checkpoint with wrong shapes",
    "unsafe pickle checkpoint",
    "missing LoRA file",
    "LoRA for another model",
    "ulysses degree does not divide heads",
    "key without a value",
    "misspelt section",
    "slug after the overrides",
    "bad override grammar",
    "--cfg job with a bad key",
    "empty output_dir",
    "output_dir is a file",
    "prompts file not UTF-8",
    "infinite fps",
    "seed out of range",
    "world size does not factor",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_fails_cleanly(matrix, name):
    cases, results, workdirs, _ = matrix
    case, result = cases[name], results[name]
    assert result.returncode == case.exit_code if not case.torchrun else result.returncode != 0, (
        result.returncode,
        result.stderr,
    )
    error_lines = [
        line for line in result.stderr.splitlines() if line.startswith("flashdreams-run: error:")
    ]
    assert error_lines, result.stderr
    for expected in case.expected:
        assert expected in error_lines[0], f"{expected!r} not in {error_lines[0]!r}"
    # No traceback from our processes (torchrun prints its own ChildFailedError summary).
    assert not re.search(r'File ".*flashdreams', result.stderr), result.stderr
    if not case.torchrun:
        assert "Traceback" not in result.stderr, result.stderr
        assert len(error_lines) == 1
    else:
        # Every line names its rank. torchrun stops the other rank as soon as one exits, so
        # under load the second rank may be killed before it prints its own line.
        assert {line.split("]")[0] for line in error_lines} <= {
            "flashdreams-run: error: [rank 0",
            "flashdreams-run: error: [rank 1",
        }
    # Nothing that could pass for a run: no outputs/ tree, no stats.json anywhere.
    workdir = workdirs[name]
    assert not (workdir / "outputs").exists(), list((workdir / "outputs").rglob("*"))
    assert not list(workdir.rglob("stats.json"))


def test_unsafe_checkpoint_code_never_ran(matrix):
    _, results, _, paths = matrix
    assert results["unsafe pickle checkpoint"].returncode == 2
    assert not paths["marker"].exists()


def test_traceback_on_request(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", FLASHDREAMS_TRACEBACK="1")
    result = subprocess.run(
        [*cli_command(), "wan-tiny-t2v", "runner.num_chunks=0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2  # the same exit code as without the traceback
    assert "Traceback" in result.stderr and "runner.num_chunks must be >= 1" in result.stderr


def test_hydra_help_prints_hydras_options(tmp_path):
    result = subprocess.run(
        [*cli_command(), "--hydra-help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "== Flags ==" in result.stdout
