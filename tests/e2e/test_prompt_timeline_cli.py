"""flashdreams-run with a prompt timeline file: the run switches where the timeline says; its
latents equal the pipeline driven by hand with the same switches and a session with the same
timeline (same seed)."""

from __future__ import annotations

import json
import sys

import torch
from e2e_helpers import run_cli, run_dirs
from safetensors.torch import load_file

from flashdreams.launch.run_config import load_run_config
from flashdreams.runner.video import Mp4Writer, read_mp4
from flashdreams.session import Session, parse_prompt_timeline

TIMELINE = [{"chunk": 0, "prompt": "a red ball"}, {"chunk": 2, "prompt": "a blue cube"}]


def run_with_timeline(tmp_path, *overrides: str):
    path = tmp_path / "timeline.jsonl"
    path.write_text("".join(json.dumps(entry) + "\n" for entry in TIMELINE))
    result = run_cli(
        [
            "wan-tiny-t2v",
            "runner.num_chunks=3",
            f"runner.prompt_timeline_file={path}",
            "runner.save_latents=true",
            *overrides,
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path, "wan-tiny-t2v")
    return run_dir


@torch.no_grad()
def by_hand(config, recache: bool) -> torch.Tensor:
    torch.manual_seed(config.runner.seed)
    pipeline = config.pipeline.setup().eval()
    ratio = pipeline.decoder.spatial_compression_ratio
    cache = pipeline.initialize_cache(
        [TIMELINE[0]["prompt"]],
        height=config.runner.height // ratio,
        width=config.runner.width // ratio,
        release_oneshot_encoders=False,
    )
    latents = []
    for index in range(config.runner.num_chunks):
        if index == TIMELINE[1]["chunk"]:
            pipeline.switch_prompt(cache, [TIMELINE[1]["prompt"]], recache=recache)
        latent = pipeline.generate_latent(index, cache)
        pipeline.decode_latent(latent, index, cache)
        pipeline.finalize(index, cache)
        latents.append(latent)
    return torch.cat(latents, dim=-4)


@torch.no_grad()
def by_session(config, video_path) -> torch.Tensor:
    """The session's latents; its frames are saved to ``video_path`` on the way."""
    torch.manual_seed(config.runner.seed)
    pipeline = config.pipeline.setup().eval()
    ratio = pipeline.decoder.spatial_compression_ratio
    session = Session.open(
        pipeline,
        prompt="unused: the timeline has an entry at chunk 0",
        height=config.runner.height // ratio,
        width=config.runner.width // ratio,
        timeline=parse_prompt_timeline(TIMELINE, num_chunks=config.runner.num_chunks),
        writer=Mp4Writer(video_path, fps=config.runner.fps),
    )
    latents = [session.step().latent for _ in range(config.runner.num_chunks)]
    session.close()
    return torch.cat(latents, dim=-4)


def test_timeline_run_equals_the_pipeline_switched_by_hand(tmp_path):
    run_dir = run_with_timeline(tmp_path)
    config = load_run_config(run_dir / "config.yaml")
    saved = load_file(run_dir / "latents.safetensors")["latents"]
    recached = by_hand(config, recache=True)
    assert (saved - recached).abs().max().item() <= 1e-6
    text_only = by_hand(config, recache=False)
    len_t = config.pipeline.diffusion_model.transformer.len_t
    switch_frame = TIMELINE[1]["chunk"] * len_t
    assert torch.equal(
        text_only[..., :switch_frame, :, :, :], recached[..., :switch_frame, :, :, :]
    )
    assert (text_only - recached).abs().max().item() > 1e-3
    # A session with the same timeline produces the offline run's latents and video.
    assert (saved - by_session(config, tmp_path / "session.mp4")).abs().max().item() <= 1e-6
    session_frames, _ = read_mp4(tmp_path / "session.mp4")
    run_frames, _ = read_mp4(run_dir / "video.mp4")
    assert session_frames.shape == run_frames.shape and (session_frames == run_frames).all()
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["rollouts"][0]["prompt_switches"] == [
        {"chunk": 2, "prompt": "a blue cube", "mode": "recache"}
    ]


def test_torchrun_two_ranks_with_a_recache_switch_equal_one_process(tmp_path):
    path = tmp_path / "timeline.jsonl"
    path.write_text("".join(json.dumps(entry) + "\n" for entry in TIMELINE))
    args = [
        "wan-tiny-t2v",
        "runner.height=32",
        "runner.width=48",  # 4 x 6 latent -> 6 tokens per frame
        "runner.num_chunks=3",
        f"runner.prompt_timeline_file={path}",
        "runner.save_latents=true",
    ]
    single = run_cli([*args, "runner.output_dir=one"], tmp_path)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--no-python"]
    double = run_cli([*args, "runner.output_dir=two"], tmp_path, prefix=torchrun)
    assert double.returncode == 0, double.stderr
    one = load_file(str(tmp_path / "one" / "latents.safetensors"))["latents"]
    two = load_file(str(tmp_path / "two" / "latents.safetensors"))["latents"]
    assert one.shape == two.shape
    # fp32; only the attention reduction order differs between 1 and 2 ranks.
    assert (one - two).abs().max().item() <= 1e-5
    stats = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert stats["world_size"] == 2
    assert stats["rollouts"][0]["prompt_switches"][0]["chunk"] == 2
