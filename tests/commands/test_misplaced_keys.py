"""A key of the recipe section written at the top level (`repair.enabled=true`, as recipes/repair/default.yaml
spells it) gets "did you mean 'recipe.repair.enabled'?", derived from the recipe schema, on the command line
(Hydra's composition error) and in a composed config (validate)."""

from __future__ import annotations

import pytest
from conftest import compose

from compiler.commands import cli
from compiler.core.errors import RecipeError
from compiler.stages.validate import validate

MISPLACED = [
    (["repair.enabled=true"], "repair.enabled: unknown key -- did you mean 'recipe.repair.enabled'?"),
    (["gate.min_embedding_cosine=0.99"],
     "gate.min_embedding_cosine: unknown key -- did you mean 'recipe.gate.min_embedding_cosine'?"),
    (["model=tiny_bert", "repair.max_task_dorp=0.01"],  # misplaced and misspelt: both mended
     "repair.max_task_dorp: unknown key -- did you mean 'recipe.repair.max_task_drop'?"),
    (["steps.int8_static.calibration=entropy"],
     "steps.int8_static.calibration: unknown key -- did you mean 'recipe.steps.int8_static.calibration'?"),
    (["name=mine"], "name: unknown key -- did you mean 'recipe.name'?"),
    (["sed=3"], "sed: unknown key -- did you mean 'seed'?"),  # not a recipe key: the closest top-level one
]


@pytest.mark.parametrize("args,line", MISPLACED, ids=[a[-1].split("=")[0] for a, _ in MISPLACED])
def test_command_line_names_the_key_under_recipe(capsys, tmp_path, monkeypatch, args, line):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(args)  # refused by the pre-check, before Hydra starts a job
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"qcompile: recipe error: {line}"]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("override,line", [
    ("+repair.enabled=true", "repair.enabled: unknown top-level key -- did you mean 'recipe.repair.enabled'?"),
    ("+gate.min_embedding_cosine=0.99",
     "gate.min_embedding_cosine: unknown top-level key -- did you mean 'recipe.gate.min_embedding_cosine'?"),
    ("+exprt.opset=17", "exprt.opset: unknown top-level key -- did you mean 'export'?"),
])
def test_validate_names_the_key_under_recipe(override, line):
    with pytest.raises(RecipeError) as info:
        validate(compose("model=tiny_bert", "recipe=fp32", override))
    assert str(info.value) == line


def test_every_recipe_section_key_gets_the_hint():
    """Derived from RecipeConfig, not a list: every field of recipe.gate and recipe.repair is found."""
    from dataclasses import fields

    from compiler.core.schema import GateConfig, RepairConfig
    from compiler.stages.validate import recipe_key

    for section, schema in (("gate", GateConfig), ("repair", RepairConfig)):
        for f in fields(schema):
            assert recipe_key(f"{section}.{f.name}") == f"recipe.{section}.{f.name}"
    assert recipe_key("model.path") is None and recipe_key("seed") is None
