"""DistillationConfig validation and the script's argument parsing (flags and YAML)."""

from __future__ import annotations

import dataclasses

import pytest

from hfcompress.jobs.distill import DistillScriptArguments, parse_distill_args
from hfcompress.distillation.config import DistillationConfig
from hfcompress.distillation.hidden import resolve_layer_map
from hfcompress.core.errors import ConfigError


def make(tmp_path, **kwargs):
    return DistillationConfig(output_dir=str(tmp_path), report_to=[], **kwargs)


def test_every_distillation_field_is_documented():
    base = {f.name for f in dataclasses.fields(DistillationConfig.__mro__[1])}
    own = [f for f in dataclasses.fields(DistillationConfig) if f.name not in base]
    assert {f.name for f in own} >= {"loss", "temperature", "kd_weight", "ce_weight", "beta", "skew_alpha",
                                     "hidden_weight", "hidden_loss", "layer_map", "loss_chunk_size",
                                     "teacher_model_init_kwargs"}
    assert all(f.metadata.get("help") for f in own)


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"beta": 1.5}, "beta"),
    ({"beta": -0.1}, "beta"),
    ({"skew_alpha": 1.0}, "skew_alpha"),
    ({"loss": "kl"}, "loss"),
    ({"hidden_loss": "l1"}, "hidden_loss"),
    ({"kd_weight": -1.0}, "kd_weight"),
    ({"kd_weight": 0.0, "ce_weight": 0.0, "hidden_weight": 0.0}, "nothing to train"),
    ({"loss_chunk_size": -1}, "loss_chunk_size"),
    ({"layer_map": "every"}, "layer_map"),
    ({"layer_map": {"a": 1}}, "layer_map"),
    ({"layer_map": {"0": -1}}, "negative"),
    ({"teacher_model_init_kwargs": "{not json"}, "JSON"),
])
def test_bad_values_raise_config_error(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make(tmp_path, **kwargs)


def test_json_strings_are_parsed(tmp_path):
    config = make(tmp_path, layer_map='{"0": 1, "1": 3}', teacher_model_init_kwargs='{"dtype": "bfloat16"}')
    assert config.layer_map == {0: 1, 1: 3}
    assert config.teacher_model_init_kwargs == {"dtype": "bfloat16"}
    assert make(tmp_path, layer_map={1: 2}).layer_map == {1: 2}
    assert '"layer_map"' in config.to_json_string()  # still serialisable like any TrainingArguments


def test_layer_maps_resolve_against_depths():
    assert resolve_layer_map("uniform", 4, 8) == {0: 1, 1: 3, 2: 5, 3: 7}
    assert resolve_layer_map("uniform", 3, 8) == {0: 2, 1: 4, 2: 7}
    assert resolve_layer_map("last", 2, 8) == {1: 7}
    assert resolve_layer_map({1: 3}, 2, 4) == {1: 3}
    with pytest.raises(ConfigError, match="student layer 2"):
        resolve_layer_map({2: 3}, 2, 4)
    with pytest.raises(ConfigError, match="teacher layer 9"):
        resolve_layer_map({1: 9}, 2, 4)


def test_parse_flags(tmp_path):
    script, config = parse_distill_args([
        "--teacher", "some/teacher", "--student_num_layers", "2", "--output_dir", str(tmp_path),
        "--loss", "jsd", "--beta", "0.3", "--layer_map", '{"1": 3}', "--report_to", "none"])
    assert isinstance(script, DistillScriptArguments)
    assert (script.teacher, script.student, script.student_num_layers, script.dataset) == (
        "some/teacher", "from-teacher", 2, "stdlib")
    assert (config.loss, config.beta, config.layer_map) == ("jsd", 0.3, {1: 3})


def test_parse_yaml_with_flag_override(tmp_path):
    recipe = tmp_path / "run.yaml"
    recipe.write_text("teacher: reference:tiny\nblock_size: 64\nloss: reverse_kl\ntemperature: 2.0\n"
                      "layer_map: {0: 1}\nlearning_rate: 1.0e-3\n")
    script, config = parse_distill_args(["--config", str(recipe), "--temperature", "3.0",
                                         "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    assert (script.teacher, script.block_size) == ("reference:tiny", 64)
    assert (config.loss, config.temperature, config.layer_map, config.learning_rate) == (
        "reverse_kl", 3.0, {0: 1}, 1e-3)


def test_yaml_typo_names_the_closest_field(tmp_path):
    recipe = tmp_path / "run.yaml"
    recipe.write_text("temprature: 2.0\n")
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        parse_distill_args(["--config", str(recipe)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_distill_args(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="temperature"):
        parse_distill_args(["--temperature", "0", "--report_to", "none"])


def test_parse_recipe_distill_stage(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: r\nmodel: reference:tiny\nstages:\n  - distill:\n      loss: tvd\n      block_size: 32\n")
    script, config = parse_distill_args(["--config", str(recipe), "--report_to", "none",
                                         "--output_dir", str(tmp_path / "out")])
    assert (script.teacher, script.block_size, config.loss) == ("reference:tiny", 32, "tvd")


def test_defaults_are_the_benchmarked_recipe():
    """scripts/bench/results/distill_base.md: forward KL 1.0 + CE 0.5 + cosine hidden-state loss 10, T=1."""
    args = DistillationConfig(output_dir="unused", report_to=[])
    assert (args.loss, args.temperature, args.kd_weight, args.ce_weight, args.hidden_weight, args.hidden_loss,
            args.layer_map) == ("forward_kl", 1.0, 1.0, 0.5, 10.0, "cosine", "uniform")


def test_cli_student_keeps_the_named_layer_selection(tmp_path, tiny_reference_dir):
    from hfcompress.jobs.distill import build_student

    script, _ = parse_distill_args(["--teacher", str(tiny_reference_dir), "--student_num_layers", "1",
                                    "--student_layer_selection", "keep-last", "--output_dir", str(tmp_path),
                                    "--report_to", "none"])
    student = build_student(script)
    assert student.config.hfcompress_student_of["teacher_layers"] == [1]  # the tiny teacher's last of 2
