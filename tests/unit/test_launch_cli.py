"""flashdreams-run argument translation and run-directory choice (no subprocess, no torch)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flashdreams.launch.app import format_user_error
from flashdreams.launch.cli import DEFAULT_SLUG, build_hydra_args, quote_verbatim
from flashdreams.launch.run_dir import LOCK_NAME, claim_run_dir


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
    first = claim_run_dir(None, "demo", None)
    second = claim_run_dir(None, "demo", None)
    assert first.path != second.path and first.path.parent == second.path.parent == Path(
        "outputs", "demo"
    )
    assert claim_run_dir(None, "demo", 3).path.name.endswith("_job3")
    assert str(claim_run_dir("mine", "demo", None).path) == "mine"
    assert str(claim_run_dir("other", "demo", 1).path) == "other/job1"


def test_a_locked_directory_is_refused_and_released(tmp_path):
    held = claim_run_dir(str(tmp_path / "d"), "demo", None)
    assert (tmp_path / "d" / LOCK_NAME).read_text().strip() == str(os.getpid())
    with pytest.raises(ValueError, match=r"is in use by another run \(pid \d+\)"):
        claim_run_dir(str(tmp_path / "d"), "demo", None)
    held.release()
    assert not (tmp_path / "d" / LOCK_NAME).exists()
    claim_run_dir(str(tmp_path / "d"), "demo", None).release()


def test_early_failure_removes_only_what_the_run_created(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    claimed = claim_run_dir(str(tmp_path / "d"), "demo", None)
    (tmp_path / "d" / "config.yaml").write_text("ours")
    (tmp_path / "d" / "log_rank0.txt").write_text("ours")
    claimed.remove_unfinished()
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["notes.txt"]
    created = claim_run_dir(str(tmp_path / "a" / "b"), "demo", None)
    (tmp_path / "a" / "b" / "stats.json").write_text("{}")
    created.remove_unfinished()
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_output_dir_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match="runner.output_dir is empty"):
        claim_run_dir(value, "demo", None)


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        claim_run_dir(str(tmp_path / "f"), "demo", None)


@pytest.mark.parametrize(
    "text",
    ["a cat, surfing", "it's", 'say "hi"', "(x)", "${HOME}", "\\${HOME}", "end\\", "a\nb", "",
     "\U0001f431 \u732b", "[not a list"],
)  # fmt: skip
def test_verbatim_values_compose_back_exactly(text):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    value = OverridesParser.create().parse_override(f"x={quote_verbatim(text)}").value()
    assert OmegaConf.to_container(OmegaConf.create({"x": value}), resolve=True)["x"] == text


def test_prompt_lists_sweeps_and_null_paths_keep_hydra_syntax(monkeypatch):
    monkeypatch.delenv("FLASHDREAMS_CONF_PATH", raising=False)
    args, _ = build_hydra_args(
        ["wan-tiny-t2v", "runner.prompt=[a,b]", "runner.image=null", "runner.prompts_file=a,b.txt",
         "-m", "runner.output_dir=choice(x,y)"]
    )  # fmt: skip
    assert "++runner.prompt=[a,b]" in args and "++runner.image=null" in args
    assert "++runner.prompts_file='a,b.txt'" in args and "++runner.output_dir=choice(x,y)" in args


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["wan-tiny-t2v", "runner.num_chunks"],
         "'runner.num_chunks' is not KEY=VALUE: write runner.num_chunks=<value>"),
        (["wan-tiny-t2v", "runer.num_chunks=3"],
         "unknown config key 'runer.num_chunks': every key starts with one of pipeline, runner, "
         "parallel, hydra. Did you mean 'runner.num_chunks'?"),
        (["runner.num_chunks=3", "wan-tiny-t2v"],
         "the slug 'wan-tiny-t2v' must come first: flashdreams-run wan-tiny-t2v "
         "runner.num_chunks=3"),
        (["wan-tiny-t2v", "surfing"], "unknown argument 'surfing'"),
    ],
)  # fmt: skip
def test_malformed_arguments_are_one_line_errors(args, message):
    with pytest.raises((KeyError, ValueError)) as error:
        build_hydra_args(args)
    assert message in format_user_error(error.value)


def test_flag_values_are_not_taken_for_arguments(monkeypatch):
    monkeypatch.delenv("FLASHDREAMS_CONF_PATH", raising=False)
    args, _ = build_hydra_args(["wan-tiny-t2v", "--cfg", "job", "--info", "searchpath"])
    assert args[:4] == ["--cfg", "job", "--info", "searchpath"]
