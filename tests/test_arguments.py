"""jobs/arguments.py: the one parser behind the CLI, the scripts and recipes."""

import sys

import pytest

from hfcompress.cli import main, quantize_parser
from hfcompress.core.errors import ConfigError
from hfcompress.jobs.arguments import ArgumentParser, UsageError, build_dataclasses
from hfcompress.jobs.stages import QuantizeStageArgs
from hfcompress.quantization.config import QuantizationConfig

CLASSES = (QuantizeStageArgs, QuantizationConfig)


def _cli_config(*flags):
    stage, config, rest = quantize_parser().parse_into_dataclasses(["model", "out", *flags])
    assert (rest.model, rest.output) == ("model", "out")
    return stage, config


def test_cli_flags_are_the_dataclass_fields_with_their_defaults():
    stage, config = _cli_config()
    assert stage == QuantizeStageArgs() and config == QuantizationConfig()
    stage, config = _cli_config("--method", "gptq", "--bits", "3", "--group-size", "none", "--act_order", "false",
                                "--ignore", "--calibration-data", "stdlib:train", "--no-true-sequential")
    assert (config.method, config.bits, config.group_size, config.act_order, config.ignore,
            config.true_sequential) == ("gptq", 3, None, False, [], False)
    assert stage.calibration_data == "stdlib:train"


def test_a_mistake_is_one_line_with_a_suggestion_and_exit_code_2(capsys):
    assert main(["quantize", "m", "o", "--bitz", "4"]) == 2
    err = capsys.readouterr().err
    assert err == "hfcompress quantize: error: unrecognized arguments: --bitz 4 (did you mean --bits?)\n"
    assert main(["quantize", "m", "o", "--bits", "four"]) == 2
    assert capsys.readouterr().err == "hfcompress quantize: error: argument --bits: invalid int value: 'four'\n"


def test_config_file_and_recipe_stage_are_the_same_mapping(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("method: gptq\nbits: 3\ncalibration_data: stdlib:train\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: reference:tiny\nstages:\n  - quantize: {method: gptq, bits: 3, "
                      "calibration_data: 'stdlib:train'}\n")
    parser = ArgumentParser(CLASSES, config_kind="quantize")
    from_flat = parser.parse_into_dataclasses(["--config", str(flat), "--bits", "4"])
    assert (from_flat[0].calibration_data, from_flat[1].method, from_flat[1].bits) == ("stdlib:train", "gptq", 4)
    built = build_dataclasses(list(CLASSES), {"method": "gptq", "bits": 3, "calibration_data": "stdlib:train"},
                              "stage 0")
    assert ArgumentParser(CLASSES, config_kind="quantize").parse_into_dataclasses(["--config", str(flat)]) == (
        built["QuantizeStageArgs"], built["QuantizationConfig"])
    with pytest.raises(ConfigError, match="unknown key 'model'"):  # the recipe's model is not a config field here
        ArgumentParser(CLASSES, config_kind="quantize").parse_into_dataclasses(["--config", str(recipe)])
    typo = tmp_path / "typo.yaml"
    typo.write_text("metod: rtn\n")
    with pytest.raises(ConfigError, match=r"unknown key 'metod'; did you mean 'method'\?"):
        ArgumentParser(CLASSES, config_kind="quantize").parse_into_dataclasses(["--config", str(typo)])
    with pytest.raises(ConfigError, match=r"key 'bits' expects int, got 'four'"):
        build_dataclasses(list(CLASSES), {"bits": "four"}, "stage 0")


def test_library_callers_get_an_error_not_an_exit():
    with pytest.raises(UsageError, match="did you mean --method"):
        ArgumentParser(CLASSES).parse_into_dataclasses(["--metod", "rtn"])


def test_scripts_quantize_reads_a_recipe(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "quantize_script", Path(__file__).parent.parent / "scripts" / "quantize.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses resolve the script's annotations through sys.modules
    try:
        spec.loader.exec_module(script)
    finally:
        sys.modules.pop(spec.name, None)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: reference:tiny\nstages:\n  - quantize: {method: rtn, bits: 8}\n")
    script_args, config = script.parse_args(["--config", str(recipe), "--output", str(tmp_path / "o")])
    assert (script_args.model, config.method, config.bits) == ("reference:tiny", "rtn", 8)
