"""flashdreams-run argument translation and run-directory choice (no subprocess, no torch)."""

from __future__ import annotations

import pytest

from flashdreams.launch.app import choose_run_dir, format_user_error
from flashdreams.launch.cli import DEFAULT_SLUG, build_hydra_args


def test_bare_command_selects_default_slug(monkeypatch):
    monkeypatch.delenv("FLASHDREAMS_CONF_PATH", raising=False)
    args, slug = build_hydra_args([])
    assert slug == DEFAULT_SLUG
    assert args == [f"pipeline={DEFAULT_SLUG}", "runner=tiny"]


def test_typed_overrides_become_force_adds_and_flags_go_first(monkeypatch):
    monkeypatch.delenv("FLASHDREAMS_CONF_PATH", raising=False)
    args, slug = build_hydra_args(
        ["wan21-t2v-1.3b", "runner.seed=1,2", "-m", "hydra/launcher=slurm", "--cfg", "job"]
    )
    assert slug == "wan21-t2v-1.3b"
    assert args == [
        "-m",
        "--cfg",
        "job",
        "++runner.seed=1,2",
        "hydra/launcher=slurm",
        "pipeline=wan21-t2v-1.3b",
        "runner=wan-480p",
    ]


def test_user_runner_choice_wins(monkeypatch):
    monkeypatch.delenv("FLASHDREAMS_CONF_PATH", raising=False)
    args, _ = build_hydra_args(["wan-tiny-t2v", "runner=default"])
    assert args == ["runner=default", "pipeline=wan-tiny-t2v"]


def test_unknown_slug_lists_known_ones():
    with pytest.raises(KeyError) as error:
        build_hydra_args(["wan-nope"])
    message = format_user_error(error.value)
    assert message.startswith(
        "flashdreams-run: error: unknown pipeline slug 'wan-nope'. Known slugs: "
    )
    assert "wan21-t2v-1.3b" in message


def test_run_dirs_are_unique_and_job_tagged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = choose_run_dir(None, "demo", None)
    second = choose_run_dir(None, "demo", None)
    assert first != second and first.parent == second.parent == tmp_path.joinpath(
        "outputs", "demo"
    ).relative_to(tmp_path)
    assert choose_run_dir(None, "demo", 3).name.endswith("_job3")
    assert str(choose_run_dir("mine", "demo", None)) == "mine"
    assert str(choose_run_dir("mine", "demo", 1)) == "mine/job1"
