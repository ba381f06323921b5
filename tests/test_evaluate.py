import math

import pytest
import torch

import hfcompress
from hfcompress import evaluate as ev_module  # noqa: F401  (the public function)
import importlib

ev = importlib.import_module("hfcompress.models.evaluate")
from hfcompress.core.errors import DataError


def _hand_perplexity(model, blocks):
    """Token-by-token float64 reference: exp(mean over blocks and positions t>=1 of -log p(x_t | x_<t))."""
    total, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            logits = model(input_ids=block[None]).logits[0].double()  # (T, V)
            for t in range(1, block.numel()):
                log_z = math.log(sum(math.exp(v) for v in logits[t - 1].tolist()))
                total += log_z - logits[t - 1, block[t]].item()
                count += 1
    return math.exp(total / count)


def test_perplexity_matches_hand_computation(tiny_llama):
    torch.manual_seed(0)
    blocks = torch.randint(0, tiny_llama.config.vocab_size, (3, 9))
    assert ev.perplexity(tiny_llama, blocks, batch_size=2) == pytest.approx(_hand_perplexity(tiny_llama, blocks),
                                                                            rel=1e-5)


def test_strided_windows_score_every_token_once(tiny_llama):
    stream = torch.arange(20)
    windows, score_from = ev.strided_windows(stream, block_size=8, stride=4)
    assert score_from == 4
    scored = list(windows[0, 1:].tolist()) + [t for w in windows[1:] for t in w[score_from:].tolist()]
    assert scored == list(range(1, 20))
    with pytest.raises(DataError):
        ev.strided_windows(stream, 8, 9)


def test_weight_bytes_counts_shared_tensors_once(tiny_llama):
    expected = sum(p.numel() * 4 for p in tiny_llama.parameters())
    assert ev.weight_bytes(tiny_llama) == expected
    tiny_llama.lm_head.weight = tiny_llama.model.embed_tokens.weight
    assert ev.weight_bytes(tiny_llama) == expected - tiny_llama.lm_head.weight.numel() * 4


def test_evaluate_reports_every_field(tiny_reference_dir):
    result = ev.evaluate(str(tiny_reference_dir), data="stdlib:test", block_size=64, num_blocks=8,
                         new_tokens=8, progress=False)
    d = result.to_dict()
    for key in ("perplexity", "bits_per_byte", "num_parameters", "checkpoint_bytes", "weight_bytes", "prefill_tokens_per_s",
                "decode_tokens_per_s", "peak_rss_bytes"):
        assert d[key] is not None and d[key] > 0, key
    assert result.scored_tokens == 8 * 63
    # bits/byte = log2(perplexity) x tokens per byte, and a byte-level BPE has at most one token per byte
    assert 0 < result.bits_per_byte <= math.log2(result.perplexity)
    assert result.weight_bytes == result.num_parameters * 4
    assert abs(result.checkpoint_bytes - result.weight_bytes) < 0.05 * result.weight_bytes
    assert "perplexity" in result.table()


def test_strided_eval_is_not_worse_than_disjoint(tiny_reference_dir):
    disjoint = ev.evaluate(str(tiny_reference_dir), data="stdlib:validation", block_size=64, num_blocks=None,
                           speed=False, progress=False)
    strided = ev.evaluate(str(tiny_reference_dir), data="stdlib:validation", block_size=64, stride=32,
                          speed=False, progress=False)
    # More context per scored token can only help a trained LM on average (allow a little noise).
    assert strided.perplexity < disjoint.perplexity * 1.01


def test_block_size_larger_than_context_is_an_error(tiny_reference_dir):
    with pytest.raises(DataError, match="context"):
        ev.evaluate(str(tiny_reference_dir), block_size=4096, speed=False, progress=False)


def test_public_names_are_the_functions():
    import hfcompress.quantization.config  # noqa: F401  (imports the subpackage first)
    from hfcompress import evaluate, quantize

    assert callable(quantize) and quantize.__module__ == "hfcompress.quantization.api"
    assert callable(evaluate) and evaluate.__module__ == "hfcompress.models.evaluate"
    import hfcompress.quantization  # the engine's package has its own name: importing it replaces nothing
    assert hfcompress.quantize is quantize and hfcompress.evaluate is evaluate
    assert hfcompress.QuantizationConfig.__name__ == "QuantizationConfig"
