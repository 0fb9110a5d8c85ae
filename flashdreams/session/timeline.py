"""Prompt timelines: which prompt a rollout uses from which chunk on.

A timeline is a list of ``{"chunk": k, "prompt": "..."}`` entries in
increasing chunk order; the entry at chunk ``k`` switches the prompt before
chunk ``k`` is generated. The file form holds one JSON object per line (blank
lines and lines starting with ``#`` are skipped), like LongLive's prompt files::

    {"chunk": 0, "prompt": "A red panda walks through a bamboo forest."}
    {"chunk": 8, "prompt": "The red panda climbs a snowy mountain."}
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PromptSwitch:
    """One timeline entry: from ``chunk`` on, the rollout follows ``prompt``."""

    chunk: int
    """AR index of the first chunk generated under ``prompt``."""
    prompt: str
    """Prompt text (not empty)."""


def parse_prompt_timeline(
    entries: Sequence[Mapping[str, Any]], *, num_chunks: int, source: str = "prompt_timeline"
) -> list[PromptSwitch]:
    """Validate timeline entries; errors name ``source``, the entry and the bad value."""
    if not entries:
        raise ValueError(f"{source}: the timeline is empty; give at least one {{chunk, prompt}}")
    timeline: list[PromptSwitch] = []
    for position, entry in enumerate(entries):
        where = f"{source}[{position}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: expected a {{chunk, prompt}} mapping, got {entry!r}")
        unknown = sorted(set(entry) - {"chunk", "prompt"})
        if unknown:
            raise KeyError(f"{where}: unknown key(s) {unknown}; an entry has 'chunk' and 'prompt'")
        for key in ("chunk", "prompt"):
            if key not in entry:
                raise KeyError(f"{where}: missing '{key}' in {dict(entry)!r}")
        chunk, prompt = entry["chunk"], entry["prompt"]
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
            raise ValueError(f"{where}: chunk must be an integer >= 0, got {chunk!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: empty prompt {prompt!r} at chunk {chunk}")
        if timeline and chunk <= timeline[-1].chunk:
            raise ValueError(
                f"{where}: chunk {chunk} is out of order (after chunk {timeline[-1].chunk}); "
                "entries must have increasing chunks"
            )
        if chunk >= num_chunks:
            raise ValueError(
                f"{where}: chunk {chunk} is past the last chunk of the rollout "
                f"(num_chunks={num_chunks}: chunks 0..{num_chunks - 1})"
            )
        timeline.append(PromptSwitch(chunk=chunk, prompt=prompt.strip()))
    return timeline


def read_prompt_timeline_file(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a JSON-lines timeline file (validated by :func:`parse_prompt_timeline`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt timeline file: no such file '{path}'")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"prompt timeline file '{path}' is not UTF-8 text (byte {error.start}); save it as UTF-8"
        ) from None
    entries = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            entries.append(json.loads(stripped))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"prompt timeline file '{path}', line {line_number}: not a JSON object "
                f"({error.msg}): {stripped!r}"
            ) from None
    return entries
