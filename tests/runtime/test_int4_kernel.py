"""hfcompress's own int4 CPU kernel (native.py, csrc/int4_gemv.cpp): every code path against float64.

Error bound (decode, M < 8 rows): the kernel quantizes each activation block of 32 to int8,
x^_k = d_b X_k with d_b = max_b|x| / 127 and X_k = round(x_k / d_b), so |x_k - x^_k| <= d_b / 2 (plus the
float32 rounding of x_k / d_b: a further 2^-24 |x_k| / d_b, i.e. <= 2^-24 * 127 d_b); the integer dot products
are exact, and the float32 sums of the block and group terms add at most gamma_n * sum_k (u_k + c) s |x^_k|
(u the unsigned code, c the offset: the kernel sums u X and c X separately), n = 2K/32 + G + 16 roundings.
So |y - x W.T| <= sum_k |W_nk| d_b(k) (1/2 + 2^-17) + gamma_n sum_k (u_nk + c_ng) s_ng |x_k| (1 + 1/127), and a
bfloat16 output adds 2^-8 |y|. Prefill (M >= 8) runs the integer GEMM (int16 activations per block; bound in
conftest.integer_prefill_bound) or, with HFCOMPRESS_PREFILL=float or the portable path, float32 dequantized
tiles: gamma_(K+2) sum |x W|.
A wrong nibble, group, scale or row gives errors of order sum |x W| itself.
"""

from __future__ import annotations

import pytest
import torch

from hfcompress.core import native

from .conftest import integer_prefill_bound, integer_prefill_runs

pytestmark = pytest.mark.skipif(not native.kernels_available(), reason="native kernels could not be built here")

ISA_NAMES = {0: "generic", 1: "avx2", 2: "avx512", 3: "avx512-vnni"}


def isa_or_skip(isa):
    if isa > native.cpu_isa():
        pytest.skip(f"this CPU has no {ISA_NAMES[isa]} path")


def random_int4(n, k, group_size, asymmetric, generator):
    """Codes q (N, K) in [-8, 7], scales (N, G), zero points (N, G) in [-8, 7] or None."""
    groups = 1 if group_size >= k else -(-k // group_size)
    q = torch.randint(-8, 8, (n, k), generator=generator, dtype=torch.int8)
    scale = torch.rand(n, groups, generator=generator) * 0.02 + 1e-3
    zero = torch.randint(-8, 8, (n, groups), generator=generator, dtype=torch.int8) if asymmetric else None
    return q, scale, zero


def expand(values, k, group_size):  # (N, G) -> (N, K)
    if values.shape[1] == 1:
        return values.expand(values.shape[0], k)
    return values.repeat_interleave(group_size, dim=1)[:, :k]


def pack_args(q, scale, zero, group_size):
    """The kernel's inputs: packed codes, float32 scale, offset c * s (c = 8 + z) or None."""
    offset = None if zero is None else ((8 + zero.float()) * scale).contiguous()
    return native.int4_pack(q), scale.float().contiguous(), offset


def prefill_block(group_size, k):
    """The integer prefill's activation block (int4_gemv.cpp's prefill_i16): the group up to 256 columns, else
    the largest of 256/128/64/32 dividing it; 128 per channel."""
    if group_size >= k:
        return 128
    if group_size <= 256:
        return group_size
    return next(size for size in (256, 128, 64, 32) if group_size % size == 0)


def reference_and_bound(x, q, scale, zero, group_size, rows_quantized, isa=1):
    k = q.shape[1]
    s = expand(scale.double(), k, group_size)  # (N, K)
    c = 8 + (expand(zero.double(), k, group_size) if zero is not None else torch.zeros_like(s))
    u = q.double() + 8
    w = (u - c) * s  # == (q - z) s
    x64 = x.double()
    y64 = x64 @ w.t()
    if x.shape[0] >= 8 and integer_prefill_runs(isa, x.dtype):
        bound = integer_prefill_bound(x64, w.abs(), prefill_block(group_size, k))
    elif x.shape[0] >= 8:
        bound = (k + 2) * 2.0 ** -24 * (x64.abs() @ w.abs().t())
    else:
        kp = -(-k // 32) * 32
        padded = torch.nn.functional.pad(x64.abs(), (0, kp - k))
        d = padded.reshape(x.shape[0], -1, 32).amax(-1) / 127  # (M, blocks)
        d_k = d.repeat_interleave(32, dim=1)[:, :k]  # (M, K)
        groups = 1 if group_size >= k else -(-k // group_size)
        n_round = 2 * kp // 32 + groups + 16
        magnitude = x64.abs() @ ((u + c) * s).t() * (1 + 1 / 127)
        bound = d_k @ w.abs().t() * (0.5 + 2.0 ** -17) + n_round * 2.0 ** -24 * magnitude
    if x.dtype == torch.bfloat16:
        bound = bound + 2.0 ** -8 * y64.abs()
    return y64, bound


@pytest.mark.parametrize("isa", [0, 1, 2, 3], ids=ISA_NAMES.get)
@pytest.mark.parametrize("asymmetric", [False, True], ids=["symmetric", "zero-point"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, None], ids=lambda g: f"g{g}" if g else "channel")
def test_int4_gemv_decode_matches_float64(isa, asymmetric, group_size):
    isa_or_skip(isa)
    g = torch.Generator().manual_seed(isa * 100 + (group_size or 7))
    # row blocks with tails (N % 4), K tails of a chunk (64) and of a block (32), groups cut short by K
    for n, k in [(37, 256), (9, 320), (64, 96), (5, 40), (130, 512), (3, 17)]:
        gs = group_size or k
        if group_size is not None and group_size % 32:
            continue
        q, scale, zero = random_int4(n, k, gs, asymmetric, g)
        packed, s32, offset = pack_args(q, scale, zero, gs)
        for m in (1, 2, 3, 5):
            for dtype in (torch.float32, torch.bfloat16):
                x = (torch.randn(m, k, generator=g) * torch.rand(m, k, generator=g) * 4).to(dtype)
                y = native.int4_gemv(x, packed, s32, offset, n, gs, isa=isa)
                assert y.dtype == dtype and y.shape == (m, n)
                y64, bound = reference_and_bound(x, q, scale, zero, gs, True)
                err = (y.double() - y64).abs()
                assert (err <= bound + 1e-30).all(), (isa, n, k, m, dtype, (err - bound).max().item())


@pytest.mark.parametrize("isa", [0, 1, 2, 3], ids=ISA_NAMES.get)
def test_int4_gemv_paths_give_the_same_quantized_arithmetic(isa):
    """Activations that are already int8 multiples of a power of two, with a full-scale entry per block, are
    quantized exactly; small scales keep the float sums exact: every path then equals float64 exactly."""
    isa_or_skip(isa)
    g = torch.Generator().manual_seed(1)
    n, k = 21, 192
    q, _, zero = random_int4(n, k, 64, True, g)
    scale = torch.full((n, 3), 0.25)
    X = torch.randint(-127, 128, (2, k), generator=g).float()
    X[:, ::32] = 127
    x = X * 2.0 ** -6
    packed, s32, offset = pack_args(q, scale, zero, 64)
    y = native.int4_gemv(x, packed, s32, offset, n, 64, isa=isa)
    y64, _ = reference_and_bound(x, q, scale, zero, 64, True)
    assert torch.equal(y.double(), y64)


@pytest.mark.parametrize("prefill", ["integer", "float"])
@pytest.mark.parametrize("isa", [0, 1, 2, 3], ids=ISA_NAMES.get)
@pytest.mark.parametrize("m", [8, 33])
def test_int4_prefill_matches_float64(isa, m, prefill, monkeypatch):
    """Prefill rows (M >= 8): the integer GEMM within its int16 activation bound, and float32 tiles
    (HFCOMPRESS_PREFILL=float, the portable path) within float32's; groups of 32 to 512 and per channel, zero
    points, K and N tails of the 16-row panels, bfloat16 in and out."""
    isa_or_skip(isa)
    if prefill == "float":
        monkeypatch.setenv("HFCOMPRESS_PREFILL", "float")
    else:
        monkeypatch.delenv("HFCOMPRESS_PREFILL", raising=False)
    g = torch.Generator().manual_seed(m + 10 * isa)
    for n, k, gs in [(70, 256, 128), (33, 100, 32), (16, 64, 64), (17, 576, 64), (40, 1024, 512), (9, 200, 200)]:
        q, scale, zero = random_int4(n, k, gs, m == 33, g)
        packed, s32, offset = pack_args(q, scale, zero, gs)
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(m, k, generator=g) * torch.rand(m, k, generator=g) * 4).to(dtype)
            y = native.int4_gemv(x, packed, s32, offset, n, gs, isa=isa)
            assert y.dtype == dtype and y.shape == (m, n)
            y64, bound = reference_and_bound(x, q, scale, zero, gs, False, isa=isa)
            if dtype == torch.bfloat16 and not integer_prefill_runs(isa, dtype) and isa >= 2:
                bound = bound + 2.0 ** -8 * (x.double().abs() @ expand_weights_abs(q, scale, zero, gs).t())
            err = (y.double() - y64).abs()
            assert (err <= bound + 1e-30).all(), (isa, n, k, gs, dtype, (err - bound).max().item())


def expand_weights_abs(q, scale, zero, group_size):
    k = q.shape[1]
    c = 8 + (expand(zero.double(), k, group_size) if zero is not None else 0)
    return ((q.double() + 8 - c) * expand(scale.double(), k, group_size)).abs()


def test_int4_gemv_non_finite_activations_propagate():
    g = torch.Generator().manual_seed(2)
    q, scale, _ = random_int4(8, 128, 64, False, g)
    packed, s32, _ = pack_args(q, scale, None, 64)
    x = torch.randn(2, 128, generator=g)
    x[1, 70] = float("inf")
    for isa in range(native.cpu_isa() + 1):
        y = native.int4_gemv(x, packed, s32, None, 8, 64, isa=isa)
        assert torch.isfinite(y[0]).all() and not torch.isfinite(y[1]).any(), ISA_NAMES[isa]


def test_int4_gemv_threads_do_not_change_results():
    g = torch.Generator().manual_seed(5)
    q, scale, zero = random_int4(1001, 320, 64, True, g)
    packed, s32, offset = pack_args(q, scale, zero, 64)
    x = torch.randn(3, 320, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.int4_gemv(x, packed, s32, offset, 1001, 64)
        torch.set_num_threads(max(2, before))
        many = native.int4_gemv(x, packed, s32, offset, 1001, 64)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_int4_kernel_rejects_bad_inputs():
    q = torch.zeros(8, 64, dtype=torch.int8)
    packed, scale = native.int4_pack(q), torch.ones(8, 1)
    x = torch.zeros(1, 64)
    with pytest.raises(RuntimeError, match=r"outside \[-8, 7\]"):
        native.int4_pack(torch.full((2, 4), 8, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="packed must be uint8"):
        native.int4_gemv(torch.zeros(1, 128), packed, scale, None, 8, 64)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        native.int4_gemv(x, packed, scale, None, 8, 48)
    with pytest.raises(RuntimeError, match="scale must be float32"):
        native.int4_gemv(x, packed, torch.ones(8, 3), None, 8, 32)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        native.int4_gemv(x.half(), packed, scale, None, 8, 64)
    with pytest.raises(RuntimeError, match="requested but this CPU supports"):
        native.int4_gemv(x, packed, scale, None, 8, 64, isa=7)


def _load(tmp_path, **kwargs):
    from hfcompress.quantization.runtime import load_compressed

    from .conftest import small_llama, write_ct_checkpoint

    model = small_llama()
    write_ct_checkpoint(model, tmp_path, num_bits=4, **kwargs)
    return load_compressed(tmp_path, progress=False)


def test_generic_isa_falls_back_to_pytorch_with_one_warning(tmp_path, monkeypatch, caplog):
    """HFCOMPRESS_CPU_ISA=generic behaves like a CPU without AVX2: PyTorch's int4pack/int8pack kernels run,
    with one warning; the logits stay those of our kernel within the activation-rounding tolerance."""
    import logging

    from hfcompress.quantization.runtime import Int4PackedLinear, kernel_module

    ours = _load(tmp_path / "a", group_size=32, symmetric=False)
    ids = torch.tensor([[3, 17, 42, 5, 99, 7]])
    expected = ours(ids).logits.float()
    monkeypatch.setenv("HFCOMPRESS_CPU_ISA", "generic")
    monkeypatch.setitem(native._state, "warned_generic", False)
    with caplog.at_level(logging.WARNING):
        theirs = _load(tmp_path / "b", group_size=32, symmetric=False)
        _load(tmp_path / "c", group_size=32, symmetric=False)
    warnings = [r for r in caplog.records if "need AVX2" in r.getMessage()]
    assert len(warnings) == 1 and "HFCOMPRESS_CPU_ISA=generic" in warnings[0].getMessage()
    layer = kernel_module(theirs.model.layers[0].mlp.up_proj)
    assert isinstance(layer, Int4PackedLinear) and layer.backend == "int4pack"
    assert native.native_kernel_status()["int4_gemv"].startswith("not used")
    got = theirs(ids).logits.float()
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


def test_unknown_isa_name_is_a_clear_error(monkeypatch):
    from hfcompress.core.errors import HFCompressError

    monkeypatch.setenv("HFCOMPRESS_CPU_ISA", "sse9")
    with pytest.raises(HFCompressError, match="HFCOMPRESS_CPU_ISA='sse9'.*use one of generic, avx2, avx512"):
        native.kernel_isa()


@pytest.mark.parametrize("symmetric", [True, False])
def test_avx2_isa_runs_our_kernels_at_avx2(tmp_path, monkeypatch, symmetric):
    """The AVX2 path end to end: our kernels at the AVX2 level, logits as close to the dequantized float32
    model as a bfloat16 model's are (prompt: the prefill tiles; then decode steps: the int8 activation blocks)."""
    from hfcompress.quantization.runtime import kernel_module

    from .test_runtime import check_close_to_reference

    isa_or_skip(1)
    monkeypatch.setenv("HFCOMPRESS_CPU_ISA", "avx2")
    assert native.kernel_isa() == 1
    assert native.native_kernel_status() == {"int8_gemv": "loaded (avx2)", "int4_gemv": "loaded (avx2)",
                                             "kd_logit_loss": "loaded (avx2)", "decode_attention": "loaded (avx2)"}
    model = _load(tmp_path, group_size=32, symmetric=symmetric)
    assert kernel_module(model.model.layers[0].mlp.up_proj).backend == "hfcompress"
    check_close_to_reference(tmp_path, model)
    ids = torch.tensor([[3, 17, 42]])
    with torch.no_grad():  # one decode step (M = 1) against the full forward's last position
        cache = model(ids[:, :2], use_cache=True).past_key_values
        step = model(ids[:, 2:], past_key_values=cache).logits[0, -1].float()
        full = model(ids).logits[0, -1].float()
    assert (step - full).abs().max() <= 0.02 * full.abs().max()


def test_layers_our_kernel_cannot_take_are_named_in_one_warning(tmp_path, caplog):
    """Group 16 (no multiple of 32): neither our kernel nor PyTorch's takes it; the layers dequantize per
    call, and one warning lists them."""
    import logging

    with caplog.at_level(logging.WARNING):
        _load(tmp_path, group_size=16, symmetric=True)
    warnings = [r.getMessage() for r in caplog.records if "int4 layer(s) run on slower kernels" in r.getMessage()]
    assert len(warnings) == 1 and "model.layers.0.self_attn.q_proj" in warnings[0]


def test_default_dtype_follows_native_bf16(tmp_path, monkeypatch):
    """float32 activations where our kernels run without native bfloat16 (here: the AVX2 cap), bfloat16 where
    the CPU has it."""
    monkeypatch.setenv("HFCOMPRESS_CPU_ISA", "avx2")
    if native.cpu_isa() >= 1:
        assert _load(tmp_path / "a", group_size=32).dtype == torch.float32
    monkeypatch.delenv("HFCOMPRESS_CPU_ISA")
    expected = torch.bfloat16 if native.cpu_has_native_bf16() or native.cpu_isa() == 0 else torch.float32
    assert _load(tmp_path / "b", group_size=32).dtype == expected
