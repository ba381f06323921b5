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
    assert set(config.to_dict()) == {f.name for f in dataclasses.fields(QuantizationConfig)}


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
