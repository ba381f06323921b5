"""Property-based tests (hypothesis): invariants that must hold for every input, not just the examples we
thought of.

* bit packing: pack -> unpack is the identity for 2/3/4/8-bit codes of any shape, and our packing is
  compressed-tensors' (each side unpacks what the other packed), also through the runtime's unpackers;
* quantize -> dequantize: with min-max scales and nearest rounding every element is within half a step
  (``scale / 2``) of the original, symmetric or with zero points; codes stay in range; stochastic rounding
  stays within one step;
* group-size fallback: the group size used divides the width and is the requested one, else the largest
  power of two below it that divides, else None (per-channel);
* distillation losses: divergences are >= 0 and 0 for identical distributions, the chunked loss equals the
  unchunked one (values and gradients), temperature T scales as T², the closed-form gradients equal
  autograd's, and the per-token normalisation gives the same mean however a step is split;
* the recipe parser: random documents (mappings, lists, strings, numbers, nested) and random YAML text never
  raise anything but hfcompress's own one-line errors.

Reproducible: every test runs with ``REPRODUCIBLE`` settings, derandomized (the same examples on every run and
machine) and without a deadline (timings on shared CI machines vary); example counts are kept small so the
file runs in seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfcompress.core.errors import HFCompressError
from hfcompress.distillation import losses as L
from hfcompress.quantization import kernels as K
from hfcompress.quantization import primitives as P

# Applied to each test (not loaded as the global profile, so other tests keep hypothesis' defaults).
REPRODUCIBLE = settings(derandomize=True, deadline=None, max_examples=40, print_blob=True, database=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

BITS = st.sampled_from([2, 3, 4, 8])


def _codes(bits: int, rows: int, cols: int, seed: int) -> torch.Tensor:
    qmin, qmax = P.quant_range(bits)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(qmin, qmax + 1, (rows, cols), generator=generator, dtype=torch.int8)


# --------------------------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------------------------
@REPRODUCIBLE
@given(bits=BITS, rows=st.integers(1, 6), cols=st.integers(1, 97), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, rows, cols, seed):
    """Weights pack along the input dimension, zero points along the output dimension; both come back."""
    codes = _codes(bits, rows, cols, seed)
    packed = K.pack_weight(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (rows, P.packed_length(cols, bits))
    assert torch.equal(K.unpack_weight(packed, bits, (rows, cols)), codes)
    zero_points = K.pack_zero_point(codes, bits)
    assert zero_points.shape == (P.packed_length(rows, bits), cols)


@REPRODUCIBLE
@given(bits=BITS, rows=st.integers(1, 6), cols=st.integers(1, 64), padded=st.booleans(), seed=st.integers(0, 2**16))
def test_runtime_unpackers_read_our_packing(bits, rows, cols, padded, seed):
    """What the packed runtime reads back (zero points along dim 0, possibly zero-padded to ``out`` rows as
    ct_format.zero_point_rows writes them) is what was packed, including zero points in a single int32 word."""
    codes = _codes(bits, rows, cols, seed)
    zero_points = K.pack_zero_point(codes, bits)  # (ceil(rows*bits/32), cols)
    if padded and zero_points.shape[0] < rows:
        zero_points = torch.cat([zero_points, torch.zeros(rows - zero_points.shape[0], cols, dtype=torch.int32)])
    assert torch.equal(K.unpack_zero_point(zero_points, bits, rows), codes)


# --------------------------------------------------------------------------------------------------------
# Quantize / dequantize
# --------------------------------------------------------------------------------------------------------
@st.composite
def weights(draw):
    """(out, in) float32 weights with group size g dividing in (None = per-channel); some all-zero rows,
    constant rows and outliers."""
    out = draw(st.integers(1, 6))
    groups = draw(st.integers(1, 4))
    g = draw(st.sampled_from([1, 2, 3, 8, 16, 32]))
    group_size = draw(st.sampled_from([g, None]))
    scale = draw(st.sampled_from([1e-4, 1e-2, 1.0, 100.0]))
    seed = draw(st.integers(0, 2**16))
    w = torch.randn(out, groups * g, generator=torch.Generator().manual_seed(seed)) * scale
    kind = draw(st.sampled_from(["random", "zero-row", "constant-row", "outlier", "positive"]))
    if kind == "zero-row":
        w[0] = 0
    elif kind == "constant-row":
        w[0] = w[0, 0]
    elif kind == "outlier":
        w[0, 0] *= 50
    elif kind == "positive":
        w = w.abs()
    return w, group_size


@REPRODUCIBLE
@given(data=weights(), bits=BITS, symmetric=st.booleans())
def test_nearest_rounding_error_is_at_most_half_a_step(data, bits, symmetric):
    weight, group_size = data
    scale, zero_point = P.compute_qparams(weight, bits, group_size, symmetric)
    codes = P.quantize(weight, scale, zero_point, bits, group_size, "nearest")
    qmin, qmax = P.quant_range(bits)
    assert codes.dtype == torch.int8 and int(codes.min()) >= qmin and int(codes.max()) <= qmax
    approx = P.dequantize(codes, scale, zero_point, group_size).double()
    g = weight.shape[1] if group_size is None else group_size
    step = scale.double().repeat_interleave(g, dim=1)  # (out, in): each element's scale
    error = (weight.double() - approx).abs()
    # Half a step, plus float32 rounding of w / scale and of (q - z) * scale (a few ulps of the group's range).
    slack = 4 * torch.finfo(torch.float32).eps * (step * (qmax - qmin) + weight.double().abs())
    assert (error <= step / 2 + slack).all(), float((error - step / 2).max())


@REPRODUCIBLE
@given(data=weights(), bits=BITS, symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_stochastic_rounding_stays_within_one_step_without_clamping(data, bits, symmetric, seed):
    weight, group_size = data
    scale, zero_point = P.compute_qparams(weight, bits, group_size, symmetric, stochastic=True)
    codes = P.quantize(weight, scale, zero_point, bits, group_size, "stochastic",
                       torch.Generator().manual_seed(seed))
    approx = P.dequantize(codes, scale, zero_point, group_size).double()
    g = weight.shape[1] if group_size is None else group_size
    step = scale.double().repeat_interleave(g, dim=1)
    slack = 4 * torch.finfo(torch.float32).eps * (step * 2**bits + weight.double().abs())
    assert ((weight.double() - approx).abs() <= step + slack).all()


@REPRODUCIBLE
@given(data=weights(), bits=BITS, symmetric=st.booleans())
def test_all_zero_groups_are_exact(data, bits, symmetric):
    weight, group_size = data
    weight = torch.zeros_like(weight)
    scale, zero_point = P.compute_qparams(weight, bits, group_size, symmetric)
    assert (scale > 0).all()
    codes = P.quantize(weight, scale, zero_point, bits, group_size)
    assert torch.equal(P.dequantize(codes, scale, zero_point, group_size), weight)


# --------------------------------------------------------------------------------------------------------
# Group-size fallback
# --------------------------------------------------------------------------------------------------------
@REPRODUCIBLE
@given(width=st.integers(1, 20_000), group_size=st.one_of(st.none(), st.integers(1, 2048)))
def test_fallback_group_size(width, group_size):
    used = P.fallback_group_size(width, group_size)
    if group_size is None or width % group_size == 0:
        assert used == group_size
        return
    powers_below = [1 << k for k in range(1, group_size.bit_length()) if (1 << k) < group_size]
    dividing = [p for p in powers_below if width % p == 0]
    if used is None:
        assert not dividing  # per-channel only when no power of two >= 2 below the request divides the width
    else:
        assert width % used == 0 and used & (used - 1) == 0 and 2 <= used < group_size
        assert used == max(dividing)  # the largest such group: the closest to what was asked


# --------------------------------------------------------------------------------------------------------
# Distillation losses
# --------------------------------------------------------------------------------------------------------
LOSSES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


@st.composite
def logits_pair(draw, max_rows: int = 6, max_vocab: int = 40):
    rows, vocab = draw(st.integers(1, max_rows)), draw(st.integers(2, max_vocab))
    spread = draw(st.sampled_from([0.1, 1.0, 5.0, 20.0]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    student = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * spread
    teacher = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * spread
    return student, teacher


@REPRODUCIBLE
@given(pair=logits_pair(), loss=st.sampled_from(LOSSES), temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
       beta=st.floats(0.0, 1.0), alpha=st.floats(0.0, 0.99))
def test_divergences_are_nonnegative_and_zero_for_identical_inputs(pair, loss, temperature, beta, alpha):
    student, teacher = pair
    spec = L.LogitLoss(loss=loss, temperature=temperature, beta=beta, skew_alpha=alpha)
    value = spec.divergence(student, teacher)
    assert value.shape == (student.shape[0],)
    assert (value >= -1e-9).all(), value
    if loss == "tvd":
        assert (value <= temperature**2 * (1 + 1e-9)).all()  # T² · TVD, TVD in [0, 1]
    same = spec.divergence(teacher, teacher.clone())
    assert same.abs().max() <= 1e-9


@REPRODUCIBLE
@given(pair=logits_pair(), loss=st.sampled_from(LOSSES), scale=st.sampled_from([0.5, 2.0, 3.0]))
def test_temperature_scales_by_its_square(pair, loss, scale):
    """Dividing logits by T is what the temperature does, and the T² factor multiplies the divergence:
    D_T(scale·s, scale·t) with T = scale equals T² · D_1(s, t)."""
    student, teacher = pair
    at_one = L.LogitLoss(loss=loss, temperature=1.0).divergence(student, teacher)
    at_t = L.LogitLoss(loss=loss, temperature=scale).divergence(student * scale, teacher * scale)
    torch.testing.assert_close(at_t, scale**2 * at_one, rtol=1e-9, atol=1e-12)


@REPRODUCIBLE
@given(pair=logits_pair(), loss=st.sampled_from(["forward_kl", "reverse_kl"]), temperature=st.sampled_from([1.0, 2.0]),
       kd_weight=st.sampled_from([0.0, 0.5, 1.0]), ce_weight=st.sampled_from([0.0, 0.5, 1.0]),
       seed=st.integers(0, 2**16))
def test_closed_form_gradient_equals_autograd(pair, loss, temperature, kd_weight, ce_weight, seed):
    student, teacher = pair
    targets = torch.randint(0, student.shape[1], (student.shape[0],), generator=torch.Generator().manual_seed(seed))
    spec = L.LogitLoss(loss=loss, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight)
    leaf = student.clone().requires_grad_(True)
    weighted, _, _ = spec.per_position(leaf, teacher, targets)
    (expected,) = torch.autograd.grad(weighted.sum(), leaf)
    value, _, _, grad = spec.per_position_and_grad(student.clone(), teacher, targets)
    torch.testing.assert_close(value, weighted.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)


@REPRODUCIBLE
@given(rows=st.integers(1, 40), hidden=st.integers(1, 12), vocab=st.integers(2, 30), chunk=st.integers(0, 45),
       loss=st.sampled_from(LOSSES), temperature=st.sampled_from([1.0, 2.0]), with_bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_chunked_loss_equals_unchunked(rows, hidden, vocab, chunk, loss, temperature, with_bias, seed):
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    student_hidden, teacher_hidden = rand(rows, hidden).requires_grad_(True), rand(rows, hidden + 1)
    student_w = rand(vocab, hidden).requires_grad_(True)
    student_b = rand(vocab).requires_grad_(True) if with_bias else None
    teacher_head = L.LMHead(weight=rand(vocab, hidden + 1), bias=rand(vocab) if with_bias else None)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    spec = L.LogitLoss(loss=loss, temperature=temperature, kd_weight=1.0, ce_weight=0.5)
    params = [student_hidden, student_w] + ([student_b] if with_bias else [])

    logits = student_hidden @ student_w.T + (student_b if with_bias else 0)
    teacher_logits = teacher_head.logits(teacher_hidden, teacher_head.weight, teacher_head.bias)
    reference = L.logit_loss_from_logits(logits, teacher_logits, targets, spec)
    expected_grads = torch.autograd.grad(reference[0], params)

    chunked = L.chunked_logit_loss(student_hidden, L.LMHead(weight=student_w, bias=student_b), targets, spec,
                                   teacher_hidden=teacher_hidden, teacher_head=teacher_head, chunk_size=chunk)
    grads = torch.autograd.grad(chunked[0], params)
    for got, want in zip(chunked, reference):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-7, atol=1e-9)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


@REPRODUCIBLE
@given(counts=st.lists(st.integers(0, 20), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_normalisation_gives_the_step_mean_whatever_the_split(counts, seed):
    """Micro-batches of any sizes (some empty), each divided by the step's token count, add up to the mean over
    all the step's tokens; without the count each micro-batch's own mean (0 for an empty one, not NaN)."""
    values = torch.rand(sum(counts), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pieces = torch.split(values, counts)
    total = sum(int(c) for c in counts)
    summed = sum(L.normalize(p.sum(), total, len(p)) for p in pieces)
    if total:
        torch.testing.assert_close(summed, values.mean())
    for p in pieces:
        local = L.normalize(p.sum(), None, len(p))
        assert torch.isfinite(local) and math.isclose(float(local), float(p.mean()) if len(p) else 0.0,
                                                      rel_tol=1e-12, abs_tol=1e-15)


# --------------------------------------------------------------------------------------------------------
# The recipe parser
# --------------------------------------------------------------------------------------------------------
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from(["reference:tiny", "model", "rtn", "gptq", "./x", "/",
                                                            "~", "a/b", "stdlib", "4", "{", "[]", "re:.*"]))
_values = st.recursive(_scalars, lambda children: st.one_of(
    st.lists(children, max_size=3), st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), children,
                                                    max_size=3)), max_leaves=8)


_KNOWN = ["bits", "method", "group_size", "symmetric", "ignore", "name", "input", "models", "repo_id", "dry_run",
          "temperature", "loss", "max_steps", "layer_map", "calibration_data", "max_shard_size", "runtime",
          "student_num_layers", "teacher", "data", "bitz", "output_dir", "learning_rate"]
_KINDS = st.sampled_from(["quantize", "distill", "evaluate", "push", "quantise"])
_bodies = st.one_of(_values, st.dictionaries(st.sampled_from(_KNOWN), _values, max_size=4))
_stages = st.one_of(
    _values,
    st.lists(st.one_of(_values, st.dictionaries(_KINDS, _bodies, min_size=1, max_size=2)), max_size=3))
_documents = st.one_of(
    _values,
    st.fixed_dictionaries({}, optional={"name": _values, "model": _values, "output_dir": _values,
                                        "description": _values, "stages": _stages, "stagse": _values}))


@settings(REPRODUCIBLE, max_examples=150)
@given(document=_documents)
def test_recipe_parser_raises_only_our_errors(document):
    from hfcompress.runs.recipe import parse_recipe

    try:
        recipe = parse_recipe(document)
    except HFCompressError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip(), repr(str(exc))
    else:
        assert recipe.stages  # what parses is a usable recipe


@settings(REPRODUCIBLE, max_examples=60)
@given(document=_documents, overrides=st.lists(st.one_of(
    st.text(max_size=15), st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
        ["quantize.bits", "bits", "0.method", "model", "stages", "quantize.name", "a.b.c", "", "distill.loss"]),
        st.sampled_from(["5", "4", "x", "[1", "{a: 1}", "", "null", "'", "- a"]))), max_size=3))
def test_recipe_overrides_raise_only_our_errors(document, overrides):
    from hfcompress.runs.recipe import parse_recipe

    try:
        parse_recipe(document, overrides=overrides)
    except HFCompressError as exc:
        assert "\n" not in str(exc).strip(), repr(str(exc))


@settings(REPRODUCIBLE, max_examples=60)
@given(text=st.one_of(st.text(max_size=60), _documents.map(lambda d: yaml.safe_dump(d, sort_keys=False)),
                      st.sampled_from(["stages: [", "!!python/object/apply:os.system ['true']", "a: &x [*x]",
                                       "\t- quantize", "%YAML 9.9\n---\n", "key: value\n  bad: indent", "@"])))
def test_recipe_files_raise_only_our_errors(text, tmp_path_factory):
    from hfcompress.runs.recipe import load_recipe

    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except HFCompressError as exc:
        assert "\n" not in str(exc).strip(), repr(str(exc))
