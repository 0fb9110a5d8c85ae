"""Config system: printable, instantiable dataclass configs and ``derive_config``.

Every component of a pipeline is described by a ``kw_only`` dataclass that
inherits :class:`InstantiateConfig`. The config names the class it builds in
its ``_target`` field; ``config.setup()`` constructs that class with the
config as its first argument.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def _format_value(value: Any, indent: int) -> str:
    pad = "  " * indent
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        lines = [f"{type(value).__name__}("]
        for f in dataclasses.fields(value):
            inner = _format_value(getattr(value, f.name), indent + 1)
            lines.append(f"{pad}  {f.name}={inner},")
        lines.append(f"{pad})")
        return "\n".join(lines)
    if isinstance(value, dict) and value:
        lines = ["{"]
        for key, item in value.items():
            lines.append(f"{pad}  {key!r}: {_format_value(item, indent + 1)},")
        lines.append(f"{pad}}}")
        return "\n".join(lines)
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    return repr(value)


@dataclass(kw_only=True)
class PrintableConfig:
    """Base for configs whose ``str()`` is a readable, indented multi-line dump."""

    def __str__(self) -> str:
        return _format_value(self, 0)


@dataclass(kw_only=True)
class InstantiateConfig(PrintableConfig):
    """Config that knows which class it builds.

    Subclasses declare ``_target`` with a ``default_factory`` returning the
    class; :meth:`setup` calls ``_target(self, **kwargs)``.
    """

    _target: type
    """Class constructed by :meth:`setup`; it receives this config first."""

    def setup(self, **kwargs: Any) -> Any:
        """Build the target object from this config."""
        return self._target(self, **kwargs)


def _apply_changes(node: Any, changes: dict[str, Any], prefix: str) -> Any:
    for key, value in changes.items():
        path = f"{prefix}.{key}" if prefix else key
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            field_names = {f.name for f in dataclasses.fields(node)}
            if key not in field_names:
                raise KeyError(
                    f"derive_config: unknown path '{path}': {type(node).__name__} has no "
                    f"field '{key}' (fields: {', '.join(sorted(field_names))})"
                )
            current = getattr(node, key)
            if isinstance(value, dict) and (
                (dataclasses.is_dataclass(current) and not isinstance(current, type))
                or isinstance(current, dict)
            ):
                _apply_changes(current, value, path)
            else:
                setattr(node, key, value)
        elif isinstance(node, dict):
            if key not in node:
                raise KeyError(
                    f"derive_config: unknown path '{path}': dict has no key '{key}' "
                    f"(keys: {', '.join(map(str, node))})"
                )
            current = node[key]
            if isinstance(value, dict) and (
                (dataclasses.is_dataclass(current) and not isinstance(current, type))
                or isinstance(current, dict)
            ):
                _apply_changes(current, value, path)
            else:
                node[key] = value
        else:
            raise KeyError(
                f"derive_config: unknown path '{path}': '{prefix}' is a "
                f"{type(node).__name__}, not a config or dict"
            )
    return node


def derive_config(base_config: T, **changes: Any) -> T:
    """Return a deep copy of ``base_config`` with nested overrides applied.

    A ``dict`` value walks into the dataclass field (or dict entry) of the
    same name; any other value replaces the leaf. An unknown name raises
    ``KeyError`` that spells out the full dotted path.

    Example::

        cfg = derive_config(base, diffusion_model=dict(seed=3, scheduler=dict(shift=5.0)))
    """
    new_config = copy.deepcopy(base_config)
    return _apply_changes(new_config, changes, "")
