from pathlib import Path

import pytest

from hfcompress.core.errors import ConfigError
from hfcompress.runs.recipe import load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_the_expected_recipes_ship():
    names = {p.stem for p in RECIPES}
    for expected in ("quickstart", "quantize-bf16", "quantize-int8-rtn", "quantize-int4-gptq", "quantize-int4-awq",
                     "quantize-bnb-nf4", "distill-logits-kl", "distill-hidden-states", "distill-then-quantize"):
        assert expected in names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_loads_and_validates(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line == f"# Run: hfcompress run recipes/{path.name}"
    recipe = load_recipe(path)
    assert recipe.stages and recipe.name == path.stem
    for stage in recipe.stages:
        assert stage.configs  # every key was routed to a config dataclass and the dataclass validated it


def _doc(**quantize):
    return {"name": "t", "model": "reference:tiny", "stages": [{"quantize": {"method": "rtn", **quantize}}]}


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"stage 0 \(quantize\): unknown key 'bitz'; did you mean 'bits'\?"):
        parse_recipe(_doc(bitz=4))
    with pytest.raises(ConfigError, match="unknown kind 'quantise'; did you mean 'quantize'"):
        parse_recipe({"model": "reference:tiny", "stages": [{"quantise": {}}]})
    with pytest.raises(ConfigError, match="unknown top-level key 'stage'; did you mean 'stages'"):
        parse_recipe({"stage": []})


def test_wrong_type_and_invalid_values_name_the_key():
    with pytest.raises(ConfigError, match=r"key 'bits' expects int, got 'four'"):
        parse_recipe(_doc(bits="four"))
    with pytest.raises(ConfigError, match=r"stage 0 \(quantize\).*bits"):
        parse_recipe(_doc(bits=5))


def test_missing_required_and_missing_inputs():
    with pytest.raises(ConfigError, match="missing required key 'repo_id'"):
        parse_recipe({"model": "reference:tiny", "stages": [{"push": {"dry_run": True}}]})
    with pytest.raises(ConfigError, match="missing required key 'stages'"):
        parse_recipe({"name": "x"})
    with pytest.raises(ConfigError, match="needs 'later', which no earlier stage produces"):
        parse_recipe({"model": "reference:tiny", "stages": [
            {"evaluate": {"models": ["later"]}}, {"quantize": {"name": "later", "method": "rtn"}}]})
    with pytest.raises(ConfigError, match="needs an input model"):
        parse_recipe({"stages": [{"quantize": {"method": "rtn"}}]})


def test_overrides():
    recipe = parse_recipe(_doc(bits=4), overrides=["quantize.bits=8", "model=reference:small"])
    assert recipe.stages[0].configs["QuantizationConfig"].bits == 8
    assert recipe.model == "reference:small"
    assert recipe.digest() != parse_recipe(_doc(bits=4)).digest()
    with pytest.raises(ConfigError, match="no stage matches 'quantise'"):
        parse_recipe(_doc(), overrides=["quantise.bits=8"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_recipe(_doc(), overrides=["bits"])


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\nstages: []\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(evil)
