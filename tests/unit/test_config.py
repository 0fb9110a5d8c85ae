"""PrintableConfig, InstantiateConfig and derive_config."""

from dataclasses import dataclass, field

import pytest

from flashdreams.infra.config import InstantiateConfig, PrintableConfig, derive_config


class Widget:
    def __init__(self, config, scale=1):
        self.config = config
        self.scale = scale


@dataclass(kw_only=True)
class InnerConfig(PrintableConfig):
    depth: int = 2
    """How deep."""
    tags: dict = field(default_factory=lambda: {"a": 1, "nested": {"b": 2}})
    """Free-form tags."""


@dataclass(kw_only=True)
class WidgetConfig(InstantiateConfig):
    _target: type = field(default_factory=lambda: Widget)
    """Class built by setup()."""
    name: str = "w"
    """Name."""
    inner: InnerConfig = field(default_factory=InnerConfig)
    """Nested config."""


def test_setup_builds_target_with_config_and_kwargs():
    config = WidgetConfig(name="x")
    widget = config.setup(scale=3)
    assert isinstance(widget, Widget)
    assert widget.config is config
    assert widget.scale == 3


def test_str_is_multiline_and_names_every_field():
    text = str(WidgetConfig())
    lines = text.splitlines()
    assert lines[0] == "WidgetConfig("
    assert any(line.strip() == "name='w'," for line in lines)
    assert any(line.strip() == "depth=2," for line in lines)
    assert any("_target=" in line and "Widget" in line for line in lines)


def test_derive_config_deep_copies_and_walks_nested():
    base = WidgetConfig()
    derived = derive_config(base, name="y", inner=dict(depth=5, tags=dict(nested=dict(b=7))))
    assert derived.name == "y"
    assert derived.inner.depth == 5
    assert derived.inner.tags == {"a": 1, "nested": {"b": 7}}
    # The base is untouched.
    assert base.name == "w" and base.inner.depth == 2 and base.inner.tags["nested"]["b"] == 2
    assert derived.inner is not base.inner


def test_derive_config_leaf_replaces_whole_config():
    replacement = InnerConfig(depth=9)
    derived = derive_config(WidgetConfig(), inner=replacement)
    assert derived.inner.depth == 9


def test_derive_config_unknown_field_names_full_path():
    with pytest.raises(KeyError, match=r"unknown path 'inner\.dpeth'"):
        derive_config(WidgetConfig(), inner=dict(dpeth=3))


def test_derive_config_unknown_dict_key_names_full_path():
    with pytest.raises(KeyError, match=r"unknown path 'inner\.tags\.nested\.c'"):
        derive_config(WidgetConfig(), inner=dict(tags=dict(nested=dict(c=1))))


def test_derive_config_dict_on_a_non_config_leaf_overwrites():
    derived = derive_config(WidgetConfig(), name={"length": 3})
    assert derived.name == {"length": 3}
