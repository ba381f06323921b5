"""GGUF files as an input: the tiny reference teacher written to a GGUF in the test, loaded back through
hfcompress (dequantized by transformers' loader), quantized, saved as a normal checkpoint and reloaded.

Nothing downloads: the GGUF is written here with the ``gguf`` package's ``GGUFWriter``, the way llama.cpp's
``convert_hf_to_gguf.py`` lays out a Llama (q/k rows permuted for its rotary layout, 1-d norms in F32).
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from hfcompress.core.errors import ModelLoadError  # noqa: E402
from hfcompress.models.loading import (  # noqa: E402
    check_gguf_file,
    find_gguf_file,
    gguf_note,
    load_model,
    load_tokenizer,
    resolve_model,
)

SAMPLE = "def add(a, b):\n    return a + b  # the sum\n"


def _permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (pairs of rotary halves interleaved); transformers undoes it on load."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_llama_gguf(model, tokenizer, path, float_type=np.float32, quantize: dict | None = None,
                     architecture: str = "llama"):
    """Write a LlamaForCausalLM and its byte-level BPE tokenizer as a GGUF file.

    ``quantize`` maps GGUF tensor names to a ``GGMLQuantizationType`` to store them block-quantized.
    """
    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {added["id"] for added in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}
    for i in range(config.num_hidden_layers):
        for ours, theirs in per_layer.items():
            names[f"model.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            data = _permute_rotary(data, heads)
        elif name.endswith("k_proj.weight"):
            data = _permute_rotary(data, kv_heads)
        target = names[name]
        qtype = (quantize or {}).get(target)
        if qtype is not None:
            writer.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(target, data.astype(np.float32 if data.ndim == 1 else float_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_reference_dir, tmp_path_factory):
    """The tiny reference teacher as an F32 GGUF file (in a folder of its own)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_reference_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_reference_dir)
    folder = tmp_path_factory.mktemp("gguf")
    return write_llama_gguf(model, tokenizer, folder / "tiny-f32.gguf"), model, tokenizer


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_f32_gguf_loads_as_the_same_model_and_tokenizer(tiny_gguf):
    path, source, source_tokenizer = tiny_gguf
    tokenizer = load_tokenizer(path)
    ids = torch.tensor([source_tokenizer(SAMPLE).input_ids])
    assert tokenizer(SAMPLE).input_ids == ids[0].tolist()
    assert tokenizer.decode(ids[0]) == SAMPLE
    model = load_model(path).eval()
    assert model.dtype == torch.float32
    # F32 storage is exact: same weights (q/k un-permuted), same logits.
    torch.testing.assert_close(_logits(model, ids), _logits(source, ids), rtol=0, atol=1e-5)
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None


def test_gguf_model_saves_as_a_plain_checkpoint(tiny_gguf, tmp_path):
    """transformers keeps GgufHfQuantizer (not serializable) on a plain from_pretrained(gguf_file=...);
    ours does not, and the saved folder reloads to the same tensors."""
    from transformers import AutoModelForCausalLM

    path, _, _ = tiny_gguf
    model = load_model(path)
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "quantization_config" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def test_plain_transformers_refuses_to_save_what_we_save(tiny_gguf, tmp_path):
    """The reason for GgufConfig(dequantize=True): without it the quantizer stays attached."""
    from transformers import AutoModelForCausalLM

    path, _, _ = tiny_gguf
    plain = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    with pytest.raises(ValueError, match="not serializable"):
        plain.save_pretrained(tmp_path / "plain")


def test_quantized_gguf_warns_and_its_card_says_so(tiny_reference_dir, tmp_path, caplog):
    """A file with block-quantized tensors (Q8_0 here) loads dequantized, with a warning; quantizing it with
    the CLI writes a normal compressed checkpoint whose card names the GGUF source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfcompress.cli import main

    source = AutoModelForCausalLM.from_pretrained(tiny_reference_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_reference_dir)
    q8 = {f"blk.{i}.{name}.weight": gguf.GGMLQuantizationType.Q8_0
          for i in range(source.config.num_hidden_layers) for name in ("ffn_up", "ffn_down", "attn_v")}
    path = write_llama_gguf(source, tokenizer, tmp_path / "tiny-q8.gguf", float_type=np.float16, quantize=q8)
    info = check_gguf_file(path)
    assert info.quantized_types == ("Q8_0",) and set(info.tensor_types) == {"F16", "F32", "Q8_0"}
    with caplog.at_level(logging.WARNING, logger="hfcompress.models.loading"):
        model = load_model(path)
    assert any("Q8_0" in r.getMessage() and "dequantized" in r.getMessage() for r in caplog.records)
    ids = torch.tensor([tokenizer(SAMPLE).input_ids])
    # F16 + Q8_0 storage: close to the source (a few 1e-3 relative error on the weights).
    diff = (_logits(model, ids) - _logits(source, ids)).abs().max().item()
    assert 0 < diff < 0.1

    out = tmp_path / "int4"
    assert main(["quantize", str(path), str(out), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "-q"]) == 0
    card = (out / "README.md").read_text()
    assert "GGUF file `tiny-q8.gguf`" in card and "Q8_0" in card
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    saved_config = json.loads((out / "config.json").read_text())
    assert saved_config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert load_tokenizer(out)(SAMPLE).input_ids == ids[0].tolist()
    # int4 g32 RTN of the dequantized model: the same next-token choice on most positions.
    agree = (_logits(reloaded, ids).argmax(-1) == _logits(model, ids).argmax(-1)).float().mean().item()
    print("int4 top-1 agreement", agree)
    assert agree > 0.7


def test_folder_references(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    assert resolve_model(path.parent) == str(path.resolve())  # the only .gguf in its folder
    assert resolve_model(tmp_path.parent / path.parent.name, gguf_file=path.name) == str(path.resolve())
    assert find_gguf_file(tmp_path) is None  # an empty folder names no GGUF
    (tmp_path / "a.gguf").write_bytes(path.read_bytes())
    (tmp_path / "b.gguf").write_bytes(path.read_bytes())
    with pytest.raises(ModelLoadError, match=r"holds 2 \.gguf files \(a\.gguf, b\.gguf\)"):
        resolve_model(tmp_path)
    assert resolve_model(tmp_path, gguf_file="b.gguf") == str((tmp_path / "b.gguf").resolve())
    assert "read from the GGUF file `tiny-f32.gguf`" in gguf_note(str(path))  # F32: no quantization error
    assert gguf_note("reference:tiny") is None


@pytest.mark.parametrize("keep", [10, 2000, -10])
def test_truncated_gguf_is_refused_in_one_line(tiny_gguf, tmp_path, keep):
    from hfcompress.cli import main

    path, _, _ = tiny_gguf
    data = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:keep])
    with pytest.raises(ModelLoadError, match="truncated") as info:
        load_model(bad)
    assert "\n" not in str(info.value)
    assert main(["quantize", str(bad), str(tmp_path / "out"), "--method", "rtn", "-q"]) == 2
    assert not (tmp_path / "out").exists()  # nothing written


def test_unsupported_architecture_is_refused(tiny_reference_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_reference_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_reference_dir)
    path = write_llama_gguf(model, tokenizer, tmp_path / "odd.gguf", architecture="notallama")
    with pytest.raises(ModelLoadError, match="architecture 'notallama' is not supported.*llama"):
        load_model(path)


def test_missing_gguf_package_is_a_clear_error(tiny_gguf, monkeypatch):
    path, _, _ = tiny_gguf
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(ModelLoadError, match="needs the `gguf` package: pip install gguf"):
        load_model(path)


def test_gguf_teacher_for_distillation(tiny_gguf, tmp_path):
    """DistillationTrainer(teacher_model=<.gguf path>) loads the file as the teacher."""
    from hfcompress import DistillationConfig, DistillationTrainer, make_student

    path, source, tokenizer = tiny_gguf
    student = make_student(str(path), num_layers=1)
    ids = tokenizer([SAMPLE * 4], return_tensors="pt").input_ids[:, :32]
    dataset = [{"input_ids": ids[0], "labels": ids[0]} for _ in range(4)]
    args = DistillationConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                              report_to=[], save_strategy="no", logging_steps=1, use_cpu=True)
    trainer = DistillationTrainer(model=student, teacher_model=str(path), args=args, train_dataset=dataset,
                                  processing_class=tokenizer)
    torch.testing.assert_close(_logits(trainer.teacher_model, ids), _logits(source, ids), rtol=0, atol=1e-5)
    trainer.train()
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_smollm2_recipe_runs_on_a_gguf_model(tiny_gguf, tmp_path):
    """The shipped SmolLM2 recipe at its smallest settings, with the tiny GGUF as its model: distil from the
    GGUF teacher, GPTQ the student, evaluate the GGUF on pydoc; every stage's output is a normal checkpoint."""
    from pathlib import Path

    from hfcompress.cli import main

    path, _, _ = tiny_gguf
    recipe = Path(__file__).parent.parent / "recipes" / "smollm2-distill-quantize.yaml"
    smallest = [f"model={path}", "distill.student_num_layers=1", "distill.max_steps=2", "distill.block_size=64",
                "distill.num_train_blocks=16", "distill.per_device_train_batch_size=4", "quantize.num_samples=4",
                "quantize.seq_len=64", "quantize.group_size=32", "evaluate.block_size=64",
                "evaluate.num_blocks=4", "evaluate.speed=false", "evaluate.models=[model]"]
    argv = ["run", str(recipe), "--output", str(tmp_path / "run"), "-q"]
    for item in smallest:
        argv += ["--set", item]
    assert main(argv) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    # The GGUF itself, evaluated by `hfcompress eval` in a subprocess (the other two are plain checkpoints).
    assert [m["label"] for m in report["models"]] == ["tiny-f32.gguf"]
    assert report["models"][0]["perplexity"] > 1
    # The student's card names where its teacher's weights came from; the quantized student's card names the
    # student as its base.
    assert "GGUF file `tiny-f32.gguf`" in (tmp_path / "run" / "00-distill" / "README.md").read_text()
    config = json.loads((tmp_path / "run" / "01-quantize" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
