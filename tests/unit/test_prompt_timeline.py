"""Prompt timelines: parsing, the JSON-lines file form and the errors that name the bad value."""

from __future__ import annotations

import pytest

from flashdreams.runner import RunnerConfig
from flashdreams.runner.runner import prompt_timeline, validate_runner_config
from flashdreams.session import PromptSwitch, parse_prompt_timeline, read_prompt_timeline_file


def test_timeline_entries_become_switches():
    timeline = parse_prompt_timeline(
        [{"chunk": 0, "prompt": " a cat "}, {"chunk": 3, "prompt": "a dog"}], num_chunks=4
    )
    assert timeline == [PromptSwitch(0, "a cat"), PromptSwitch(3, "a dog")]


@pytest.mark.parametrize(
    "entries, error, message",
    [
        (
            [{"chunk": 2, "prompt": "a"}, {"chunk": 1, "prompt": "b"}],
            ValueError,
            r"prompt_timeline\[1\]: chunk 1 is out of order \(after chunk 2\)",
        ),
        (
            [{"chunk": 0, "prompt": "a"}, {"chunk": 0, "prompt": "b"}],
            ValueError,
            r"prompt_timeline\[1\]: chunk 0 is out of order",
        ),
        ([{"chunk": 1, "prompt": "  "}], ValueError, r"prompt_timeline\[0\]: empty prompt '  '"),
        (
            [{"chunk": 4, "prompt": "a"}],
            ValueError,
            r"chunk 4 is past the last chunk of the rollout \(num_chunks=4: chunks 0..3\)",
        ),
        ([{"chunk": -1, "prompt": "a"}], ValueError, r"chunk must be an integer >= 0, got -1"),
        ([{"chunk": "2", "prompt": "a"}], ValueError, r"got '2'"),
        ([{"prompt": "a"}], KeyError, r"missing 'chunk'"),
        ([{"chunk": 0, "prompt": "a", "seed": 1}], KeyError, r"unknown key\(s\) \['seed'\]"),
        ([], ValueError, r"the timeline is empty"),
    ],
)
def test_bad_timelines_name_the_value(entries, error, message):
    with pytest.raises(error, match=message):
        parse_prompt_timeline(entries, num_chunks=4)


def test_file_form(tmp_path):
    path = tmp_path / "timeline.jsonl"
    path.write_text(
        '# switch at chunk 2\n{"chunk": 0, "prompt": "a cat"}\n\n{"chunk": 2, "prompt": "a dog"}\n'
    )
    assert read_prompt_timeline_file(path) == [
        {"chunk": 0, "prompt": "a cat"},
        {"chunk": 2, "prompt": "a dog"},
    ]
    path.write_text('{"chunk": 0, "prompt": "a cat"}\n{"chunk": 2 "prompt": "a dog"}\n')
    with pytest.raises(ValueError, match=r"timeline.jsonl', line 2: not a JSON object"):
        read_prompt_timeline_file(path)
    with pytest.raises(FileNotFoundError, match=r"no such file '.*missing.jsonl'"):
        read_prompt_timeline_file(tmp_path / "missing.jsonl")


def test_runner_timeline_starts_with_runner_prompt_and_is_validated(tmp_path):
    config = RunnerConfig(
        prompt="a cat", num_chunks=4, prompt_timeline=[{"chunk": 2, "prompt": "a dog"}]
    )
    assert prompt_timeline(config) == [PromptSwitch(0, "a cat"), PromptSwitch(2, "a dog")]
    path = tmp_path / "timeline.jsonl"
    path.write_text('{"chunk": 0, "prompt": "a cat"}\n{"chunk": 9, "prompt": "a dog"}\n')
    config = RunnerConfig(num_chunks=4, prompt_timeline_file=str(path))
    with pytest.raises(ValueError, match=r"timeline.jsonl'\[1\]: chunk 9 is past the last chunk"):
        validate_runner_config(config)
    config = RunnerConfig(
        prompt=["a", "b"], num_chunks=4, prompt_timeline=[{"chunk": 2, "prompt": "a dog"}]
    )
    with pytest.raises(ValueError, match=r"must then be one prompt"):
        validate_runner_config(config)
