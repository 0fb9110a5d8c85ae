"""YAML -> config dataclass loading: types, unknown keys, allowed classes, round trip."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Literal

import pytest
import torch

from flashdreams.infra.config import InstantiateConfig, PrintableConfig
from flashdreams.launch import config_tree
from flashdreams.launch.config_tree import ConfigError, build_config, config_to_container
from flashdreams.runner import registry


def double_weights(state_dict):
    return {k: 2 * v for k, v in state_dict.items()}


@dataclass(kw_only=True)
class LeafConfig(PrintableConfig):
    size: int = 2
    """Leaf size."""
    kind: Literal["ring", "ulysses"] = "ring"
    """Choice."""


@dataclass(kw_only=True)
class WideLeafConfig(LeafConfig):
    size: int = 8
    """Preset with another default."""


@dataclass(kw_only=True)
class RootConfig(InstantiateConfig):
    _target: type = field(default_factory=lambda: dict)
    """Built class."""
    leaf: LeafConfig = field(default_factory=WideLeafConfig)
    """Nested config whose default is a preset subclass."""
    dtype: torch.dtype = torch.bfloat16
    """Dtype given as a string."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Tuple given as a list."""
    scale: float = 1.0
    """Float accepting ints."""
    path: str | None = None
    """Optional string."""
    state_dict_transform: Callable[[dict], dict] | None = None
    """Named transform."""


ROOT = f"{__name__}.RootConfig"


def test_builds_typed_values():
    config = build_config(
        {"_config_": ROOT, "dtype": "float16", "patch_size": [1, 4, 4], "scale": 3, "path": None}
    )
    assert config.dtype is torch.float16
    assert config.patch_size == (1, 4, 4)
    assert config.scale == 3.0 and isinstance(config.scale, float)
    assert isinstance(config.leaf, WideLeafConfig) and config.leaf.size == 8


def test_partial_nested_node_keeps_preset_class():
    config = build_config({"_config_": ROOT, "leaf": {"kind": "ulysses"}})
    assert type(config.leaf) is WideLeafConfig
    assert (config.leaf.size, config.leaf.kind) == (8, "ulysses")


def test_unknown_key_names_path_and_siblings():
    with pytest.raises(KeyError) as error:
        build_config({"_config_": ROOT, "leaf": {"sise": 3}})
    assert error.value.args[0] == (
        "unknown config key 'config.leaf.sise': WideLeafConfig has no field 'sise'. "
        "Valid keys at 'config.leaf': kind, size"
    )


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"scale": "big"}, "config.scale: expected a number, got 'big'"),
        ({"leaf": {"size": 1.5}}, "config.leaf.size: expected an integer, got 1.5"),
        ({"leaf": {"kind": "tree"}}, "config.leaf.kind: 'tree' is not one of 'ring', 'ulysses'"),
        ({"dtype": "float17"}, "config.dtype: unknown dtype 'float17'"),
        ({"patch_size": [1, 2]}, "config.patch_size: expected 3 items, got 2"),
        (
            {"state_dict_transform": "nope"},
            "config.state_dict_transform: unknown state_dict_transform 'nope'",
        ),
    ],
)
def test_bad_values(node, message):
    with pytest.raises(ConfigError) as error:
        build_config({"_config_": ROOT, **node})
    assert str(error.value).startswith(message)


def test_only_config_classes_may_be_named():
    with pytest.raises(ConfigError) as error:
        build_config({"_config_": "os.system"})
    assert "'os.system' is not a config class" in str(error.value)
    with pytest.raises(ConfigError, match="cannot import config class 'nowhere.Config'"):
        build_config({"_config_": "nowhere.Config"})
    with pytest.raises(ConfigError, match="is not a LeafConfig"):
        build_config({"_config_": ROOT, "leaf": {"_config_": ROOT}})


def test_target_cannot_be_set():
    with pytest.raises(KeyError, match="has no field '_target'"):
        build_config({"_config_": ROOT, "_target": "builtins.eval"})


def test_named_transform_and_round_trip(monkeypatch):
    monkeypatch.setitem(
        config_tree.STATE_DICT_TRANSFORMS, "double_weights", f"{__name__}:double_weights"
    )
    config = build_config(
        {"_config_": ROOT, "state_dict_transform": "double_weights", "dtype": "float32"}
    )
    assert config.state_dict_transform is double_weights
    container = config_to_container(config)
    assert container["state_dict_transform"] == "double_weights"
    assert container["dtype"] == "float32" and container["patch_size"] == [1, 2, 2]
    assert build_config(container) == config


def test_unregistered_callable_cannot_be_saved():
    config = RootConfig(state_dict_transform=lambda sd: sd)
    with pytest.raises(ConfigError, match="has no registered name"):
        config_to_container(config)


def _entry_point(name: str, value: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name=name, value=value, group=registry.ENTRY_POINT_GROUP)


def test_registry_rejects_duplicate_slugs(monkeypatch):
    points = [
        _entry_point("wan-tiny-t2v", "flashdreams.runner.builtin:WAN_TINY_T2V"),
        _entry_point("wan-tiny-t2v", "flashdreams.runner.builtin:WAN_TINY_I2V"),
    ]
    monkeypatch.setattr(registry, "_entry_points", lambda: points)
    with pytest.raises(
        registry.DuplicateSlugError, match="slug 'wan-tiny-t2v' is registered twice"
    ):
        registry.discover_runners()


def test_registry_checks_slug_matches_entry_point(monkeypatch):
    points = [_entry_point("other", "flashdreams.runner.builtin:WAN_TINY_T2V")]
    monkeypatch.setattr(registry, "_entry_points", lambda: points)
    with pytest.raises(ValueError, match="entry-point name and the slug must match"):
        registry.discover_runners()
