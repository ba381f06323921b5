"""Shared fixtures: tiny models built from configs and a tiny reference teacher trained by our own code.

Nothing here downloads anything. The tiny reference (tokenizer + 2-layer Llama trained on the stdlib corpus
for ~10 s) is cached in ``tests/.cache`` so repeated local runs reuse it; CI trains it once per run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CACHE = Path(__file__).parent / ".cache"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a GPU: skipped, saying so, where PyTorch sees none."""
    if torch.cuda.is_available():
        return
    reason = (f"needs a CUDA GPU (torch {torch.__version__}: "
              f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'})")
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hfcompress_home() -> Path:
    home = Path(os.environ.get("HFCOMPRESS_TEST_HOME", CACHE / "home"))
    home.mkdir(parents=True, exist_ok=True)
    return home


@pytest.fixture(scope="session")
def tiny_reference_dir(hfcompress_home) -> Path:
    """Folder of the trained ``tiny`` reference teacher (config, safetensors, tokenizer)."""
    from hfcompress.models import reference

    old = os.environ.get("HFCOMPRESS_HOME")
    os.environ["HFCOMPRESS_HOME"] = str(hfcompress_home)
    try:
        return reference.reference_model("tiny", progress=False)
    finally:
        if old is None:
            os.environ.pop("HFCOMPRESS_HOME", None)
        else:
            os.environ["HFCOMPRESS_HOME"] = old


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_reference_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_reference_dir)


@pytest.fixture()
def tiny_teacher(tiny_reference_dir):
    """A fresh copy of the trained tiny teacher (tests may modify it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_reference_dir).eval()


@pytest.fixture(scope="session")
def calibration_texts():
    """A few held-out stdlib files as calibration/eval text."""
    from hfcompress.core.data import load_stdlib_corpus

    return load_stdlib_corpus()["validation"]["text"][:8]


def _seeded(seed: int = 0):
    torch.manual_seed(seed)


@pytest.fixture()
def tiny_llama(tiny_tokenizer):
    """A random Llama (hidden 64, MLP 192, 2 layers) sharing the tiny tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _seeded()
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=192,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture()
def tiny_gpt2(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    _seeded()
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture()
def tiny_bert(tiny_tokenizer):
    from transformers import BertConfig, BertModel

    _seeded()
    config = BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)
    return BertModel(config).eval()
