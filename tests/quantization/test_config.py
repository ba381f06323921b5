import dataclasses

import pytest

from hfcompress.core.errors import ConfigError
from hfcompress.quantization.config import QuantizationConfig


def test_json_round_trip_keeps_every_field():
    config = QuantizationConfig(method="gptq", bits=3, group_size=None, symmetric=False, rounding="stochastic",
                                seed=7, observer="mse", ignore=["lm_head", "re:.*gate.*"], num_samples=4,
                                seq_len=32, damp=0.05, block_size=16, act_order=False,
                                sequential_targets=["re:model\\.layers\\.\\d+"])
    again = QuantizationConfig.from_json(config.to_json())
    assert again == config
    # gptq reads every field but the cast and bitsandbytes ones; to_dict() lists exactly those.
    assert set(config.to_dict()) == {f.name for f in dataclasses.fields(QuantizationConfig)} - {
        "dtype", "bnb_threshold", "bnb_double_quant", "bnb_compute_dtype", "bnb_block_size"}


@pytest.mark.parametrize("method, stray", [
    ("bnb_nf4", {"act_order": False}), ("bnb_int8", {"bits": 8}), ("cast", {"group_size": 64}),
    ("rtn", {"damp": 0.05}), ("awq", {"true_sequential": False}), ("gptq", {"bnb_threshold": 3.0}),
    ("rtn", {"dtype": "float16"}), ("bnb_nf4", {"bnb_threshold": 3.0}),
])
def test_a_field_that_does_not_apply_to_the_method_is_an_error(method, stray):
    with pytest.raises(ConfigError) as info:
        QuantizationConfig(method=method, **stray)
    message = str(info.value)
    assert f"{next(iter(stray))} does not apply to method={method!r}" in message
    assert message.endswith("its fields are: " + ", ".join(QuantizationConfig(method=method).applicable_fields()))
    # The same values at their defaults are fine: a CLI passes every flag.
    defaults = QuantizationConfig()
    QuantizationConfig(method=method, **{key: getattr(defaults, key) for key in stray})


def test_to_dict_lists_only_what_applies():
    assert QuantizationConfig(method="bnb_nf4").to_dict() == {
        "method": "bnb_nf4", "ignore": ["lm_head"], "bnb_double_quant": True, "bnb_compute_dtype": "float32",
        "bnb_block_size": 64}
    assert QuantizationConfig(method="cast", dtype="float16").to_dict() == {"method": "cast", "dtype": "float16"}
    assert set(QuantizationConfig(method="rtn", bits=8).to_dict()) == {
        "method", "bits", "group_size", "symmetric", "rounding", "seed", "observer", "ignore", "num_samples",
        "seq_len", "calibration_dtype", "sequential_targets"}
    for method in ("cast", "rtn", "gptq", "awq", "bnb_int8", "bnb_nf4", "bnb_fp4"):
        config = QuantizationConfig(method=method)
        assert QuantizationConfig.from_dict(config.to_dict()) == config


def test_every_field_has_help_and_a_simple_type():
    for f in dataclasses.fields(QuantizationConfig):
        assert f.metadata.get("help"), f.name
        assert f.type in ("str", "int", "float", "bool", "int | None", "str | None", "list[str]", "list[str] | None"), f.type


def test_defaults_ignore_lm_head_and_bnb_fields():
    config = QuantizationConfig()
    assert config.ignore == ["lm_head"]
    assert (config.bnb_threshold, config.bnb_double_quant, config.bnb_compute_dtype, config.bnb_block_size) == \
        (6.0, True, "float32", 64)
    assert QuantizationConfig(method="bnb_nf4").method == "bnb_nf4"


@pytest.mark.parametrize("kwargs, words", [
    ({"bits": 5}, "bits=5"),
    ({"bits": 16}, "bits=16"),
    ({"method": "gtpq"}, "did you mean 'gptq'"),
    ({"group_size": 0}, "group_size"),
    ({"group_size": True}, "group_size"),
    ({"rounding": "up"}, "rounding"),
    ({"observer": "percentile"}, "observer"),
    ({"method": "cast", "dtype": "float8"}, "dtype"),
    ({"damp": 1.5}, "damp"),
    ({"num_samples": 0}, "num_samples"),
    ({"seq_len": 1}, "seq_len"),
    ({"ignore": [""]}, "ignore"),
    ({"symmetric": "yes"}, "symmetric"),
    ({"bnb_threshold": -1.0}, "bnb_threshold"),
    ({"bnb_compute_dtype": "int8"}, "bnb_compute_dtype"),
    ({"bnb_block_size": 100}, "bnb_block_size"),
    ({"bnb_double_quant": 1}, "bnb_double_quant"),
    ({"static_groups": "no"}, "static_groups"),
    ({"calibration_dtype": "float32x"}, "calibration_dtype"),
])
def test_invalid_values_raise_one_line_config_errors(kwargs, words):
    with pytest.raises(ConfigError, match=words) as info:
        QuantizationConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'group_size'"):
        QuantizationConfig.from_dict({"groupsize": 64})
    with pytest.raises(ConfigError, match="not valid JSON"):
        QuantizationConfig.from_json("{bits: 4")
