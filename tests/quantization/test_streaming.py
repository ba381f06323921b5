"""quantize_checkpoint: a checkpoint quantized layer by layer from its shards equals the in-memory result."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hfcompress.quantization import streaming as ST
from hfcompress.quantization.api import LayerwiseQuantizer, quantize
from hfcompress.quantization.checkpoint import CheckpointError, read_index
from hfcompress.quantization.config import QuantizationConfig
from hfcompress.quantization.saving import save_checkpoint


def _tiny(kind: str = "llama", layers: int = 3, tie: bool = False, vocab: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def _source(tmp_path: Path, kind: str = "llama", layers: int = 3, tie: bool = False, tokenizer=None) -> Path:
    """A sharded fp32 checkpoint (small shards: the layers span several files)."""
    folder = tmp_path / f"src-{kind}"
    _tiny(kind, layers, tie, len(tokenizer) if tokenizer is not None else 256).save_pretrained(
        folder, max_shard_size="60KB")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _tokens(n: int = 4, t: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(1))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for info in read_index(folder).values():
        with safe_open(str(info.file), "pt") as handle:
            out[info.name] = handle.get_tensor(info.name)
    return out


def _in_memory(src: Path, out: Path, config: QuantizationConfig, data=None) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src).eval()
    quantize(model, config, calibration_data=data, progress=False)
    return save_checkpoint(model, out)


def _config_json(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_rtn_is_bit_identical_to_the_in_memory_path(tmp_path, kind):
    src = _source(tmp_path, kind)
    config = QuantizationConfig(method="rtn", bits=4, group_size=32)
    memory = _in_memory(src, tmp_path / "memory", config)
    streamed = ST.quantize_checkpoint(src, tmp_path / "stream", config, max_shard_size="20KB", progress=False)
    a, b = _tensors(memory), _tensors(streamed)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    ca, cb = _config_json(memory), _config_json(streamed)
    assert ca["quantization_config"] == cb["quantization_config"]
    assert ca["hfcompress"] == cb["hfcompress"]
    assert {k: v for k, v in ca.items()} == cb
    # several shards, and an index that names exactly the tensors each holds
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())


def test_tied_embeddings_are_written_once_as_save_pretrained_does(tmp_path):
    src = _source(tmp_path, tie=True)
    config = QuantizationConfig(method="rtn", bits=4, group_size=32)
    memory = _in_memory(src, tmp_path / "memory", config)
    streamed = ST.quantize_checkpoint(src, tmp_path / "stream", config, progress=False)
    a, b = _tensors(memory), _tensors(streamed)
    assert a.keys() == b.keys() and "lm_head.weight" not in b
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # quantizing the tied head itself is refused, as in memory
    with pytest.raises(ST.A.QuantizationError, match="tied weights"):
        ST.quantize_checkpoint(src, tmp_path / "head", QuantizationConfig(method="rtn", group_size=32, ignore=[]),
                               progress=False)


def test_rtn_with_calibration_statistics_matches_too(tmp_path):
    """MSE-clipped RTN weights its search by each layer's inputs: those come from the quantized layers before
    it in both paths, so the codes are the same."""
    src = _source(tmp_path)
    config = QuantizationConfig(method="rtn", bits=4, group_size=32, observer="mse", num_samples=4, seq_len=32)
    tokens = _tokens()
    memory = _in_memory(src, tmp_path / "memory", config, tokens)
    streamed = ST.quantize_checkpoint(src, tmp_path / "stream", config, calibration_data=tokens, progress=False)
    a, b = _tensors(memory), _tensors(streamed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _config_json(memory)["hfcompress"] == _config_json(streamed)["hfcompress"]


@pytest.mark.parametrize("true_sequential", [True, False])
def test_gptq_matches_the_in_memory_path(tmp_path, true_sequential):
    """Same calibration tokens, same per-layer steps: GPTQ's codes agree. The layer inputs are computed by the
    same float operations in both paths, so they are expected bit-identical (and are, on this machine, for
    GPTQ and AWQ alike); the tolerance allows codes to
    move by one step on a ~1e-6 fraction of weights (a rounding tie flipped by a different summation order
    of the float32 Hessian), which would not change the output error by more than 1e-3 relative."""
    src = _source(tmp_path)
    config = QuantizationConfig(method="gptq", bits=4, group_size=32, num_samples=4, seq_len=32,
                                true_sequential=true_sequential)
    tokens = _tokens()
    memory = _in_memory(src, tmp_path / "memory", config, tokens)
    streamed = ST.quantize_checkpoint(src, tmp_path / "stream", config, calibration_data=tokens, progress=False)
    a, b = _tensors(memory), _tensors(streamed)
    assert a.keys() == b.keys()
    differing = sum(int((a[n] != b[n]).sum()) for n in a if n.endswith("weight_packed"))
    total = sum(a[n].numel() for n in a if n.endswith("weight_packed"))
    assert differing <= math.ceil(1e-6 * total)
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)
    la = _config_json(memory)["hfcompress"]["layers"]
    lb = _config_json(streamed)["hfcompress"]["layers"]
    assert [x["name"] for x in la] == [x["name"] for x in lb]
    for x, y in zip(la, lb):
        assert y["error_after"] == pytest.approx(x["error_after"], rel=1e-3)
    assert _config_json(streamed)["hfcompress"]["true_sequential"] == true_sequential


def test_output_loads_with_transformers_and_hfcompress_and_verifies(tmp_path):
    from transformers import AutoModelForCausalLM

    import hfcompress
    from hfcompress.cli import main

    src = _source(tmp_path)
    config = QuantizationConfig(method="gptq", bits=4, group_size=32, num_samples=4, seq_len=32)
    out = hfcompress.quantize_checkpoint(src, tmp_path / "out", config, calibration_data=_tokens(), progress=False)
    tokens = _tokens(1, 16)
    reference = AutoModelForCausalLM.from_pretrained(src).eval()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    packed = hfcompress.load_compressed(out)
    with torch.no_grad():
        ref, a, b = (m(tokens).logits for m in (reference, plain, packed))
    assert (a - b.float()).norm() < 0.02 * a.norm()  # the packed runtime computes in bfloat16
    assert (a - ref).norm() < 0.5 * ref.norm()  # int4 of a random model: close, not equal
    assert main(["verify", str(out)]) == 0
    assert not list(tmp_path.glob(".out*"))  # the staging folder is gone


def test_resume_after_a_failure_does_not_redo_finished_layers(tmp_path, monkeypatch):
    src = _source(tmp_path, layers=4)
    config = QuantizationConfig(method="gptq", bits=4, group_size=32, num_samples=4, seq_len=32)
    tokens = _tokens()
    calls: list[str] = []
    original = LayerwiseQuantizer.quantize_layer

    def failing(self, layer_name, *args, **kwargs):
        calls.append(layer_name)
        if layer_name == "model.layers.2" and fail:
            raise RuntimeError("injected failure")
        return original(self, layer_name, *args, **kwargs)

    monkeypatch.setattr(LayerwiseQuantizer, "quantize_layer", failing)
    fail = True
    with pytest.raises(RuntimeError, match="injected"):
        ST.quantize_checkpoint(src, tmp_path / "out", config, calibration_data=tokens, progress=False)
    assert calls == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert not (tmp_path / "out").exists()
    calls.clear()
    fail = False
    out = ST.quantize_checkpoint(src, tmp_path / "out", config, calibration_data=tokens, progress=False)
    assert calls == ["model.layers.2", "model.layers.3"]
    # ... and the result is the one an uninterrupted run gives
    whole = ST.quantize_checkpoint(src, tmp_path / "whole", config, calibration_data=tokens, progress=False)
    a, b = _tensors(out), _tensors(whole)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _config_json(out)["hfcompress"] == _config_json(whole)["hfcompress"]


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch):
    src = _source(tmp_path)
    tokens = _tokens()

    def boom(self, layer_name, *args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(LayerwiseQuantizer, "quantize_layer", boom)
    config = QuantizationConfig(method="gptq", bits=4, group_size=32, num_samples=4, seq_len=32)
    with pytest.raises(RuntimeError):
        ST.quantize_checkpoint(src, tmp_path / "out", config, calibration_data=tokens, progress=False)
    other = QuantizationConfig(method="gptq", bits=8, group_size=32, num_samples=4, seq_len=32)
    with pytest.raises(ST.ResumeMismatchError, match="config.bits was 4, now 8"):
        ST.quantize_checkpoint(src, tmp_path / "out", other, calibration_data=tokens, progress=False)
    monkeypatch.undo()
    out = ST.quantize_checkpoint(src, tmp_path / "out", other, calibration_data=tokens, progress=False,
                                 resume=False)
    assert _config_json(out)["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 8


def test_calibration_cache_on_disk_gives_the_same_result(tmp_path):
    src = _source(tmp_path)
    config = QuantizationConfig(method="gptq", bits=4, group_size=32, num_samples=4, seq_len=32,
                                true_sequential=False)
    tokens = _tokens()
    a = _tensors(ST.quantize_checkpoint(src, tmp_path / "a", config, calibration_data=tokens, progress=False))
    b = _tensors(ST.quantize_checkpoint(src, tmp_path / "b", config, calibration_data=tokens, progress=False,
                                        cache_on_disk=True))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_awq_streams(tmp_path):
    src = _source(tmp_path)
    config = QuantizationConfig(method="awq", bits=4, group_size=32, num_samples=4, seq_len=32)
    tokens = _tokens()
    memory = _in_memory(src, tmp_path / "memory", config, tokens)
    streamed = ST.quantize_checkpoint(src, tmp_path / "stream", config, calibration_data=tokens, progress=False)
    a, b = _tensors(memory), _tensors(streamed)
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------
def test_missing_shard(tmp_path):
    src = _source(tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard '{shard.name}', which is missing"):
        ST.quantize_checkpoint(src, tmp_path / "out", QuantizationConfig(method="rtn"), progress=False)


def test_index_pointing_at_a_missing_tensor(tmp_path):
    src = _source(tmp_path)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.1.mlp.up_proj.weight"] = "model-00001-of-" + \
        sorted(src.glob("model-*.safetensors"))[0].name.split("-of-")[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        ST.quantize_checkpoint(src, tmp_path / "out", QuantizationConfig(method="rtn"), progress=False)


def test_tensor_missing_from_the_checkpoint(tmp_path):
    src = _source(tmp_path)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.norm.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError):
        ST.quantize_checkpoint(src, tmp_path / "out", QuantizationConfig(method="rtn"), progress=False)


def test_budget_smaller_than_one_layer(tmp_path):
    src = _source(tmp_path)
    with pytest.raises(ST.MemoryBudgetError, match=r"max_memory='1MB'.*raise max_memory to at least"):
        ST.quantize_checkpoint(src, tmp_path / "out", QuantizationConfig(method="rtn", group_size=32),
                               max_memory="1MB", progress=False)
    assert not list(tmp_path.glob(".out*")) and not (tmp_path / "out").exists()


def test_disk_full_removes_the_partial_output_and_says_how_much_is_needed(tmp_path, monkeypatch):
    src = _source(tmp_path)
    written = []
    original = ST.write_part

    def full_disk(path, tensors):
        if len(written) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        original(path, tensors)

    monkeypatch.setattr(ST, "write_part", full_disk)
    with pytest.raises(ST.DiskFullError, match=r"needs about \d+\.\d+ GiB"):
        ST.quantize_checkpoint(src, tmp_path / "out", QuantizationConfig(method="rtn", group_size=32),
                               progress=False)
    assert not list(tmp_path.glob(".out*")) and not (tmp_path / "out").exists()


def test_existing_output_is_not_clobbered(tmp_path):
    src = _source(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    from hfcompress.core.atomic import CheckpointExistsError

    with pytest.raises(CheckpointExistsError, match="not empty"):
        ST.quantize_checkpoint(src, out, QuantizationConfig(method="rtn"), progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_a_second_run_into_the_same_output_is_refused_while_the_first_writes(tmp_path):
    """Both runs would resume into the one fixed staging folder: the second stops at once, writing nothing."""
    from hfcompress.core.atomic import OutputInUseError, exclusive_output

    src = _source(tmp_path)
    out = tmp_path / "out"
    with exclusive_output(out):  # what a running quantize_checkpoint holds (flock: a second open conflicts)
        with pytest.raises(OutputInUseError, match=rf"being written by another hfcompress run \(pid {os.getpid()}\)"):
            ST.quantize_checkpoint(src, out, QuantizationConfig(method="rtn"), progress=False)
        assert not out.exists() and not list(tmp_path.glob(".out.partial*"))
    ST.quantize_checkpoint(src, out, QuantizationConfig(method="rtn"), progress=False)  # released: runs
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".out.lock"))


def test_memory_sizes_parse():
    assert ST.parse_memory("8GB") == 8 * 10 ** 9
    assert ST.parse_memory("1.5GiB") == int(1.5 * 2 ** 30)
    assert ST.parse_memory(1024) == 1024
    assert ST.parse_memory(None) is None
    with pytest.raises(ST.ConfigError):
        ST.parse_memory("lots")


def test_concat_parts_is_a_valid_safetensors_file(tmp_path):
    parts = []
    expected = {}
    for i in range(3):
        tensors = {f"t{i}.a": torch.randn(3, 5), f"t{i}.b": torch.arange(7, dtype=torch.int32 if i else torch.int64)}
        expected.update(tensors)
        parts.append(tmp_path / f"p{i}.safetensors")
        ST.write_part(parts[-1], tensors)
    ST.concat_parts(parts, tmp_path / "all.safetensors")
    with safe_open(str(tmp_path / "all.safetensors"), "pt") as handle:
        assert set(handle.keys()) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(handle.get_tensor(name), tensor)
    assert not any(p.exists() for p in parts)


def test_cli_stream_end_to_end(tmp_path, tiny_tokenizer):
    """GPTQ from text: the source folder's tokenizer tokenizes the calibration data and is saved with it."""
    from hfcompress.cli import main

    src = _source(tmp_path, tokenizer=tiny_tokenizer)
    out = tmp_path / "cli-out"
    assert main(["quantize", str(src), str(out), "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--num-samples", "4", "--seq-len", "64", "--calibration-data", "stdlib", "--stream",
                 "--max-memory", "4GB", "-q"]) == 0
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()
    assert main(["verify", str(out)]) == 0
    rtn = tmp_path / "cli-rtn"
    assert main(["quantize", str(src), str(rtn), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--stream", "-q"]) == 0
    memory = _in_memory(src, tmp_path / "memory", QuantizationConfig(method="rtn", bits=4, group_size=32))
    a, b = _tensors(memory), _tensors(rtn)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_rss_above_max_memory_while_running_stops_and_keeps_the_finished_layers(tmp_path, monkeypatch):
    """The bound is checked before starting (against the estimate) and after every unit (against the RSS)."""
    src = _source(tmp_path)
    config = QuantizationConfig(method="rtn", group_size=32)
    measured = iter([0] + [10 ** 9] * 4 + [10 ** 12] * 100)  # baseline, a few units, then far above the budget
    monkeypatch.setattr(ST, "rss_bytes", lambda: next(measured))
    with pytest.raises(ST.MemoryBudgetError, match="exceeds max_memory .* rerun with a larger max_memory"):
        ST.quantize_checkpoint(src, tmp_path / "out", config, max_memory="100GB", progress=False)
    state = ST.RunState.load(tmp_path / ".out.partial" / ST.WORK_DIR)
    # the unit during which the RSS went over was written and is kept; the later ones were not started
    assert state is not None and 4 <= len(state.done) < 6 and "model.layers.2" not in state.done
    monkeypatch.setattr(ST, "rss_bytes", lambda: 10 ** 9)
    out = ST.quantize_checkpoint(src, tmp_path / "out", config, max_memory="100GB", progress=False)
    assert ST.RunState.load(out / ST.WORK_DIR) is None and not (tmp_path / ".out.partial").exists()
