"""Turn composed YAML (plain dicts) into typed config dataclasses and back.

A YAML node becomes a config object in one of two ways:

* it names its class with ``_config_: package.module.ClassName``; the class
  must be a dataclass subclass of :class:`~flashdreams.infra.config.PrintableConfig`
  (YAML can name config classes only, never arbitrary callables), or
* it has no ``_config_`` and the field it fills is annotated with exactly one
  config class, which is then used.

Every other key must be a field of that class; an unknown key raises
``KeyError`` naming the dotted path and the valid sibling fields. Leaf values
are checked against the field annotation: ``bool``/``int``/``float``/``str``,
``torch.dtype`` (given as a string such as ``bfloat16``), tuples (given as
lists), ``Literal`` choices, ``X | None`` and ``list``/``dict``. Fields typed as
callables (``state_dict_transform``) accept only a name registered in
:data:`STATE_DICT_TRANSFORMS`.

:func:`config_to_container` is the inverse and is what a run saves as
``config.yaml``; ``build_config(config_to_container(c)) == c``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import importlib
import types
import typing
from collections.abc import Callable
from typing import Any

CONFIG_CLASS_KEY = "_config_"
"""YAML key that names the config class of a node."""

STATE_DICT_TRANSFORMS: dict[str, str] = {
    "diffusers_wan_transformer": "flashdreams.recipes.wan.transformer.checkpoint:wan_diffusers_state_dict_transform",
    "wan_t5": "flashdreams.recipes.wan.encoders.umt5:wan_t5_state_dict_transform",
    "wan22_ti2v_5b_vae": "flashdreams.recipes.wan:wan22_ti2v_5b_vae_state_dict_transform",
    "diffusers_wan21_vae": "flashdreams.recipes.wan:wan21_diffusers_vae_state_dict_transform",
}
"""Known state-dict transforms: YAML name -> ``module:attribute``.

Imported lazily and only when a config uses the name. Plugins add names through
the ``flashdreams.state_dict_transforms`` entry-point group (name -> ``module:function``),
or in-process with :func:`register_state_dict_transform`.
"""

_DTYPE_NAMES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "float8_e4m3fn",
    "float8_e5m2",
    "int8",
    "int32",
    "int64",
    "uint8",
)


class ConfigError(ValueError):
    """A YAML value does not fit the config schema (bad type, bad class name)."""


def register_state_dict_transform(name: str, target: str) -> None:
    """Allow ``state_dict_transform: <name>`` in YAML; ``target`` is ``module:attribute``."""
    existing = STATE_DICT_TRANSFORMS.get(name)
    if existing is not None and existing != target:
        raise ValueError(f"state-dict transform name '{name}' is already registered for {existing}")
    STATE_DICT_TRANSFORMS[name] = target


def _import_attribute(target: str) -> Any:
    module_name, _, attribute = target.partition(":")
    if not attribute:
        module_name, _, attribute = target.rpartition(".")
    module = importlib.import_module(module_name)
    return getattr(module, attribute)


TRANSFORM_ENTRY_POINT_GROUP = "flashdreams.state_dict_transforms"
"""Entry-point group through which plugins register more named transforms."""


@functools.cache
def _plugin_transforms() -> dict[str, str]:
    """Transforms named by installed plugins; the entry points are read once per process."""
    from importlib import metadata

    return {ep.name: ep.value for ep in metadata.entry_points(group=TRANSFORM_ENTRY_POINT_GROUP)}


def known_state_dict_transforms() -> dict[str, str]:
    """Built-in and registered names plus those of installed plugins (built-ins win)."""
    return {**_plugin_transforms(), **STATE_DICT_TRANSFORMS}


def resolve_state_dict_transform(name: str, path: str) -> Callable[..., Any]:
    known = known_state_dict_transforms()
    if name not in known:
        raise ConfigError(
            f"{path}: unknown state_dict_transform '{name}'; known transforms: "
            f"{', '.join(sorted(known))}"
        )
    try:
        return _import_attribute(known[name])
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"{path}: state_dict_transform '{name}' points at {known[name]}, which cannot be "
            f"imported: {error}"
        ) from error


def _transform_name(function: Any, path: str) -> str:
    for name, target in known_state_dict_transforms().items():
        try:
            if _import_attribute(target) is function:
                return name
        except (ImportError, AttributeError):
            continue
    raise ConfigError(
        f"{path}: the state_dict_transform {getattr(function, '__qualname__', function)!r} "
        "has no registered name, so it cannot be saved to YAML; register it with "
        "flashdreams.launch.config_tree.register_state_dict_transform"
    )


def import_config_class(class_path: str, path: str) -> type:
    """Import ``class_path`` and check it is a config dataclass."""
    from flashdreams.infra.config import PrintableConfig

    if not isinstance(class_path, str) or "." not in class_path:
        raise ConfigError(
            f"{path}.{CONFIG_CLASS_KEY}: expected a dotted class path such as "
            f"'flashdreams.recipes.wan.Wan21TransformerConfig', got {class_path!r}"
        )
    try:
        config_class = _import_attribute(class_path)
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"{path}.{CONFIG_CLASS_KEY}: cannot import config class '{class_path}': {error}"
        ) from error
    if not (
        isinstance(config_class, type)
        and issubclass(config_class, PrintableConfig)
        and dataclasses.is_dataclass(config_class)
    ):
        raise ConfigError(
            f"{path}.{CONFIG_CLASS_KEY}: '{class_path}' is not a config class "
            "(YAML may only name dataclass subclasses of flashdreams.infra.config.PrintableConfig)"
        )
    return config_class


def _class_path(config_class: type) -> str:
    return f"{config_class.__module__}.{config_class.__qualname__}"


def _field_types(config_class: type) -> dict[str, Any]:
    """Resolved annotations of the dataclass fields (``typing.get_type_hints``)."""
    try:
        return typing.get_type_hints(config_class)
    except NameError as error:
        raise ConfigError(
            f"config class {_class_path(config_class)} has an annotation that cannot be "
            f"resolved at run time ({error}); import the name at module level"
        ) from None


def _is_config_class(candidate: Any) -> bool:
    from flashdreams.infra.config import PrintableConfig

    return (
        isinstance(candidate, type)
        and issubclass(candidate, PrintableConfig)
        and dataclasses.is_dataclass(candidate)
    )


def _is_callable_annotation(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return annotation is collections.abc.Callable or origin is collections.abc.Callable


def _union_members(annotation: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return typing.get_args(annotation)
    return None


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _convert(value: Any, annotation: Any, path: str) -> Any:
    """Check ``value`` against ``annotation`` and convert it to the Python type."""
    import torch

    if annotation is Any or annotation is object:
        if isinstance(value, dict) and CONFIG_CLASS_KEY in value:
            return build_config(value, path=path)
        return value
    if _union_members(annotation) is not None:
        return _convert_union(value, annotation, path)
    if value is None:
        raise ConfigError(f"{path}: null is not allowed (expected {_type_name(annotation)})")
    if _is_config_class(annotation):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{path}: expected a mapping for {annotation.__name__}, got {value!r}"
            )
        return build_config(value, path=path, default_class=annotation, allowed=[annotation])
    if _is_callable_annotation(annotation):
        return _convert_callable(value, path)
    if annotation is torch.dtype:
        return _convert_dtype(value, path)
    origin = typing.get_origin(annotation)
    if origin in _CONVERT_BY_ORIGIN:
        return _CONVERT_BY_ORIGIN[origin](value, annotation, path)
    if origin is type or annotation is type:
        raise ConfigError(f"{path}: class fields cannot be set from YAML")
    if annotation in _SCALARS:
        accepts, expected = _SCALARS[annotation]
        if not accepts(value):
            raise ConfigError(f"{path}: expected {expected}, got {value!r}")
        return float(value) if annotation is float else value
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{path}: expected {annotation.__name__}, got {value!r}")
    return value


def _convert_union(value: Any, annotation: Any, path: str) -> Any:
    members = typing.get_args(annotation)
    if value is None:
        if type(None) in members:
            return None
        raise ConfigError(f"{path}: null is not allowed (expected {_type_name(annotation)})")
    non_none = [member for member in members if member is not type(None)]
    config_members = [m for m in non_none if _is_config_class(m)]
    if isinstance(value, dict) and config_members:
        return build_config(
            value, path=path, default_class=config_members[0], allowed=config_members
        )
    if len(non_none) == 1:
        return _convert(value, non_none[0], path)
    errors = []
    for member in non_none:
        try:
            return _convert(value, member, path)
        except ConfigError as error:
            errors.append(str(error))
    raise ConfigError(
        f"{path}: {value!r} does not match {_type_name(annotation)}"
        + (f" ({errors[0]})" if len(errors) == 1 else "")
    )


def _convert_callable(value: Any, path: str) -> Any:
    if callable(value):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{path}: expected the name of a registered transform, got {value!r}")
    return resolve_state_dict_transform(value, path)


def _convert_dtype(value: Any, path: str) -> Any:
    import torch

    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ConfigError(f"{path}: unknown dtype {value!r}; use one of {', '.join(_DTYPE_NAMES)}")
    return getattr(torch, name)


def _convert_literal(value: Any, annotation: Any, path: str) -> Any:
    choices = typing.get_args(annotation)
    if value not in choices:
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
    return value


def _convert_tuple(value: Any, annotation: Any, path: str) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path}: expected a list, got {value!r}")
    args = typing.get_args(annotation)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(item, args[0], f"{path}[{i}]") for i, item in enumerate(value))
    if not args:
        return tuple(value)
    if len(args) != len(value):
        raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
    return tuple(
        _convert(item, arg, f"{path}[{i}]")
        for i, (item, arg) in enumerate(zip(value, args, strict=True))
    )


def _convert_list(value: Any, annotation: Any, path: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path}: expected a list, got {value!r}")
    (item_type,) = typing.get_args(annotation) or (Any,)
    return [_convert(item, item_type, f"{path}[{i}]") for i, item in enumerate(value)]


def _convert_mapping(value: Any, annotation: Any, path: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping, got {value!r}")
    args = typing.get_args(annotation)
    value_type = args[1] if len(args) == 2 else Any
    return {key: _convert(item, value_type, f"{path}.{key}") for key, item in value.items()}


_CONVERT_BY_ORIGIN: dict[Any, Callable[[Any, Any, str], Any]] = {
    typing.Literal: _convert_literal,
    tuple: _convert_tuple,
    list: _convert_list,
    collections.abc.Sequence: _convert_list,
    dict: _convert_mapping,
    collections.abc.Mapping: _convert_mapping,
}
"""Container and literal annotations, by ``typing.get_origin``."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_SCALARS: dict[type, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda value: isinstance(value, bool), "true/false"),
    int: (lambda value: isinstance(value, int) and not isinstance(value, bool), "an integer"),
    float: (_is_number, "a number"),
    str: (lambda value: isinstance(value, str), "a string"),
}
"""Scalar annotations: ``(accepts(value), what the error message expects)``."""


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if (
            isinstance(value, dict)
            and isinstance(merged.get(key), dict)
            and (CONFIG_CLASS_KEY not in value)
        ):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _merge_into_default(config_field: dataclasses.Field, value: dict[str, Any], path: str) -> Any:
    """A partial node without ``_config_`` overrides the field's default config, keeping its class."""
    if config_field.default_factory is dataclasses.MISSING:
        return value
    default = config_field.default_factory()
    if not (dataclasses.is_dataclass(default) and not isinstance(default, type)):
        return value
    try:
        base = config_to_container(default, path=path)
    except ConfigError:
        return value
    return _deep_merge(base, value)


def build_config(
    node: dict[str, Any],
    *,
    path: str = "config",
    default_class: type | None = None,
    allowed: list[type] | None = None,
) -> Any:
    """Build a config dataclass from a plain mapping (see the module docstring).

    ``default_class`` is used when the node has no ``_config_`` key; a named
    class must be a subclass of one of ``allowed`` (when given).
    """
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: expected a mapping, got {node!r}")
    node = dict(node)
    class_path = node.pop(CONFIG_CLASS_KEY, None)
    if class_path is not None:
        config_class = import_config_class(class_path, path)
        if allowed and not any(issubclass(config_class, base) for base in allowed):
            raise ConfigError(
                f"{path}: {class_path} is not a {' or '.join(b.__name__ for b in allowed)}"
            )
    elif default_class is not None:
        config_class = default_class
    else:
        raise ConfigError(
            f"{path}: the node has no '{CONFIG_CLASS_KEY}' key naming its config class"
        )
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.init}
    settable = sorted(name for name in fields if not name.startswith("_"))
    field_types = _field_types(config_class)
    kwargs: dict[str, Any] = {}
    for key, value in node.items():
        key_path = f"{path}.{key}"
        if key not in fields or key.startswith("_"):
            raise KeyError(
                f"unknown config key '{key_path}': {config_class.__name__} has no field "
                f"'{key}'. Valid keys at '{path}': {', '.join(settable)}"
            )
        if isinstance(value, dict) and CONFIG_CLASS_KEY not in value:
            value = _merge_into_default(fields[key], value, key_path)
        kwargs[key] = _convert(value, field_types.get(key, Any), key_path)
    try:
        return config_class(**kwargs)
    except TypeError as error:
        missing = [
            name
            for name, f in fields.items()
            if name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(
                f"{path}: {config_class.__name__} needs a value for {', '.join(missing)}"
            ) from error
        raise ConfigError(f"{path}: cannot build {config_class.__name__}: {error}") from error


def config_to_container(config: Any, *, path: str = "config") -> Any:
    """Plain-data form of a config (dicts, lists, scalars) that :func:`build_config` reloads."""
    import torch

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        node: dict[str, Any] = {CONFIG_CLASS_KEY: _class_path(type(config))}
        for f in dataclasses.fields(config):
            if f.name.startswith("_") or not f.init:
                continue
            value = getattr(config, f.name)
            if callable(value) and not isinstance(value, type) and value is f.default:
                continue  # an unnamed default transform: reloading restores it
            node[f.name] = config_to_container(value, path=f"{path}.{f.name}")
        return node
    if isinstance(config, torch.dtype):
        return str(config).removeprefix("torch.")
    if isinstance(config, (list, tuple)):
        return [config_to_container(item, path=f"{path}[{i}]") for i, item in enumerate(config)]
    if isinstance(config, dict):
        return {
            key: config_to_container(item, path=f"{path}.{key}") for key, item in config.items()
        }
    if isinstance(config, type):
        raise ConfigError(f"{path}: classes cannot be saved to YAML")
    if callable(config):
        return _transform_name(config, path)
    return config
