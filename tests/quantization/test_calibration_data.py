"""Calibration data as users pass it: a list of short texts is a list of samples, used whole (concatenated
and cut into sequences), with a warning when it holds fewer tokens than num_samples x seq_len; refused only
below MIN_CALIBRATION_TOKENS. RTN with the min-max observer never fails on calibration data."""

from __future__ import annotations

import warnings

import pytest
import torch

from hfcompress.core.data import token_stream
from hfcompress.core.errors import DataError
from hfcompress.quantization.api import quantize
from hfcompress.quantization.calibrate import MIN_CALIBRATION_TOKENS, calibration_blocks
from hfcompress.quantization.config import QuantizationConfig

SENTENCES = [f"def add_{i}(x, y):\n    return x + y * {i}\n" for i in range(128)]  # 128 short samples


def test_short_texts_are_used_whole(tiny_tokenizer):
    stream = token_stream(SENTENCES, tiny_tokenizer)
    assert MIN_CALIBRATION_TOKENS <= stream.numel() < 128 * 256
    with pytest.warns(UserWarning, match=rf"holds {stream.numel()} tokens, fewer than the 128 x 256 = 32768"):
        blocks = calibration_blocks(SENTENCES, tiny_tokenizer, num_samples=128, seq_len=256)
    count, length = blocks.shape
    assert count == -(-stream.numel() // 256) and length <= 256
    assert stream.numel() - blocks.numel() < count  # every token but a tail shorter than one per sequence
    # The texts' tokens (in a seeded order of the texts, EOS between them): counts match but for the tail.
    used, available = (torch.bincount(t.reshape(-1), minlength=512) for t in (blocks, stream))
    assert (used <= available).all() and (available - used).sum() == stream.numel() - blocks.numel()


def test_fewer_tokens_than_one_sequence_make_one_shorter_sequence(tiny_tokenizer):
    texts = SENTENCES[:20]
    tokens = token_stream(texts, tiny_tokenizer).numel()
    assert MIN_CALIBRATION_TOKENS <= tokens < 512
    with pytest.warns(UserWarning, match="using 1 sequence"):
        blocks = calibration_blocks(texts, tiny_tokenizer, num_samples=16, seq_len=512)
    assert blocks.shape == (1, tokens)


def test_enough_text_gives_num_samples_full_sequences(tiny_tokenizer, calibration_texts):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blocks = calibration_blocks(calibration_texts, tiny_tokenizer, num_samples=6, seq_len=64, seed=1)
    assert blocks.shape == (6, 64)


def test_fewer_token_rows_than_num_samples_are_used(tiny_llama):
    ids = torch.randint(0, 500, (3, 64), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="using all 3 sequences of 64 tokens"):
        blocks = calibration_blocks(ids, None, num_samples=128, seq_len=64)
    assert torch.equal(blocks, ids)


def test_below_the_minimum_is_refused(tiny_tokenizer):
    with pytest.raises(DataError, match=f"at least {MIN_CALIBRATION_TOKENS} are needed"):
        calibration_blocks(["x = 1", "y = 2"], tiny_tokenizer, num_samples=128, seq_len=256)
    with pytest.raises(DataError, match=f"only 60 tokens .2 sequences of 30 tokens.; at least"):
        calibration_blocks(torch.zeros(2, 30, dtype=torch.long), None, num_samples=4, seq_len=30)


def test_gptq_on_128_sentences(tiny_llama, tiny_tokenizer):
    """What users pass (llm-compressor and GPTQModel treat each row as a sample): GPTQ calibrates on all of
    it instead of refusing."""
    config = QuantizationConfig(method="gptq", bits=4, group_size=32, num_samples=128, seq_len=128)
    with pytest.warns(UserWarning, match="fewer than the 128 x 128"):
        quantize(tiny_llama, config, calibration_data=SENTENCES, tokenizer=tiny_tokenizer, progress=False)
    report = tiny_llama.hfcompress_report
    assert report.calibration_samples == -(-token_stream(SENTENCES, tiny_tokenizer).numel() // 128)
    assert all(layer.metric == "output" for layer in report.layers if "layers." in layer.name)


def test_rtn_minmax_never_fails_on_calibration_data(tiny_llama, tiny_tokenizer):
    """The issue's case: too little data for num_samples=128 used to raise even for method='rtn'. Unusable
    data (below the minimum) is ignored with a warning: min-max codes do not depend on it."""
    import copy

    config = QuantizationConfig(method="rtn", bits=4, group_size=32)
    plain = quantize(copy.deepcopy(tiny_llama), config, progress=False)
    with pytest.warns(UserWarning, match="not using the calibration data"):
        quantize(tiny_llama, config, calibration_data=["x = 1"], tokenizer=tiny_tokenizer, progress=False)
    state, expected = tiny_llama.state_dict(), plain.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)  # same codes as without data
