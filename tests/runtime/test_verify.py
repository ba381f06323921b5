"""verify_checkpoint: a good checkpoint passes; each kind of damage is reported, naming the file/tensor."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from .conftest import small_llama, write_ct_checkpoint
from safetensors.torch import load_file, save_file

from hfcompress.quantization.saving import save_checkpoint
from hfcompress.quantization.verify import verify_checkpoint


def rewrite(path, edit, file="model.safetensors"):
    tensors = load_file(path / file)
    edit(tensors)
    save_file(tensors, path / file, metadata={"format": "pt"})


def problems_of(path, **kw):
    report = verify_checkpoint(path, **kw)
    assert not report.ok and report.problems
    assert "FAILED" in report.summary()
    return " | ".join(report.problems)


@pytest.fixture()
def ct(tmp_path):
    return write_ct_checkpoint(small_llama(), tmp_path / "ct", num_bits=4, strategy="group", group_size=32,
                               symmetric=False)


@pytest.fixture()
def sharded(tmp_path):
    return save_checkpoint(small_llama(), tmp_path / "sharded", max_shard_size="60KB")


def test_good_checkpoints_pass(ct, sharded):
    report = verify_checkpoint(ct)
    assert report.ok, report.summary()
    assert report.kind == "compressed-tensors" and report.quantized_modules == 14
    assert report.tensors_checked == report.num_tensors  # every stored tensor was checked against the model
    assert report.values_checked > 14  # all scales + the float tensors
    assert "OK" in report.summary()
    report = verify_checkpoint(sharded)
    assert report.ok and report.kind == "plain" and report.num_files > 2


def test_truncated_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    assert f"{shard.name}: truncated" in problems_of(sharded)


def test_garbage_after_tensors(ct):
    with (ct / "model.safetensors").open("ab") as f:
        f.write(b"\0" * 8)
    # safe_open reports truncation and appended bytes alike ("not fully covered"); the message names both.
    assert "model.safetensors: truncated, or with bytes after the last tensor" in problems_of(ct)


def test_corrupted_header(ct):
    file = ct / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:12] = b"\xff\xfe{["
    file.write_bytes(bytes(data))
    assert "model.safetensors: corrupted safetensors header" in problems_of(ct)


def test_index_problems(sharded):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    # a tensor mapped to the wrong shard, and a shard the index names that is gone
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][name] = shards[1]
    index_path.write_text(json.dumps(index))
    (sharded / shards[-1]).unlink()
    text = problems_of(sharded)
    assert f"maps tensor {name!r} to {shards[1]}" in text
    # the shard that really holds it is reported too (as a stale shard if the index no longer names it)
    assert f"holds tensor {name!r}" in text or f"{shards[0]} is in the folder but" in text
    assert f"lists shard {shards[-1]!r}, which is missing" in text


def test_stale_shard_not_in_index(sharded):
    first = sorted(sharded.glob("model-*.safetensors"))[0]
    (sharded / "model-00099-of-00099.safetensors").write_bytes(first.read_bytes())
    assert "model-00099-of-00099.safetensors is in the folder but" in problems_of(sharded)


def test_missing_and_unexpected_tensors(ct):
    def edit(t):
        t.pop("model.layers.1.mlp.up_proj.weight_scale")
        t.pop("model.norm.weight")
        t["model.layers.0.extra"] = torch.zeros(3)
    rewrite(ct, edit)
    text = problems_of(ct)
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight_scale'" in text
    assert "missing tensor 'model.norm.weight'" in text
    assert "'model.layers.0.extra' in model.safetensors does not belong" in text


def test_wrong_shapes_and_dtypes(ct):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.weight_packed"] = t["model.layers.0.self_attn.q_proj.weight_packed"][:, :4].contiguous()
        t["model.layers.0.self_attn.k_proj.weight_packed"] = t["model.layers.0.self_attn.k_proj.weight_packed"].to(torch.int64)
        t["model.layers.0.self_attn.v_proj.weight_shape"] = torch.tensor([32, 65])
        t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:, :32].contiguous()
    rewrite(ct, edit)
    text = problems_of(ct)
    assert "'model.layers.0.self_attn.q_proj.weight_packed' in model.safetensors has shape [64, 4], expected [64, 8]" in text
    assert "'model.layers.0.self_attn.k_proj.weight_packed' in model.safetensors has dtype I64" in text
    assert "'model.layers.0.self_attn.v_proj.weight_shape' says [32, 65]" in text
    assert "'model.embed_tokens.weight' in model.safetensors has shape [320, 32]" in text


@pytest.mark.parametrize("value,expected", [(float("nan"), "1 non-finite values"), (0.0, "1 values <= 0"),
                                            (-1.0, "1 values <= 0")])
def test_bad_scales(ct, value, expected):
    def edit(t):
        t["model.layers.0.mlp.down_proj.weight_scale"][3, 1] = value
    rewrite(ct, edit)
    assert f"scale tensor 'model.layers.0.mlp.down_proj.weight_scale' in model.safetensors has {expected}" in problems_of(ct)


def test_config_does_not_match_tensors(ct):
    config = json.loads((ct / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 64
    (ct / "config.json").write_text(json.dumps(config))
    text = problems_of(ct)
    assert "weight_scale' in model.safetensors has shape [64, 2], expected [64, 1]" in text
    # ...and config.json that targets a module stored in float
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 32
    config["quantization_config"]["ignore"] = []
    (ct / "config.json").write_text(json.dumps(config))
    assert "missing tensor 'lm_head.weight_packed'" in problems_of(ct)


def test_non_finite_float_weights_only_with_deep(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    file = index["weight_map"]["model.norm.weight"]
    rewrite(sharded, lambda t: t["model.norm.weight"].fill_(float("inf")), file=file)
    assert "'model.norm.weight' in" in problems_of(sharded)
    assert verify_checkpoint(sharded, deep=False).ok


def test_bitsandbytes_checkpoints(tmp_path):
    pytest.importorskip("bitsandbytes")
    from hfcompress.quantization.bnb import quantize_bnb

    model = small_llama(hidden=128, intermediate=256)
    nf4 = save_checkpoint(quantize_bnb(copy.deepcopy(model), SimpleNamespace(method="bnb_nf4", bnb_double_quant=False)),
                          tmp_path / "nf4")
    int8 = save_checkpoint(quantize_bnb(copy.deepcopy(model), SimpleNamespace(method="bnb_int8")), tmp_path / "int8")
    for path in (nf4, int8):
        report = verify_checkpoint(path)
        assert report.ok and report.kind == "bitsandbytes" and report.quantized_modules == 14, report.summary()
    rewrite(nf4, lambda t: t.update({"model.layers.0.mlp.up_proj.weight.absmax":
                                     t["model.layers.0.mlp.up_proj.weight.absmax"][:-1].contiguous()}))
    assert "'model.layers.0.mlp.up_proj.weight.absmax' should hold 512 block scales" in problems_of(nf4)
    rewrite(int8, lambda t: t["model.layers.1.self_attn.o_proj.SCB"].neg_())
    assert "scale tensor 'model.layers.1.self_attn.o_proj.SCB' in model.safetensors has 128 values < 0" in problems_of(int8)


def test_not_a_checkpoint(tmp_path):
    assert "does not exist" in problems_of(tmp_path / "missing")
    assert "has no config.json" in problems_of(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in problems_of(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    assert "has no model.safetensors or model.safetensors.index.json (found pytorch_model.bin" in problems_of(tmp_path)
