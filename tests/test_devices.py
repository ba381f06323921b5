"""Device options: ``--device`` / ``--device-map`` in the CLI, the recipe keys, ``evaluate``'s device fields, and
the one-line error for a GPU the machine lacks."""

from __future__ import annotations

import pytest
import torch

from hfcompress.cli import main
from hfcompress.core.devices import peak_memory_bytes, resolve_device
from hfcompress.core.errors import ConfigError
from hfcompress.models import evaluate as ev
from hfcompress.models.loading import ModelLoadError, placement_kwargs
from hfcompress.runs.recipe import parse_recipe

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")


def _last_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


@no_cuda
def test_eval_on_cuda_without_cuda_is_one_line(capsys, tiny_reference_dir):
    assert main(["eval", str(tiny_reference_dir), "--device", "cuda", "--no-speed", "-q"]) == 2
    line = _last_error_line(capsys)
    assert line.startswith("hfcompress eval: error: device 'cuda' was requested but") and "device='cpu'" in line


@no_cuda
def test_quantize_on_cuda_without_cuda_is_one_line(capsys, tmp_path, tiny_reference_dir):
    assert main(["quantize", str(tiny_reference_dir), str(tmp_path / "out"), "--method", "rtn", "--bits", "8",
                 "--device", "cuda:0", "-q"]) == 2
    assert "device 'cuda:0' was requested" in _last_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_placement_kwargs():
    assert placement_kwargs() == {} and placement_kwargs("cpu") == {}
    assert placement_kwargs(device_map="auto") == {"device_map": "auto"}
    assert placement_kwargs(device_map={"": "cpu"}) == {"device_map": {"": "cpu"}}
    with pytest.raises(ModelLoadError, match="not both"):
        placement_kwargs("cpu", "auto")
    with pytest.raises(ConfigError, match="unknown device"):
        placement_kwargs("tpu:0")


def test_recipe_stages_take_device_keys():
    recipe = parse_recipe({"model": "reference:tiny", "stages": [
        {"quantize": {"method": "rtn", "bits": 8, "device": "cuda"}},
        {"evaluate": {"device": "cuda:1", "device_map": None}}]})
    assert recipe.stages[0].configs["QuantizeStageArgs"].device == "cuda"
    assert recipe.stages[1].configs["EvaluateStageArgs"].device == "cuda:1"


def test_evaluate_on_cpu_records_the_device_and_no_gpu_memory(tiny_reference_dir):
    result = ev.evaluate(str(tiny_reference_dir), data="stdlib:test", block_size=32, num_blocks=2, speed=False,
                         progress=False, device="cpu")
    assert result.device == "cpu" and result.peak_gpu_memory_bytes is None
    assert "peak GPU memory" not in result.table()
    with_gpu = ev.EvalResult(**{**result.to_dict(), "peak_gpu_memory_bytes": 3 * 2 ** 30})
    assert "3.00 GiB" in ev.format_table([result, with_gpu])
    assert peak_memory_bytes(torch.device("cpu")) is None


@pytest.mark.cuda
def test_evaluate_on_cuda_measures_gpu_memory(tiny_reference_dir):
    result = ev.evaluate(str(tiny_reference_dir), data="stdlib:test", block_size=32, num_blocks=2, new_tokens=4,
                         progress=False, device="cuda")
    assert result.device.startswith("cuda") and result.peak_gpu_memory_bytes >= result.weight_bytes
    assert result.decode_tokens_per_s > 0
    assert resolve_device("auto").type == "cuda"
