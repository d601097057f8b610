"""Recipe keys and defaults are declared once: the schema reads the YAML's defaults, and a default given
in both places is refused."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from compiler.core import schema
from tests.conftest import compose


@pytest.mark.parametrize("section", ["data", "export", "check", "bench", "doctor", "cache", "search"])
def test_composed_recipe_and_schema_see_the_same_defaults(section):
    composed = OmegaConf.to_container(compose()[section])
    assert composed == dataclasses.asdict(schema.SECTIONS[section]())


def test_constant_promote_bytes_comes_from_the_recipes():
    assert schema.CONSTANT_PROMOTE_BYTES == compose().export.constant_promote_bytes == 65536


def test_a_default_declared_twice_is_refused():
    with pytest.raises(TypeError, match="default declared both in compiler/core/schema.py and in the recipes"):
        @dataclasses.dataclass
        @schema.defaults_from_recipes("export")
        class Twice:
            exporter: str
            opset: int = 17  # also in recipes/config.yaml
            dynamic_axes: bool
            external_data: str
            constant_promote_bytes: int


def test_a_yaml_key_the_schema_lacks_is_refused():
    with pytest.raises(TypeError, match="recipes: export.opset is not a field of Short"):
        @schema.defaults_from_recipes("export")
        class Short:
            exporter: str


def test_recipe_keys_are_the_recipe_dataclass_fields():
    assert schema.RECIPE_KEYS == ("name", "description", "steps", "gate", "repair")
    assert set(compose().keys()) <= schema.TOP_LEVEL_KEYS
