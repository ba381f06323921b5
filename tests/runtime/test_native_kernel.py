"""hfcompress's own int8 CPU kernel (native.py, csrc/int8_gemv.cpp): every code path against float64, and
the fallback to PyTorch's kernel when it is switched off or cannot be built.

Error bound (float paths: portable, AVX-512 without VNNI): the kernel converts x to float32 (exact for
float32/bfloat16 inputs), multiplies by exact int8 codes and sums K products in float32 in some order, then
multiplies by the float32 scale. Each
partial sum is rounded with relative error <= 2**-24, so |y - y_64| <= (K + 1) 2**-24 sum_k |x_k q_nk| s_n
(the standard gamma_K bound); a bfloat16 output adds <= 2**-8 |y_n|. A wrong row, column tail or scale
gives errors of order sum |x q| s itself. The fixed-point paths (AVX-512 VNNI, AVX2) round each x_k to a grid
of 2^-22 (VNNI) or 2^-13 (AVX2) times the row's max|x|, then sum exactly. Prefill rows (M >= 8) take the
integer GEMM (int16 activations per block of 128: conftest.integer_prefill_bound) unless HFCOMPRESS_PREFILL=float.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from hfcompress.core import native
from hfcompress.quantization import kernels

from .conftest import integer_prefill_bound, integer_prefill_runs

pytestmark = pytest.mark.skipif(not native.kernels_available(), reason="native kernels could not be built here")

ISA_NAMES = {0: "portable", 1: "avx2", 2: "avx512", 3: "avx512-vnni"}


def isa_or_skip(isa):
    probe = torch.zeros(1, 16), torch.zeros(1, 16, dtype=torch.int8), torch.ones(1)
    try:
        native.int8_gemv(*probe, isa=isa)
    except RuntimeError as error:
        assert "requested but this CPU supports" in str(error)
        pytest.skip(f"this CPU has no {ISA_NAMES[isa]} path")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, "9-float"])
@pytest.mark.parametrize("isa", [0, 1, 2, 3], ids=ISA_NAMES.get)
def test_int8_gemv_matches_float64(isa, m, dtype, monkeypatch):
    """Decode rows on every path, and prefill rows (M = 9): the integer GEMM, or float32 tiles with
    HFCOMPRESS_PREFILL=float ("9-float")."""
    isa_or_skip(isa)
    if m == "9-float":
        monkeypatch.setenv("HFCOMPRESS_PREFILL", "float")
        m = 9
    else:
        monkeypatch.delenv("HFCOMPRESS_PREFILL", raising=False)
    g = torch.Generator().manual_seed(m)
    # row blocks and 16-row panels with tails, K tails of every path
    for n, k in [(37, 16), (9, 72), (64, 257), (5, 3), (17, 300)]:
        x = torch.randn(m, k, generator=g).to(dtype)
        q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, generator=g) * 0.02 + 1e-3
        y = native.int8_gemv(x, q, scale, isa=isa)
        assert y.dtype == dtype and y.shape == (m, n)
        products = x.double() @ q.double().t()
        y64 = products * scale.double()
        bound = (k + 1) * 2.0 ** -24 * ((x.double().abs() @ q.double().abs().t()) * scale.double())
        if isa in (1, 3):  # fixed point: each x_k moves by <= 2^-22 (VNNI) / 2^-13 (AVX2) max|x|, exact sums
            amax = x.double().abs().amax(dim=1, keepdim=True)
            step = 2.0 ** -22 if isa == 3 else 2.0 ** -13
            bound = step * amax * (q.double().abs().sum(1) * scale.double())[None, :] + 2.0 ** -23 * y64.abs()
        if dtype == torch.bfloat16:
            bound = bound + 2.0 ** -8 * y64.abs()
        if m >= 8 and integer_prefill_runs(isa, dtype):  # prefill: the integer GEMM (int16 activations)
            w_abs = q.double().abs() * scale.double()[:, None]
            bound = integer_prefill_bound(x, w_abs, 128) + (2.0 ** -8 * y64.abs() if dtype == torch.bfloat16 else 0)
        elif m >= 8:  # prefill: float32 tiles of q * s (one more rounding), or bfloat16 tiles for bfloat16 x on
            # CPUs with native bfloat16 GEMM (each weight rounded to bfloat16: 2^-8 relative)
            magnitude = (x.double().abs() @ q.double().abs().t()) * scale.double()
            bound = (k + 2) * 2.0 ** -24 * magnitude + (2.0 ** -8 * magnitude if dtype == torch.bfloat16 else 0)
            bound = bound + (2.0 ** -8 * y64.abs() if dtype == torch.bfloat16 else 0)
        assert ((y.double() - y64).abs() <= bound + 1e-30).all(), (isa, m, n, k)


def _fixed_point_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The VNNI path's exact arithmetic in float64: x_k -> X_k = round-half-even(x_k 2^-e) with
    2^(e+22) > max|x| >= 2^(e+21), integer dot products, then dot * 2^e * scale rounded once to float32."""
    out = []
    for row in x.double():
        amax = row.abs().max().item()
        if amax == 0:
            out.append(torch.zeros(q.shape[0], dtype=torch.float64))
            continue
        e = math.frexp(amax)[1] - 22
        X = torch.round(row * 2.0 ** -e)  # torch.round rounds half to even, like nearbyint
        dot = q.double() @ X  # exact: integers below 2^53
        out.append(dot * 2.0 ** e * scale.double())
    return torch.stack(out).float()


def test_int8_gemv_vnni_is_exactly_its_fixed_point_arithmetic():
    """Bitwise equal to the float64 emulation for every K tail (the digits are built 16 lanes at a time),
    for magnitudes across the float range, and for values exactly halfway between two grid points."""
    isa_or_skip(3)
    g = torch.Generator().manual_seed(11)
    for k in list(range(1, 70)) + [127, 128, 129, 1000]:
        q = torch.randint(-128, 128, (6, k), generator=g, dtype=torch.int8)
        scale = torch.rand(6, generator=g) + 0.25
        x = torch.randn(3, k, generator=g) * torch.tensor([[1.0], [3e-20], [7e15]])
        assert torch.equal(native.int8_gemv(x, q, scale, isa=3), _fixed_point_reference(x, q, scale)), k
    # Halfway cases: x_k = (n + 1/2) 2^e must round to the even neighbour, and the row's maximum sets e.
    k = 40
    halves = (torch.randint(-1000, 1000, (1, k), generator=g).double() + 0.5)
    halves[0, 0] = 2.0 ** 21 + 0.5  # max|x| in [2^21, 2^22): e = 0 after scaling by 2^-10 below
    x = (halves * 2.0 ** -10).float()
    q = torch.randint(-128, 128, (5, k), generator=g, dtype=torch.int8)
    scale = torch.ones(5)
    assert torch.equal(native.int8_gemv(x, q, scale, isa=3), _fixed_point_reference(x, q, scale))


def test_int8_gemv_paths_agree_bitwise_on_exact_inputs():
    """Small integer activations make every partial sum exact in float32 (and are exact in either fixed-point
    form): all paths give identical bits."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (3, 200), generator=g).float()
    q = torch.randint(-128, 128, (21, 200), generator=g, dtype=torch.int8)
    scale = torch.full((21,), 0.5)
    expected = (x.double() @ q.double().t() * 0.5).float()
    for isa in (0, 1, 2, 3):
        try:
            y = native.int8_gemv(x, q, scale, isa=isa)
        except RuntimeError:
            continue
        assert torch.equal(y, expected), ISA_NAMES[isa]


def test_int8_gemv_rejects_bad_inputs():
    x, q, scale = torch.zeros(1, 16), torch.zeros(4, 16, dtype=torch.int8), torch.ones(4)
    with pytest.raises(RuntimeError, match="must agree on K"):
        native.int8_gemv(torch.zeros(1, 8), q, scale)
    with pytest.raises(RuntimeError, match="q must be int8"):
        native.int8_gemv(x, q.float(), scale)
    with pytest.raises(RuntimeError, match="one value per weight row"):
        native.int8_gemv(x, q, torch.ones(3))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        native.int8_gemv(x.half(), q, scale)
    with pytest.raises(RuntimeError, match="requested but this CPU supports"):
        native.int8_gemv(x, q, scale, isa=7)


def test_int8_matmul_falls_back_when_switched_off(monkeypatch):
    """HFCOMPRESS_NATIVE_KERNELS=0 routes decode to aten._weight_int8pack_mm: same result to bf16 rounding."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, generator=g).bfloat16()
    q = torch.randint(-128, 128, (48, 64), generator=g, dtype=torch.int8)
    scale = torch.rand(48, generator=g) * 0.01 + 1e-3
    ours = kernels.int8_matmul(x, q, scale)
    monkeypatch.setenv("HFCOMPRESS_NATIVE_KERNELS", "0")
    assert not native.int8_gemv_available()
    assert native.native_kernel_status()["int8_gemv"] == "disabled by HFCOMPRESS_NATIVE_KERNELS"
    theirs = kernels.int8_matmul(x, q, scale)
    y64 = x.double() @ (q.double() * scale.double()[:, None]).t()
    magnitude = x.double().abs() @ (q.double().abs() * scale.double()[:, None]).t()
    # theirs rounds the scale to bf16 and its output to bf16; ours only the output
    assert ((theirs.double() - y64).abs() <= 2 * 2.0 ** -8 * magnitude + 1e-12).all()
    assert ((ours.double() - y64).abs() <= 2.0 ** -8 * y64.abs() + 1e-5 * magnitude).all()


def test_build_failure_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_already_registered", lambda: False)

    def broken_build():
        raise RuntimeError("Error building extension: c++: not found")

    monkeypatch.setattr(native, "_build", broken_build)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert not native.int8_gemv_available()
        assert not native.int8_gemv_available()  # cached: built (and warned) once
    warnings = [r for r in caplog.records if "could not be built" in r.getMessage()]
    assert len(warnings) == 1 and "c++: not found" in warnings[0].getMessage()
    assert "unavailable" in native.native_kernel_status()["int8_gemv"]
    # the decode path still works, through PyTorch's kernel
    x, q, scale = torch.ones(1, 32).bfloat16(), torch.ones(8, 32, dtype=torch.int8), torch.full((8,), 0.5)
    assert torch.equal(kernels.int8_matmul(x, q, scale), torch.full((1, 8), 16.0).bfloat16())


def test_int8_gemv_threads_split_rows_without_changing_results():
    """Rows are split over ATen's OpenMP pool (the extension is built with -fopenmp); each row's sum is
    computed by one thread in one order, so any thread count gives identical bits."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 300, generator=g)
    q = torch.randint(-128, 128, (1001, 300), generator=g, dtype=torch.int8)
    scale = torch.rand(1001, generator=g) + 0.5
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.int8_gemv(x, q, scale)
        torch.set_num_threads(max(2, before))
        many = native.int8_gemv(x, q, scale)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_int8_gemv_vnni_edge_rows():
    """The fixed-point path: an all-zero row gives zeros, a non-finite row goes to the float path (NaN/Inf
    propagate as in a float matmul), rows of very different magnitude each get their own exponent, and a
    K too long for int32 digit sums (>= 65536) takes the float path."""
    isa_or_skip(3)
    g = torch.Generator().manual_seed(6)
    q = torch.randint(-128, 128, (8, 200), generator=g, dtype=torch.int8)
    scale = torch.rand(8, generator=g) + 0.5
    x = torch.randn(4, 200, generator=g)
    x[0] = 0
    x[2] *= 1e-37  # 2^-e would overflow a float here
    x[3] *= 1e30
    y = native.int8_gemv(x, q, scale, isa=3)
    y64 = x.double() @ q.double().t() * scale.double()
    assert torch.equal(y[0], torch.zeros(8))
    assert torch.allclose(y[1:].double(), y64[1:], rtol=1e-5, atol=0)
    x[1, 7] = float("nan")
    assert torch.isnan(native.int8_gemv(x, q, scale, isa=3)[1]).all()
    x_long = torch.randn(1, 65536, generator=g)
    q_long = torch.randint(-128, 128, (3, 65536), generator=g, dtype=torch.int8)
    y_long = native.int8_gemv(x_long, q_long, torch.ones(3), isa=3)
    assert torch.allclose(y_long.double(), x_long.double() @ q_long.double().t(), rtol=1e-4)


def test_int8_matmul_decodes_any_k_with_our_kernel(monkeypatch):
    """K % 16 != 0 (which PyTorch's kernel cannot take) still decodes through our kernel, not a dense
    dequantized matmul; prefill rows go through it too (its dequantized tiles)."""
    calls = []
    monkeypatch.setattr(kernels, "int8_gemv", lambda *args: calls.append(args[0].shape) or native.int8_gemv(*args))
    g = torch.Generator().manual_seed(7)
    q = torch.randint(-128, 128, (24, 72), generator=g, dtype=torch.int8)
    scale = torch.rand(24, generator=g) + 0.5
    for rows in (1, kernels.INT8_DENSE_MIN_ROWS):
        x = torch.randn(rows, 72, generator=g).bfloat16()
        y = kernels.int8_matmul(x, q, scale)
        y64 = x.double() @ (q.double() * scale.double()[:, None]).t()
        magnitude = x.double().abs() @ (q.double().abs() * scale.double()[:, None]).t()
        assert ((y.double() - y64).abs() <= 2 * 2.0 ** -8 * magnitude + 1e-12).all()
    assert calls == [(1, 72), (kernels.INT8_DENSE_MIN_ROWS, 72)]


@pytest.mark.parametrize("isa_name", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_logit_loss_under_every_isa(isa_name, loss, monkeypatch):
    """HFCOMPRESS_CPU_ISA picks the loss kernel's clone too; each matches the float64 reference."""
    from hfcompress.distillation.losses import LogitLoss
    from tests.distillation.test_kd_kernel import assert_matches, logits

    if {"generic": 0, "avx2": 1, "avx512": 2}[isa_name] > native.cpu_isa():
        pytest.skip(f"this CPU has no {isa_name} path")
    monkeypatch.setenv("HFCOMPRESS_CPU_ISA", isa_name)
    assert native.native_kernel_status()["kd_logit_loss"] == f"loaded ({isa_name})"
    student, teacher, targets = logits(5, 1000, seed=3)
    spec = LogitLoss(loss=loss, temperature=2.0, kd_weight=0.7, ce_weight=0.3, beta=0.4)
    assert_matches(spec, student, teacher, targets, loss)
