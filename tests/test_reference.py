import json
import os
import time

from hfcompress.models import reference


def test_tiny_reference_beats_unigram_and_loads(tiny_reference_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metrics = json.loads((tiny_reference_dir / "reference_metrics.json").read_text())
    assert metrics["validation_perplexity"] < 0.6 * metrics["unigram_validation_perplexity"]
    assert any(p.suffix == ".safetensors" for p in tiny_reference_dir.iterdir())
    model = AutoModelForCausalLM.from_pretrained(tiny_reference_dir)
    tok = AutoTokenizer.from_pretrained(tiny_reference_dir)
    assert model.config.model_type == "llama" and len(tok) == model.config.vocab_size


def test_second_call_reuses_the_cache(tiny_reference_dir, monkeypatch):
    monkeypatch.setenv("HFCOMPRESS_HOME", str(tiny_reference_dir.parent.parent))
    stamp = os.stat(tiny_reference_dir / "reference_metrics.json").st_mtime_ns
    start = time.perf_counter()
    assert reference.reference_model("tiny", progress=False) == tiny_reference_dir
    assert time.perf_counter() - start < 5
    assert os.stat(tiny_reference_dir / "reference_metrics.json").st_mtime_ns == stamp


def test_tokenizer_training_is_deterministic(calibration_texts):
    a = reference.train_tokenizer(calibration_texts, 400)
    b = reference.train_tokenizer(calibration_texts, 400)
    assert a.get_vocab() == b.get_vocab()
    text = calibration_texts[0][:500]
    assert a.decode(a(text)["input_ids"]) == text


def test_unigram_baseline_math():
    import math

    import torch

    train = torch.tensor([[0, 0, 1, 1]])
    evalb = torch.tensor([[0, 0, 1]])
    # add-one counts: token0 3, token1 3, token2 1 -> p = 3/7, 3/7, 1/7; scored tokens: 0, 1
    assert reference.unigram_perplexity(train, evalb, 3) == math.exp(-math.log(3 / 7))
