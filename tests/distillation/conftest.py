"""Fixtures of the distillation tests: token blocks from held-out stdlib text, and a text file for scripts."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def distill_blocks(tiny_tokenizer, calibration_texts):
    """(N, 32) token blocks of held-out stdlib text, tokenized with the tiny reference tokenizer."""
    from hfcompress.core.data import pack_blocks

    return pack_blocks(calibration_texts, tiny_tokenizer, block_size=32)


@pytest.fixture(scope="session")
def distill_text_file(tmp_path_factory, calibration_texts):
    """A small text file (a few stdlib files) as a `load_texts` source for script runs."""
    path = tmp_path_factory.mktemp("distill-data") / "train.txt"
    path.write_text("\n".join(calibration_texts[:6]))
    return path
