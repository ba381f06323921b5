"""Fixtures of the quantization tests: token blocks for calibration, built from the shared tiny fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def calibration_ids(tiny_tokenizer, calibration_texts) -> torch.Tensor:
    """16 calibration sequences of 64 tokens (LongTensor (16, 64)) from held-out stdlib text."""
    from hfcompress.core.data import pack_blocks

    return pack_blocks(calibration_texts, tiny_tokenizer, 64, num_blocks=16, seed=0)


@pytest.fixture(scope="session")
def eval_ids(tiny_tokenizer) -> torch.Tensor:
    """Held-out test blocks (LongTensor (64, 64)) for logits/perplexity comparisons."""
    from hfcompress.core.data import load_stdlib_corpus, pack_blocks

    return pack_blocks(load_stdlib_corpus()["test"]["text"][:30], tiny_tokenizer, 64, num_blocks=64, seed=1)
