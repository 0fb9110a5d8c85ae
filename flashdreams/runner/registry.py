"""Registry of runnable slugs, discovered through the ``flashdreams.runner_configs`` entry points.

Every runnable pipeline, built-in or from a plugin, is one entry point in the
group ``flashdreams.runner_configs``: the entry-point name is the slug and its
value points at a :class:`RunnerEntry`. Built-in pipelines are registered in
flashdreams' own ``pyproject.toml`` exactly like plugins. Two entry points
with the same slug are an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

ENTRY_POINT_GROUP = "flashdreams.runner_configs"
"""Entry-point group scanned for slugs."""


@dataclass(frozen=True, kw_only=True)
class RunnerEntry:
    """How ``flashdreams-run <slug>`` composes its config."""

    slug: str
    """Name typed on the command line; must equal the entry-point name."""
    description: str
    """One line shown by ``flashdreams-run --list``."""
    pipeline: str | None = None
    """Option of the Hydra ``pipeline`` group to select; ``None`` means the slug itself."""
    runner: str = "default"
    """Option of the Hydra ``runner`` group to select."""
    conf_package: str | None = None
    """Python package whose directory holds extra Hydra config groups (plugins ship their
    own ``pipeline/<slug>.yaml`` there); ``None`` for pipelines in flashdreams' own ``conf/``."""

    @property
    def pipeline_option(self) -> str:
        return self.pipeline or self.slug


@dataclass(frozen=True)
class RegisteredRunner:
    entry: RunnerEntry
    source: str
    """Distribution and object that registered the slug (for messages)."""


class DuplicateSlugError(ValueError):
    """Two entry points registered the same slug."""


def _entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def discover_runners() -> dict[str, RegisteredRunner]:
    """Load every entry point of the group; slug -> registration, sorted by slug."""
    found: dict[str, RegisteredRunner] = {}
    for entry_point in _entry_points():
        distribution = getattr(entry_point, "dist", None)
        dist_name = distribution.metadata["Name"] if distribution is not None else "?"
        source = f"{dist_name} ({entry_point.value})"
        if entry_point.name in found:
            raise DuplicateSlugError(
                f"slug '{entry_point.name}' is registered twice in entry-point group "
                f"{ENTRY_POINT_GROUP}: by {found[entry_point.name].source} and by {source}; "
                "uninstall or rename one of them"
            )
        entry = entry_point.load()
        if callable(entry) and not isinstance(entry, RunnerEntry):
            entry = entry()
        if not isinstance(entry, RunnerEntry):
            raise ValueError(
                f"entry point '{entry_point.name}' = {entry_point.value} must be a "
                f"flashdreams.runner.registry.RunnerEntry, got {type(entry).__name__}"
            )
        if entry.slug != entry_point.name:
            raise ValueError(
                f"entry point '{entry_point.name}' = {entry_point.value} holds slug "
                f"'{entry.slug}'; the entry-point name and the slug must match"
            )
        found[entry.slug] = RegisteredRunner(entry=entry, source=source)
    return dict(sorted(found.items()))


def get_runner_entry(slug: str) -> RegisteredRunner:
    """The registration of ``slug``; ``KeyError`` listing the known slugs otherwise."""
    runners = discover_runners()
    if slug not in runners:
        import difflib

        close = difflib.get_close_matches(slug, list(runners), n=3, cutoff=0.5)
        suggestion = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(
            f"unknown pipeline slug '{slug}'. Known slugs: {', '.join(runners) or '(none)'}."
            f"{suggestion} Run `flashdreams-run --list` for descriptions."
        )
    return runners[slug]
