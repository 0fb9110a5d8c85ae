"""The conf/ tree: every file documents its command, every slug composes (and builds when its
recipe package is importable), overrides reach the dataclasses."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashdreams.launch.cli import compose, find_conf_dir
from flashdreams.launch.run_config import build_run_config, run_config_to_container
from flashdreams.runner.registry import discover_runners

CONF_DIR = find_conf_dir()
YAML_FILES = sorted(CONF_DIR.rglob("*.yaml")) + sorted(
    (Path(__file__).resolve().parents[2] / "recipes").rglob("conf/**/*.yaml")
)
BUILTIN_SLUGS = [
    "wan-tiny-t2v",
    "wan-tiny-i2v",
    "wan21-t2v-1.3b",
    "wan21-t2v-14b",
    "wan21-i2v-14b-480p",
    "wan22-ti2v-5b",
    "wan22-t2v-a14b",
]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_yaml_starts_with_its_command(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith(("# flashdreams-run", "# torchrun", "# sbatch")), first_line


def test_builtin_slugs_are_registered():
    runners = discover_runners()
    assert set(BUILTIN_SLUGS) <= set(runners)
    for slug in BUILTIN_SLUGS:
        assert runners[slug].entry.description


@pytest.mark.parametrize("slug", sorted(discover_runners()))
def test_every_slug_composes(slug):
    container = compose(slug, ["pipeline.diffusion_model.scheduler.num_inference_steps=3"])
    assert container["pipeline"]["name"] == slug
    assert container["runner"]["_config_"].endswith("RunnerConfig")
    scheduler = container["pipeline"]["diffusion_model"]["scheduler"]
    assert scheduler["num_inference_steps"] == 3
    run_config = build_run_config(container)
    assert run_config.pipeline.name == slug
    assert run_config.pipeline.diffusion_model.scheduler.num_inference_steps == 3
    # The saved form reloads to an equal config.
    assert build_run_config(run_config_to_container(run_config)) == run_config


@pytest.mark.parametrize(
    ("slug", "steps", "shift"),
    [
        ("wan21-t2v-1.3b", 50, 5.0),
        ("wan21-t2v-14b", 50, 5.0),
        ("wan21-i2v-14b-480p", 40, 3.0),
        ("wan22-ti2v-5b", 50, 5.0),
        ("wan22-t2v-a14b", 40, 12.0),
    ],
)
def test_upstream_sampling_defaults(slug, steps, shift):
    scheduler = compose(slug)["pipeline"]["diffusion_model"]["scheduler"]
    assert (scheduler["num_inference_steps"], scheduler["shift"]) == (steps, shift)


def test_swap_a_group_option_and_round_trip(monkeypatch):
    """``+decoder@pipeline.decoder=taehv`` adds the TAEHV decoder; its unnamed default transform
    survives save -> reload."""
    pytest.importorskip("flashdreams.recipes.taehv")
    fake_dir = Path(__file__).resolve().parents[1] / "e2e" / "fake_pipeline"
    monkeypatch.syspath_prepend(str(fake_dir))
    monkeypatch.setenv("FLASHDREAMS_CONF_PATH", str(fake_dir / "conf"))
    container = compose(
        None,
        ["pipeline=fake-tiny", "+decoder@pipeline.decoder=taehv", "pipeline.decoder.dtype=float32"],
    )
    run_config = build_run_config(container)
    decoder = run_config.pipeline.decoder
    assert type(decoder).__name__ == "TeahvVAEDecoderConfig"
    assert str(decoder.dtype) == "torch.float32"
    saved = run_config_to_container(run_config)
    assert "state_dict_transform" not in saved["pipeline"]["decoder"]
    assert build_run_config(saved) == run_config
