"""load_compressed(..., compile_decode=True): static KV cache + compiled decode step behind generate().

Most tests trace the decode step with Dynamo (fullgraph) and run the captured FX graph as it is (a recording
backend instead of Inductor), which checks everything compile changes about the program (one graph, no break;
our kernels and fused projections in it; the static cache; the grouped-KV attention) in seconds. One test
(marked slow, ~1 min on 2 busy cores) compiles with Inductor itself.

Tolerance: every variant runs in bfloat16 and multiplies by the same integer codes, so each differs from a
float64 run of the dequantized weights by bfloat16 rounding of activations only; we allow 3x the error of
transformers' own bfloat16 model of those weights against that float64 reference (as test_runtime.py does).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from .conftest import load_dequantized_reference, small_llama, write_ct_checkpoint
from hfcompress.core import native
from hfcompress.quantization import decode
from hfcompress.quantization.decode import compiled_decode_status, decode_sdpa_attention
from hfcompress.quantization.runtime import Int8PackedLinear, Int8RowEmbedding, load_compressed

PROMPT = torch.randint(3, 320, (1, 7), generator=torch.Generator().manual_seed(1))
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def int4_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("decode") / "w4"
    return write_ct_checkpoint(small_llama(layers=2), path, num_bits=4, strategy="group", group_size=32)


class RecordingBackend:
    """A torch.compile backend that keeps each captured graph and runs it unchanged."""

    def __init__(self):
        self.graphs = []

    def __deepcopy__(self, memo):  # transformers deep-copies the CompileConfig (backend included) before compiling
        return self

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def greedy(model, prompt=PROMPT, new_tokens=NEW_TOKENS):
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, dim=1).float()  # (1, T), (1, new, V)


def teacher_forced_logits(model, sequence, new_tokens=NEW_TOKENS):
    """The logits a model gives at each generated position of ``sequence`` (one forward)."""
    with torch.no_grad():
        logits = model(sequence).logits.double()
    return logits[:, -new_tokens - 1:-1]  # (1, new, V)


def grouped_attention_case(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, 1, 16, generator=g, dtype=torch.float64)
    key, value = (torch.randn(2, 2, 9, 16, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., 5:] = False  # a static cache's unused tail
    expected = F.scaled_dot_product_attention(query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1),
                                              attn_mask=mask, scale=0.25).transpose(1, 2)
    return query.to(dtype), key.to(dtype), value.to(dtype), mask, expected


class Attention(torch.nn.Module):
    num_key_value_groups = 3


@pytest.mark.parametrize("path", ["kernel", "sdpa", "compiled-form"])
def test_decode_attention_matches_repeated_kv(path, monkeypatch):
    """One query token over grouped K/V heads in place = transformers' repeat_kv + SDPA (float64, exact up to
    summation order), through our kernel, through SDPA (no kernels, eager) and in the written-out form the
    compiled step traces when the kernels are unavailable."""
    if path == "kernel" and not native.kernels_available():
        pytest.skip("hfcompress's native kernels are not built here")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: path == "compiled-form")
    if path != "kernel":
        monkeypatch.setattr(native, "kernels_available", lambda: False)
    query, key, value, mask, expected = grouped_attention_case()
    out, _ = decode_sdpa_attention(Attention(), query, key, value, mask, scaling=0.25)
    assert out.shape == (2, 1, 6, 16)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.skipif(not native.kernels_available(), reason="hfcompress's native kernels are not built here")
@pytest.mark.parametrize("isa", sorted({0, native.kernel_isa()}))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_kernel_isa_paths_dtypes_and_masks(isa, dtype):
    """Every code path (portable, AVX2) and dtype, with a bool mask, the equivalent additive float mask and no
    mask: within the rounding of the inputs to ``dtype`` (float32 sums), against float64 SDPA of those inputs."""
    query, key, value, mask, _ = grouped_attention_case(dtype)
    q64, k64, v64 = (t.double() for t in (query, key, value))  # the rounded inputs, exactly
    additive = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    # scale 4: scores spread over ~+-40, so the softmax's exp (a polynomial on the AVX2 path) sees a wide range
    for m, scale in ((mask, 0.25), (additive, 0.25), (None, 0.25), (mask, 4.0)):
        expected = F.scaled_dot_product_attention(
            q64, k64.repeat_interleave(3, 1), v64.repeat_interleave(3, 1),
            attn_mask=None if m is None else m if m.dtype == torch.bool else m.double(), scale=scale)[:, :, 0]
        out = native.decode_attention(query[:, :, 0], key, value, None if m is None else m.reshape(2, 9), scale, isa)
        assert out.dtype == dtype and out.shape == (2, 6, 16)
        # float32 sums of 16 + 9 terms: ~1e-6 relative; bfloat16 output rounding: 2^-9 relative
        tol = 4e-3 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


@pytest.mark.skipif(not native.kernels_available(), reason="hfcompress's native kernels are not built here")
def test_decode_attention_kernel_edge_cases():
    query, key, value, mask, _ = grouped_attention_case(torch.float32)
    none = torch.zeros(2, 9, dtype=torch.bool)
    none[1] = True
    out = native.decode_attention(query[:, :, 0], key, value, none, 0.25)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()  # nothing to attend: NaN, like softmax
    with pytest.raises(RuntimeError, match="shapes do not match"):
        native.decode_attention(query[:, :5, 0], key, value, None, 0.25)  # 5 query heads over 2 K/V heads
    with pytest.raises(RuntimeError, match="mask must be"):
        native.decode_attention(query[:, :, 0], key, value, mask.reshape(2, 9)[:, :4], 0.25)


def test_compiled_decode_one_graph_same_tokens_and_logits(int4_path, monkeypatch, caplog):
    backend = RecordingBackend()
    monkeypatch.setattr(decode, "inductor_backend", lambda: backend)
    torch._dynamo.reset()
    eager = load_compressed(int4_path, progress=False)
    compiled = load_compressed(int4_path, progress=False, compile_decode=True)
    assert compiled.generation_config.cache_implementation == "static"
    # Dynamo skips the guards on the model's modules (their evaluation cost as much per step as the LM head)
    assert compiled.generation_config.compile_config.options["guard_filter_fn"] is decode.skip_module_guards
    assert compiled_decode_status(compiled) == "not compiled yet" and compiled_decode_status(eager) == "off"
    with caplog.at_level(logging.WARNING):
        tokens, logits = greedy(compiled)
        again, _ = greedy(compiled)  # the same shapes: no second compile
    assert "compile" not in caplog.text, caplog.text
    assert compiled_decode_status(compiled) == "compiled"
    # fullgraph: one graph for the whole decode step, calling our kernel once per fused group (q/k/v, o, gate/up,
    # down) of each layer: the fused projections traced without a break and without duplicated calls.
    assert len(backend.graphs) == 1
    kernel_calls = [n for n in backend.graphs[0].graph.nodes if n.target is torch.ops.hfcompress.int4_gemv.default]
    assert len(kernel_calls) == 4 * compiled.config.num_hidden_layers

    eager_tokens, eager_logits = greedy(eager)
    assert torch.equal(tokens, eager_tokens) and torch.equal(tokens, again)
    reference = teacher_forced_logits(load_dequantized_reference(int4_path, torch.float64), tokens)
    bf16_error = (teacher_forced_logits(load_dequantized_reference(int4_path, torch.bfloat16), tokens)
                  - reference).abs().max()
    assert (logits - reference).abs().max() <= 3 * bf16_error
    assert (eager_logits - reference).abs().max() <= 3 * bf16_error
    assert (logits - eager_logits).abs().max() <= 2 * bf16_error


def test_compile_failure_falls_back_with_one_warning(int4_path, monkeypatch, caplog):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(decode, "inductor_backend", lambda: broken)
    torch._dynamo.reset()
    model = load_compressed(int4_path, progress=False, compile_decode=True)
    with caplog.at_level(logging.WARNING, logger="hfcompress.quantization.decode"):
        tokens, _ = greedy(model)
        again, _ = greedy(model)
    warnings = [r for r in caplog.records if "compile_decode" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
    assert compiled_decode_status(model).startswith("eager (compile failed")
    eager_tokens, _ = greedy(load_compressed(int4_path, progress=False))
    assert torch.equal(tokens, eager_tokens) and torch.equal(again, eager_tokens)


def test_quantize_embeddings_quantizes_a_tied_head_once(tmp_path):
    float_model = small_llama(tie=True)
    table = float_model.model.embed_tokens.weight.detach().clone()
    write_ct_checkpoint(float_model, tmp_path, num_bits=8, strategy="channel")
    plain = load_compressed(tmp_path, dtype="float32", progress=False)
    ours = load_compressed(tmp_path, dtype="float32", progress=False, quantize_embeddings=True)
    embedding, head = ours.model.embed_tokens, ours.lm_head
    assert isinstance(embedding, Int8RowEmbedding) and isinstance(head, Int8PackedLinear)
    # One int8 table serves both: the head holds the very same codes and scales (no second copy).
    assert head.weight_int8.data_ptr() == embedding.weight_int8.data_ptr()
    assert head.weight_scale.data_ptr() == embedding.weight_scale.data_ptr()
    torch.testing.assert_close(head.dequantized_weight(), embedding.dequantized_weight(), rtol=0, atol=0)
    # Each logit moves by at most sum_k |x_k| * (half an int8 step of its row) from the float table's.
    hidden = torch.randn(3, table.shape[1], generator=torch.Generator().manual_seed(0))
    bound = hidden.abs().sum(1, keepdim=True) * (table.abs().amax(1) / 254)[None, :]
    with torch.no_grad():
        assert ((head(hidden) - hidden @ table.T).abs() <= bound * (1 + 1e-5) + 1e-6).all()
        assert ((ours(PROMPT).logits - plain(PROMPT).logits).abs().max() < 0.05 * plain(PROMPT).logits.abs().max())


@pytest.mark.slow
def test_inductor_compiled_decode_matches_eager(int4_path, caplog):
    """The real thing: Inductor compiles the decode step (C++), our kernels called from its wrapper code."""
    torch._dynamo.reset()
    compiled = load_compressed(int4_path, progress=False, compile_decode=True, quantize_embeddings=True)
    eager = load_compressed(int4_path, progress=False, quantize_embeddings=True)
    with caplog.at_level(logging.WARNING, logger="hfcompress.quantization.decode"):
        tokens, logits = greedy(compiled)
    assert compiled_decode_status(compiled) == "compiled", caplog.text
    eager_tokens, eager_logits = greedy(eager)
    assert torch.equal(tokens, eager_tokens)
    reference = teacher_forced_logits(load_dequantized_reference(int4_path, torch.float64), tokens)
    bf16_error = (teacher_forced_logits(load_dequantized_reference(int4_path, torch.bfloat16), tokens)
                  - reference).abs().max()
    # The int8 input table (quantize_embeddings) adds its own rounding to both runs alike.
    assert (logits - eager_logits).abs().max() <= 2 * bf16_error


def test_module_guards_skipped_and_the_rest_kept(int4_path, monkeypatch):
    """The guard filter drops the guards whose source is a module of the model and keeps the others (the
    inputs, the static cache): the decode step then still recompiles for a longer cache but not per module."""
    seen, original = [], decode.skip_module_guards

    def recording_filter(entries):
        keep = original(entries)
        seen.extend(zip(entries, keep))
        return keep

    backend = RecordingBackend()
    monkeypatch.setattr(decode, "inductor_backend", lambda: backend)
    monkeypatch.setattr(decode, "skip_module_guards", recording_filter)
    torch._dynamo.reset()
    model = load_compressed(int4_path, progress=False, compile_decode=True)
    greedy(model)
    dropped = [e for e, keep in seen if not keep]
    kept = [e for e, keep in seen if keep]
    assert dropped and kept
    assert all(e.orig_guard.source.is_unspecialized_nn_module() for e in dropped)
    assert not any(e.orig_guard.source.is_unspecialized_nn_module() for e in kept)
    # a longer generation than the static cache holds recompiles (a kept guard on the cache's shape fired)
    greedy(model, new_tokens=NEW_TOKENS + 40)
    assert len(backend.graphs) >= 2


def test_two_models_of_one_class_keep_their_own_compiled_step(int4_path, tmp_path, monkeypatch):
    """Module guards are skipped (see above), so what keeps an int8 model from running an int4 model's graph
    (the same class, the same forward code) is each model's own cache of compiled entries."""
    backend = RecordingBackend()
    monkeypatch.setattr(decode, "inductor_backend", lambda: backend)
    torch._dynamo.reset()
    int8_path = write_ct_checkpoint(small_llama(layers=2), tmp_path / "w8", num_bits=8, strategy="channel")
    for path in (int4_path, int8_path, int4_path):
        compiled = load_compressed(path, progress=False, compile_decode=True)
        tokens, _ = greedy(compiled)
        assert compiled_decode_status(compiled) == "compiled"
        assert torch.equal(tokens, greedy(load_compressed(path, progress=False))[0])
    assert len(backend.graphs) == 3  # one per model: none reused another model's entries
