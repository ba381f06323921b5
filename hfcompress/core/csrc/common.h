// Shared by hfcompress's CPU kernels: which instruction set runs, and the tiled "dequantize, then GEMM" path
// that the weight-only kernels take for many activation rows (prefill).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HFC_X86 1
#endif

namespace hfc {

// Instruction-set levels, as the Python side passes them (native.py's ISA_LEVELS): every kernel takes one and
// runs that path or a narrower one, so an AVX-512 machine can run (test, time) the AVX2 code too.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kVnni = 3 };

inline Isa detect_isa() {
#ifdef HFC_X86
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  if (avx512 && __builtin_cpu_supports("avx512vnni")) return Isa::kVnni;
  if (avx512) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

inline Isa cached_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

// isa_request: -1 = the best this CPU has; else 0..3, which must not exceed it.
inline Isa resolve_isa(int64_t isa_request, const char* op) {
  const Isa best = cached_isa();
  TORCH_CHECK(isa_request >= -1 && isa_request <= static_cast<int64_t>(best), "hfcompress::", op,
              ": instruction set ", isa_request, " requested but this CPU supports up to ", static_cast<int>(best),
              " (0 = portable, 1 = AVX2, 2 = AVX-512, 3 = AVX-512 VNNI)");
  return isa_request < 0 ? best : static_cast<Isa>(isa_request);
}

// From this many activation rows on, the weight-only kernels dequantize tiles of weight rows and multiply them
// with ATen's GEMM (MKL/oneDNN, blocked for the caches) instead of streaming the packed weights once per few
// rows: at M rows a weight is used M times, so the GEMM's arithmetic intensity wins, and the dequantization
// (one pass over each weight, into a per-thread tile that stays in L2) is amortised over M.
constexpr int64_t kGemmMinRows = 8;

// Prefill by the integer GEMM below (i16_gemm) where bfloat16 tiles are not native: on unless
// HFCOMPRESS_PREFILL=float asks for float32 tiles (the float32-accurate path, e.g. to compare against).
// (Read per call, a few hundred nanoseconds next to a prefill GEMM, so tests can switch it.)
inline bool integer_prefill() {
  const char* v = std::getenv("HFCOMPRESS_PREFILL");
  return v == nullptr || std::string(v) != "float";
}

// Whether bfloat16 activations should meet bfloat16 tiles (oneDNN's AVX-512 BF16 / AMX GEMM, several times
// the float32 GEMM's speed) rather than float32 ones: only where the CPU multiplies bfloat16 natively and the
// instruction-set cap allows AVX-512 (elsewhere a bfloat16 GEMM is emulated and slower than float32).
inline bool native_bf16_gemm(Isa isa) {
#ifdef HFC_X86
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0 || __builtin_cpu_supports("amx-bf16") != 0;
  }();
  return has && static_cast<int>(isa) >= static_cast<int>(Isa::kAvx512);
#else
  (void)isa;
  return false;
#endif
}

// y (M, N) float32 = x (M, K) @ W.T, where dequant(n0, rows, tile) writes weight rows [n0, n0 + rows) as
// float32 (rows, K) into tile. x is float32, or bfloat16 with bf16_tiles (the tiles are then rounded to
// bfloat16 too). Tiles of weight rows are split over ATen's threads; inside a parallel region ATen's GEMM runs
// on the calling thread, so each thread multiplies its own tile.
template <typename Dequant>
void tiled_gemm(const at::Tensor& x, int64_t N, float* y, bool bf16_tiles, Dequant dequant) {
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Tiles of ~2 MiB of float32 (the GEMM repacks x for every tile, so tiles must not be small; 0.5-8 MiB
  // measured alike), at least 16 rows, and enough tiles to keep every thread busy.
  int64_t rows = std::max<int64_t>(16, (int64_t{1} << 19) / std::max<int64_t>(1, K));
  rows = std::min<int64_t>(rows, std::max<int64_t>(16, (N + threads - 1) / threads));
  rows = (rows + 15) / 16 * 16;
  const int64_t tiles = (N + rows - 1) / rows;
  const auto type = bf16_tiles ? at::kBFloat16 : at::kFloat;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> tile(static_cast<size_t>(rows * K));
    std::vector<c10::BFloat16> tile16(bf16_tiles ? static_cast<size_t>(rows * K) : 0);
    at::Tensor out = bf16_tiles ? at::empty({M, rows}, x.options().dtype(type)) : at::Tensor();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * rows, count = std::min(rows, N - n0);
      dequant(n0, count, tile.data());
      void* data = tile.data();
      if (bf16_tiles) {
        for (int64_t i = 0; i < count * K; ++i) tile16[i] = c10::BFloat16(tile[i]);
        data = tile16.data();
      }
      const at::Tensor wt = at::from_blob(data, {count, K}, at::TensorOptions().dtype(type));
      if (!bf16_tiles) {
        // float32: the GEMM writes its columns of y in place (row stride N), no copy.
        at::Tensor dst = at::from_blob(y + n0, {M, count}, {N, 1}, x.options().dtype(at::kFloat));
        at::mm_out(dst, x, wt.t());
        continue;
      }
      at::Tensor ot = out.narrow(1, 0, count);
      if (count == rows) {
        at::mm_out(ot, x, wt.t());
      } else {
        ot = at::mm(x, wt.t());
      }
      const at::Tensor of = ot.to(at::kFloat).contiguous();
      const float* src = of.data_ptr<float>();
      for (int64_t m = 0; m < M; ++m) std::copy(src + m * count, src + (m + 1) * count, y + m * N + n0);
    }
  });
}

#ifdef HFC_X86
// The sum of a vector's 8 float32 lanes.
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

#ifdef HFC_X86
// ---- Prefill as an integer GEMM (AVX2): int16 activations against int16 weight codes ----
//
// Where bfloat16 is not multiplied natively (AVX2 CPUs; float32 activations), the float32 tiles above can only
// tie the float32 GEMM that an unquantized model runs. This path is faster instead: activations are written as
// int16 per row and block of `ab` columns (X = round(x / d), d = max_block |x| / 32767), weight codes are
// widened to int16 (exact), and vpmaddwd multiplies 16 pairs at a time into exact int32 sums, two
// multiply-adds per instruction where FMA does one. Per (row, weight row, block): one conversion and one FMA
// with d * s[n, block]. Rounding: |x^_k - x_k| <= d / 2 = max_block |x| / 65534 per element (a 15-bit grid per
// block, finer than bfloat16's 8-bit significand), plus float32 rounding of the block sums.
// int32 range: a lane sums ab / 8 products of |X| <= 32767 and |w| <= wmax; callers keep
// ab / 8 * 32767 * wmax < 2^31 (ab <= 256 with |w| <= 255).

// Buffers are ATen tensors for their 64-byte alignment: a 32-byte load that straddles a cache line costs two.
struct I16Activations {
  at::Tensor X_;  // int16 (M, kp), zero past K
  at::Tensor d_;  // float32 (M, blocks): NaN for a block with inf/NaN (its outputs become NaN)
  int16_t* X = nullptr;
  float* d = nullptr;
  int64_t kp = 0, ab = 0, blocks = 0;
};

// The calling thread's activation buffers, shared by the int8 and int4 kernels (one set per thread).
inline I16Activations& i16_scratch() {
  thread_local I16Activations buffers;
  return buffers;
}

// After a call: a long prompt's buffers (over 32 MiB) are not kept for the life of the thread.
inline void release_if_large(I16Activations& a) {
  if (a.X_.defined() && a.X_.numel() * 2 > (int64_t{32} << 20)) a = I16Activations{};
}

// One row of x (K values) -> its int16 values X (kp) and block scales d (blocks).
__attribute__((target("avx2,fma"))) inline void quantize_i16_row(const float* xr, int64_t K, int64_t kp, int64_t ab,
                                                                 int64_t blocks, int16_t* X, float* dout) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k0 = b * ab, k1 = std::min(K, k0 + ab), end = std::min(kp, k0 + ab);
    int64_t k = k0;
    __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (; k + 8 <= k1; k += 8) {
      const __m256 v = _mm256_loadu_ps(xr + k);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, amax);
    float am = 0.f;
    for (float l : lanes) am = std::max(am, l);
    bool finite = _mm256_movemask_ps(bad) == 0;
    for (; k < k1; ++k) {
      finite &= !std::isnan(xr[k]);
      am = std::max(am, std::fabs(xr[k]));
    }
    finite &= am <= 3.4028234663852886e38f;
    if (!finite || am == 0.f) {
      std::fill(X + k0, X + end, int16_t{0});
      dout[b] = finite ? 0.f : std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float inv = 32767.f / am;
    const __m256 vinv = _mm256_set1_ps(inv);
    k = k0;
    for (; k + 16 <= k1; k += 16) {
      const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), vinv));
      const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8), vinv));
      // packs works within 128-bit lanes: restore the order with a 64-bit permute.
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(X + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));
    }
    for (; k < end; ++k) X[k] = k < k1 ? static_cast<int16_t>(std::nearbyint(xr[k] * inv)) : int16_t{0};
    dout[b] = am / 32767.f;
  }
}

// x (M, K) float32 -> I16Activations with kp = K rounded up to `multiple` (of 16) and blocks of ab (a multiple
// of 16) columns.
inline void quantize_i16(const float* x, int64_t M, int64_t K, int64_t ab, I16Activations& a, int64_t multiple = 16) {
  a.kp = (K + multiple - 1) / multiple * multiple;
  a.ab = ab;
  a.blocks = (a.kp + ab - 1) / ab;
  if (!a.X_.defined() || a.X_.numel() < M * a.kp) a.X_ = at::empty({M * a.kp}, at::TensorOptions().dtype(at::kShort));
  if (!a.d_.defined() || a.d_.numel() < M * a.blocks) a.d_ = at::empty({M * a.blocks}, at::TensorOptions().dtype(at::kFloat));
  a.X = a.X_.data_ptr<int16_t>();
  a.d = a.d_.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_i16_row(x + m * K, K, a.kp, ab, a.blocks, a.X + m * a.kp, a.d + m * a.blocks);
  });
}

// A panel of 16 weight rows, laid out for i16_tile: for each pair of columns (k, k + 1), the 16 rows' two codes
// (P[k / 2][n][2], 64 bytes), so that one broadcast activation pair times two vectors gives 16 outputs' partial
// sums in 16 int32 lanes (lanes index the weight row, no horizontal sums). SP[b][n]: row n's scale in block b.
constexpr int64_t kPanel = 16;

// rows (kPanel, kp) int16 row-major -> P. An 8 x 8 transpose of 32-bit (k, k + 1) pairs per 8 rows and 16 columns.
__attribute__((target("avx2,fma"))) inline void build_panel(const int16_t* rows, int64_t kp, int16_t* P) {
  for (int64_t k = 0; k < kp; k += 16) {
    for (int half = 0; half < 2; ++half) {
      __m256i r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + (8 * half + i) * kp + k));
      const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
      const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
      const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
      const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
      const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
      const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
      const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
      const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
      // Pair j of this 16-column step (j = 0..7) for rows 0..7: lane i = row i.
      const __m256i out[8] = {_mm256_permute2x128_si256(u0, u4, 0x20), _mm256_permute2x128_si256(u1, u5, 0x20),
                              _mm256_permute2x128_si256(u2, u6, 0x20), _mm256_permute2x128_si256(u3, u7, 0x20),
                              _mm256_permute2x128_si256(u0, u4, 0x31), _mm256_permute2x128_si256(u1, u5, 0x31),
                              _mm256_permute2x128_si256(u2, u6, 0x31), _mm256_permute2x128_si256(u3, u7, 0x31)};
      for (int j = 0; j < 8; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(P + (k / 2 + j) * 2 * kPanel + 16 * half), out[j]);
    }
  }
}

// MR activation rows (from m0) against a panel: out[m][0..15] = sum over blocks b of d[m, b] * SP[b][n] * (the
// block's int32 dot product).
template <int MR>
__attribute__((target("avx2,fma"))) inline void i16_tile(const I16Activations& a, int64_t m0, const int16_t* P,
                                                         const float* SP, float* out /* MR x 16 */) {
  __m256 f[MR][2];
  for (int m = 0; m < MR; ++m) f[m][0] = f[m][1] = _mm256_setzero_ps();
  const int16_t* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = a.X + (m0 + m) * a.kp;
  for (int64_t b = 0; b < a.blocks; ++b) {
    const int64_t k0 = b * a.ab, k1 = std::min(a.kp, k0 + a.ab);
    __m256i acc[MR][2];
    for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += 2) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + k * kPanel));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + k * kPanel + 16));
      for (int m = 0; m < MR; ++m) {
        int32_t pair;
        std::memcpy(&pair, xr[m] + k, sizeof(pair));
        const __m256i xv = _mm256_set1_epi32(pair);
        acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(xv, w0));
        acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(xv, w1));
      }
    }
    const __m256 s0 = _mm256_loadu_ps(SP + b * kPanel), s1 = _mm256_loadu_ps(SP + b * kPanel + 8);
    for (int m = 0; m < MR; ++m) {
      const __m256 d = _mm256_broadcast_ss(a.d + (m0 + m) * a.blocks + b);
      f[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][0]), _mm256_mul_ps(d, s0), f[m][0]);
      f[m][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][1]), _mm256_mul_ps(d, s1), f[m][1]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(out + m * kPanel, f[m][0]);
    _mm256_storeu_ps(out + m * kPanel + 8, f[m][1]);
  }
}

// y (M, N) float32 = the quantized activations times the weights, with
//   unpack(n0, rows, w): weight rows [n0, n0 + rows) (n0 a multiple of 4, rows <= 4) as int16 codes into w
//                        (4 rows of a.kp, row-major; zero past K), and
//   scales(n, s): weight row n's scale per activation block into s (a.blocks values).
// Panels of 16 weight rows are split over ATen's threads; a thread builds each of its panels once (it stays in
// L1/L2) and runs every activation row against it, 3 rows at a time.
template <typename Unpack, typename Scales>
void i16_gemm(const I16Activations& a, int64_t M, int64_t N, float* y, Unpack unpack, Scales scales) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    const auto i16 = at::TensorOptions().dtype(at::kShort);
    const at::Tensor rows_buf = at::empty({kPanel * a.kp}, i16), panel_buf = at::empty({kPanel * a.kp}, i16);
    int16_t* rows = rows_buf.data_ptr<int16_t>();
    int16_t* P = panel_buf.data_ptr<int16_t>();
    std::vector<float> s(static_cast<size_t>(a.blocks)), SP(static_cast<size_t>(kPanel * a.blocks));
    float out[3 * kPanel];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel, count = std::min(kPanel, N - n0);
      for (int64_t r = 0; r < kPanel; r += 4) {
        if (r < count) {
          unpack(n0 + r, static_cast<int>(std::min<int64_t>(4, count - r)), rows + r * a.kp);
        } else {
          std::fill(rows + r * a.kp, rows + (r + 4) * a.kp, int16_t{0});
        }
      }
      build_panel(rows, a.kp, P);
      for (int64_t r = 0; r < kPanel; ++r) {
        if (r < count) scales(n0 + r, s.data());
        for (int64_t b = 0; b < a.blocks; ++b) SP[b * kPanel + r] = r < count ? s[b] : 0.f;
      }
      for (int64_t m = 0; m < M; m += 3) {
        const int mr = static_cast<int>(std::min<int64_t>(3, M - m));
        if (mr == 3)
          i16_tile<3>(a, m, P, SP.data(), out);
        else if (mr == 2)
          i16_tile<2>(a, m, P, SP.data(), out);
        else
          i16_tile<1>(a, m, P, SP.data(), out);
        for (int i = 0; i < mr; ++i) std::copy(out + i * kPanel, out + i * kPanel + count, y + (m + i) * N + n0);
      }
    }
  });
}
#endif

// x (M, K) float32 or bfloat16 -> float32 values: float32 read in place, bfloat16 converted into `scratch`.
inline const float* as_float(const at::Tensor& xc, std::vector<float>& scratch) {
  if (xc.scalar_type() == at::kFloat) return xc.data_ptr<float>();
  const int64_t n = xc.numel();
  scratch.resize(static_cast<size_t>(n));
  const c10::BFloat16* src = xc.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < n; ++i) scratch[i] = static_cast<float>(src[i]);
  return scratch.data();
}

}  // namespace hfc
