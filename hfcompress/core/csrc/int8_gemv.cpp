// Weight-only int8 matrix-vector kernel for decode on CPU.
//
//   y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]      x: (M, K) float32 or bfloat16, q: (N, K) int8
//
// Decode multiplies one activation row by every weight once, so the time is the time to stream the int8
// weights from memory, and the work per weight byte must stay small enough to keep up with it. Paths:
//
// * AVX-512 VNNI (fastest): each activation row is written in fixed point, x_k = X_k 2^e with |X_k| <= 2^22
//   (e from the row's largest |x|), and X_k is split into three balanced base-256 digits, so
//   sum_k q_k X_k = 2^16 A + 2^8 B + C with A, B, C integer dot products of the int8 weights with int8 digits.
//   VPDPBUSD computes 64 such products per instruction, in exact int32 arithmetic. It multiplies unsigned by
//   signed bytes, so it sees u = q + 128 and the result is corrected by 128 sum_k X_k. The only rounding is
//   that of x to the 2^e grid (<= 2^-22 max|x| per element; exact for bfloat16 inputs within 2^14 of the
//   row's maximum) and the final conversion to float.
// * AVX2: the same idea in 14-bit fixed point (two digits that keep vpmaddubsw's int16 pair sums exact; see
//   block_avx2_int): rounding <= 2^-13 max|x| per element.
// * AVX-512 (no VNNI), and AVX2 for non-finite rows or K >= 65536: convert 16 / 8 int8 weights at a time to
//   float32 and accumulate with FMA in float32.
// * a portable loop for other CPUs (and non-finite activations go to the float paths).
//
// A block of 4 weight rows shares each activation load. Rows are split over ATen's OpenMP pool (the build
// uses -fopenmp). The instruction set is chosen at run time, so one build serves every x86-64 CPU.
//
// Decode calls this ~100 times per token, on layers that stream in tens of microseconds, so fixed costs per
// call matter: the fixed-point digits are computed with AVX-512 (identical to the scalar reference), float32
// activations are read in place, scratch buffers are reused per thread, and the VNNI path writes its output
// directly in the activation dtype.
//
// Registered as the operator ``hfcompress::int8_gemv`` (see kernels.py for how it is built and used).

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

using hfc::Isa;
#ifdef HFC_X86
using hfc::hsum256;
#endif

constexpr int kRows = 4;   // weight rows per block
constexpr int kMaxM = 4;   // activation rows per pass
// Software prefetch: each of a block's 4 row streams requests the cache line kPrefetch bytes ahead, and past
// the end of its row it continues into the same row of the next block, so the streams never restart cold
// at a block boundary (rows of decode matrices are only 1-8 KiB). On a Sapphire Rapids VM core, streaming
// 1536-4096-wide int8 matrices from DRAM: 1.3-1.8x the throughput of prefetching within rows only, ~2x none.
constexpr int64_t kPrefetch = 1024;

inline const char* prefetch_target(const int8_t* q, int64_t K, int64_t n0, int r, int64_t k) {
  const int64_t ahead = k + kPrefetch;
  return reinterpret_cast<const char*>(ahead < K ? q + (n0 + r) * K + ahead : q + (n0 + kRows + r) * K + (ahead - K));
}

// Fixed-point form of one activation row for the VNNI path: three digit rows of kp bytes (zero padded).
struct Digits {
  std::vector<int8_t> bytes;  // (3, kp): most significant digit row first
  int64_t sum = 0;            // sum_k X_k
  int exponent = 0;           // x_k = X_k 2^exponent
};

// Decode calls the kernel ~100 times per token on small inputs, so per-call costs (allocations, the
// activation conversion) are a visible share of a step: scratch buffers are kept per thread and reused.
thread_local std::vector<float> tls_x;
thread_local std::vector<Digits> tls_digits;

// Portable loop: also the reference for the vector paths.
void rows_scalar(const float* x, int64_t m_count, int64_t K, const int8_t* q, int64_t n_begin,
                 int64_t n_end, const float* scale, float* y, int64_t N) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* w = q + n * K;
    for (int64_t m = 0; m < m_count; ++m) {
      const float* xm = x + m * K;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += xm[k] * static_cast<float>(w[k]);
      y[m * N + n] = acc * scale[n];
    }
  }
}

#ifdef HFC_X86
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void block_avx512(const float* x, int64_t K, const int8_t* q,
                                                               int64_t n0, int rows, const float* scale,
                                                               float* y, int64_t N) {
  __m512 acc[M][kRows];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < kRows; ++r) acc[m][r] = _mm512_setzero_ps();
  const int8_t* w[kRows];
  for (int r = 0; r < kRows; ++r) w[r] = q + (n0 + (r < rows ? r : 0)) * K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if ((k & 63) == 0)
      for (int r = 0; r < kRows; ++r) _mm_prefetch(prefetch_target(q, K, n0, r, k), _MM_HINT_T0);
    __m512 wf[kRows];
    for (int r = 0; r < kRows; ++r)
      wf[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + k))));
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < kRows; ++r) acc[m][r] = _mm512_fmadd_ps(wf[r], xv, acc[m][r]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 wf[kRows];
    for (int r = 0; r < kRows; ++r)
      wf[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w[r] + k)));
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      for (int r = 0; r < kRows; ++r) acc[m][r] = _mm512_fmadd_ps(wf[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < rows; ++r) y[m * N + n0 + r] = _mm512_reduce_add_ps(acc[m][r]) * scale[n0 + r];
}

template <int M>
__attribute__((target("avx2,fma"))) void block_avx2(const float* x, int64_t K, const int8_t* q, int64_t n0,
                                                    int rows, const float* scale, float* y, int64_t N) {
  __m256 acc[M][kRows];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < kRows; ++r) acc[m][r] = _mm256_setzero_ps();
  const int8_t* w[kRows];
  for (int r = 0; r < kRows; ++r) w[r] = q + (n0 + (r < rows ? r : 0)) * K;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if ((k & 63) == 0)
      for (int r = 0; r < kRows; ++r) _mm_prefetch(prefetch_target(q, K, n0, r, k), _MM_HINT_T0);
    __m256 wf[kRows];
    for (int r = 0; r < kRows; ++r) {
      int64_t bytes;
      std::memcpy(&bytes, w[r] + k, 8);
      wf[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(bytes)));
    }
    for (int m = 0; m < M; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < kRows; ++r) acc[m][r] = _mm256_fmadd_ps(wf[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < rows; ++r) {
      float total = hsum256(acc[m][r]);
      for (int64_t t = k; t < K; ++t) total += x[m * K + t] * static_cast<float>(w[r][t]);
      y[m * N + n0 + r] = total * scale[n0 + r];
    }
  }
}

template <typename Out>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void block_vnni(
    const Digits& d, int64_t K, int64_t kp, const int8_t* q, int64_t n0, int rows, const float* scale, Out* y) {
  __m512i acc[3][kRows];
  for (int j = 0; j < 3; ++j)
    for (int r = 0; r < kRows; ++r) acc[j][r] = _mm512_setzero_si512();
  const int8_t* w[kRows];
  for (int r = 0; r < kRows; ++r) w[r] = q + (n0 + (r < rows ? r : 0)) * K;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // q ^ 0x80 read as unsigned = q + 128
  const int8_t* digit[3] = {d.bytes.data(), d.bytes.data() + kp, d.bytes.data() + 2 * kp};
  for (int64_t k = 0; k < K; k += 64) {
    __m512i u[kRows];
    if (k + 64 <= K) {
      for (int r = 0; r < kRows; ++r) {
        _mm_prefetch(prefetch_target(q, K, n0, r, k), _MM_HINT_T0);
        u[r] = _mm512_xor_si512(_mm512_loadu_si512(w[r] + k), flip);
      }
    } else {  // the tail: bytes past K read as 0 (then 128 after the flip) and meet zero digits
      const __mmask64 mask = (~__mmask64{0}) >> (64 - (K - k));
      for (int r = 0; r < kRows; ++r) u[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w[r] + k), flip);
    }
    for (int j = 0; j < 3; ++j) {
      const __m512i dj = _mm512_loadu_si512(digit[j] + k);
      for (int r = 0; r < kRows; ++r) acc[j][r] = _mm512_dpbusd_epi32(acc[j][r], u[r], dj);
    }
  }
  const double unit = std::ldexp(1.0, d.exponent);
  for (int r = 0; r < rows; ++r) {
    // |A|, |B|, |C| <= 255 * 128 * K < 2^31 for K < 65536 (checked by the caller).
    const int64_t a = _mm512_reduce_add_epi32(acc[0][r]), b = _mm512_reduce_add_epi32(acc[1][r]),
                  c = _mm512_reduce_add_epi32(acc[2][r]);
    const int64_t dot = (a << 16) + (b << 8) + c - 128 * d.sum;  // sum_k q_k X_k, exact
    y[n0 + r] = static_cast<Out>(static_cast<float>(static_cast<double>(dot) * unit * static_cast<double>(scale[n0 + r])));
  }
}

template <int M>
void rows_vector(Isa isa, const float* x, int64_t K, const int8_t* q, int64_t n_begin, int64_t n_end,
                 const float* scale, float* y, int64_t N) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, n_end - n0));
    if (isa == Isa::kAvx512)
      block_avx512<M>(x, K, q, n0, rows, scale, y, N);
    else
      block_avx2<M>(x, K, q, n0, rows, scale, y, N);
  }
}
#endif

// x (K floats) -> fixed point X 2^e with |X| <= 2^22, split into balanced base-256 digits. False when the
// row has a non-finite value (the float paths then propagate it).
bool make_digits_scalar(const float* x, int64_t K, int64_t kp, Digits& d) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    finite &= std::isfinite(x[k]);
    amax = std::max(amax, std::fabs(x[k]));
  }
  if (!finite) return false;
  d.bytes.assign(static_cast<size_t>(3 * kp), 0);
  d.sum = 0;
  d.exponent = 0;
  if (amax == 0.f) return true;
  int top;
  std::frexp(amax, &top);  // amax < 2^top
  d.exponent = top - 22;
  // x 2^-e is exact in double (a power-of-two scaling; 2^-e itself may not fit a float for tiny rows).
  const double inv = std::ldexp(1.0, -d.exponent);
  int8_t* high = d.bytes.data();
  int8_t* mid = high + kp;
  int8_t* low = mid + kp;
  int64_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int32_t X = static_cast<int32_t>(std::nearbyint(static_cast<double>(x[k]) * inv));  // |X| <= 2^22
    sum += X;
    const int32_t l = ((X + 128) & 255) - 128;  // balanced digits: X = 2^16 h + 2^8 m + l, each in [-128, 127]
    const int32_t rest = (X - l) >> 8;
    const int32_t m = ((rest + 128) & 255) - 128;
    high[k] = static_cast<int8_t>((rest - m) >> 8);  // |h| <= 65
    mid[k] = static_cast<int8_t>(m);
    low[k] = static_cast<int8_t>(l);
  }
  d.sum = sum;
  return true;
}

#ifdef HFC_X86
// make_digits with AVX-512, identical results: x 2^-e is computed in float32, where it is exact (a power-of-two
// scaling of a float that lands at most 2^22 in magnitude; results that underflow round to 0 either way), and
// rounded half-to-even to an integer exactly as nearbyint does. Only when 2^-e is not itself a normal float
// (rows of magnitude below ~2^-104 or above ~2^149) does it defer to the scalar version.
__attribute__((target("avx512f,avx512bw,avx512vl"))) bool make_digits_avx512(const float* x, int64_t K, int64_t kp,
                                                                        Digits& d) {
  const __m512 big = _mm512_set1_ps(3.4028234663852886e38f);
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 finite = 0xffff;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + k));
    finite &= _mm512_cmp_ps_mask(a, big, _CMP_LE_OQ);  // false for inf and NaN
    vmax = _mm512_max_ps(vmax, a);
  }
  if (k < K) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (K - k)) - 1u);
    const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, x + k));
    finite &= _mm512_cmp_ps_mask(a, big, _CMP_LE_OQ);
    vmax = _mm512_max_ps(vmax, a);
  }
  if (finite != 0xffff) return false;
  const float amax = _mm512_reduce_max_ps(vmax);
  d.bytes.assign(static_cast<size_t>(3 * kp), 0);
  d.sum = 0;
  d.exponent = 0;
  if (amax == 0.f) return true;
  int top;
  std::frexp(amax, &top);
  const int exponent = top - 22;
  if (-exponent < -126 || -exponent > 127) return make_digits_scalar(x, K, kp, d);
  d.exponent = exponent;
  const __m512 inv = _mm512_set1_ps(std::ldexp(1.0f, -exponent));
  const __m512i c128 = _mm512_set1_epi32(128), c255 = _mm512_set1_epi32(255);
  int8_t* high = d.bytes.data();
  int8_t* mid = high + kp;
  int8_t* low = mid + kp;
  __m512i sum_lo = _mm512_setzero_si512(), sum_hi = _mm512_setzero_si512();
  for (k = 0; k < K; k += 16) {
    const __mmask16 lanes = K - k >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (K - k)) - 1u);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, x + k), inv);
    const __m512i X = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    sum_lo = _mm512_add_epi64(sum_lo, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(X)));
    sum_hi = _mm512_add_epi64(sum_hi, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(X, 1)));
    const __m512i l = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(X, c128), c255), c128);
    const __m512i rest = _mm512_srai_epi32(_mm512_sub_epi32(X, l), 8);
    const __m512i m = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(rest, c128), c255), c128);
    const __m512i h = _mm512_srai_epi32(_mm512_sub_epi32(rest, m), 8);
    _mm512_mask_cvtepi32_storeu_epi8(high + k, lanes, h);
    _mm512_mask_cvtepi32_storeu_epi8(mid + k, lanes, m);
    _mm512_mask_cvtepi32_storeu_epi8(low + k, lanes, l);
  }
  d.sum = _mm512_reduce_add_epi64(_mm512_add_epi64(sum_lo, sum_hi));
  return true;
}
#endif

// The VNNI path's digits: the AVX-512 version (every CPU that runs that path has AVX-512).
bool make_digits(const float* x, int64_t K, int64_t kp, Digits& d) {
#ifdef HFC_X86
  return make_digits_avx512(x, K, kp, d);
#else
  return make_digits_scalar(x, K, kp, d);
#endif
}

void rows_any(Isa isa, const float* x, int64_t m_count, int64_t K, const int8_t* q, int64_t n_begin,
              int64_t n_end, const float* scale, float* y, int64_t N) {
#ifdef HFC_X86
  if (isa != Isa::kScalar) {
    switch (m_count) {
      case 1: return rows_vector<1>(isa, x, K, q, n_begin, n_end, scale, y, N);
      case 2: return rows_vector<2>(isa, x, K, q, n_begin, n_end, scale, y, N);
      case 3: return rows_vector<3>(isa, x, K, q, n_begin, n_end, scale, y, N);
      default: return rows_vector<4>(isa, x, K, q, n_begin, n_end, scale, y, N);
    }
  }
#endif
  rows_scalar(x, m_count, K, q, n_begin, n_end, scale, y, N);
}

#ifdef HFC_X86
// ---- AVX2 integer path ----------------------------------------------------------------------------------
// AVX2 has no VNNI, and vpmaddubsw adds two u8 x s8 products into int16 with saturation, so the VNNI path's
// full-range digits (255 * 128 * 2 > 2^15) would overflow. Here each activation row is written in 14-bit
// fixed point, x_k ~ X_k 2^e with |X_k| <= 2^13, split as X = 128 h + l with h in [-64, 64], l in [-64, 63]:
// then u h and u l (u = q + 128 <= 255) pair sums stay below 2 * 255 * 64 = 32640 < 2^15, exact. The
// rounding of x to the 2^e grid (<= 2^-13 max|x| per element, finer than a bfloat16 activation's own
// 2^-9 |x|) is the only approximation; then
//   sum_k q_k X_k = 128 sum_k u_k h_k + sum_k u_k l_k - 128 sum_k X_k     (exact integers).
// Per 32 weights and row: 2 vpmaddubsw + 2 vpmaddwd + 2 vpaddd, against 16 uops for the float path.
struct Digits14 {
  std::vector<int8_t> bytes;  // (2, kp): h row, then l row (zero padded)
  int64_t sum = 0;            // sum_k X_k
  int exponent = 0;           // x_k ~ X_k 2^exponent
};
thread_local std::vector<Digits14> tls_digits14;

// False for a non-finite row (the float path then propagates it) or a scale outside float's normal range.
__attribute__((target("avx2,fma"))) bool make_digits14(const float* x, int64_t K, int64_t kp, Digits14& d) {
  const __m256 sign = _mm256_set1_ps(-0.f), big = _mm256_set1_ps(3.4028234663852886e38f);
  __m256 vmax = _mm256_setzero_ps();
  int finite = 0xff;
  int64_t i = 0;
  for (; i + 8 <= K; i += 8) {
    const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i));
    finite &= _mm256_movemask_ps(_mm256_cmp_ps(a, big, _CMP_LE_OQ));  // false for inf and NaN
    vmax = _mm256_max_ps(vmax, a);
  }
  if (finite != 0xff) return false;
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  float amax = _mm_cvtss_f32(m4);
  for (; i < K; ++i) {
    if (!std::isfinite(x[i])) return false;
    amax = std::max(amax, std::fabs(x[i]));
  }
  d.bytes.assign(static_cast<size_t>(2 * kp), 0);
  d.sum = 0;
  d.exponent = 0;
  if (amax == 0.f) return true;
  int top;
  std::frexp(amax, &top);  // amax < 2^top
  const int exponent = top - 13;
  if (-exponent < -126 || -exponent > 127) return false;
  d.exponent = exponent;
  const float inv = std::ldexp(1.0f, -exponent);  // exact scaling: |x 2^-e| < 2^13
  int8_t* high = d.bytes.data();
  int8_t* low = high + kp;
  int64_t sum = 0;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i c64 = _mm256_set1_epi32(64), c127 = _mm256_set1_epi32(127);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t k = 0;
  __m256i vsum = _mm256_setzero_si256();
  for (; k + 32 <= K; k += 32) {
    __m256i h[4], l[4];
    for (int i = 0; i < 4; ++i) {
      const __m256i X = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * i), vinv));  // half-even
      vsum = _mm256_add_epi32(vsum, X);
      l[i] = _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(X, c64), c127), c64);
      h[i] = _mm256_srai_epi32(_mm256_sub_epi32(X, l[i]), 7);
    }
    const __m256i hb = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(h[0], h[1]), _mm256_packs_epi32(h[2], h[3])), order);
    const __m256i lb = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(l[0], l[1]), _mm256_packs_epi32(l[2], l[3])), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(high + k), hb);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(low + k), lb);
  }
  int32_t lanes[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), vsum);
  for (int i = 0; i < 8; ++i) sum += lanes[i];
  for (; k < K; ++k) {
    const int32_t X = static_cast<int32_t>(std::nearbyint(x[k] * inv));
    const int32_t l = ((X + 64) & 127) - 64;
    high[k] = static_cast<int8_t>((X - l) >> 7);
    low[k] = static_cast<int8_t>(l);
    sum += X;
  }
  d.sum = sum;
  return true;
}

// One block of 4 weight rows against one activation row.
template <typename Out>
__attribute__((target("avx2,fma"))) void block_avx2_int(const Digits14& d, int64_t K, int64_t kp, const int8_t* q,
                                                        int64_t n0, int rows, const float* scale, Out* y) {
  __m256i acc_h[kRows], acc_l[kRows];
  for (int r = 0; r < kRows; ++r) acc_h[r] = acc_l[r] = _mm256_setzero_si256();
  const int8_t* w[kRows];
  for (int r = 0; r < kRows; ++r) w[r] = q + (n0 + (r < rows ? r : 0)) * K;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* high = d.bytes.data();
  const int8_t* low = high + kp;
  alignas(32) int8_t tail[kRows][32];
  for (int64_t k = 0; k < K; k += 32) {
    __m256i u[kRows];
    if (k + 32 <= K) {
      if ((k & 63) == 0)
        for (int r = 0; r < kRows; ++r) _mm_prefetch(prefetch_target(q, K, n0, r, k), _MM_HINT_T0);
      for (int r = 0; r < kRows; ++r)
        u[r] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + k)), flip);
    } else {  // the tail: padding bytes meet zero digits
      for (int r = 0; r < kRows; ++r) {
        std::memset(tail[r], 0, 32);
        std::memcpy(tail[r], w[r] + k, static_cast<size_t>(K - k));
        u[r] = _mm256_xor_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(tail[r])), flip);
      }
    }
    const __m256i dh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(high + k));
    const __m256i dl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(low + k));
    for (int r = 0; r < kRows; ++r) {
      acc_h[r] = _mm256_add_epi32(acc_h[r], _mm256_madd_epi16(_mm256_maddubs_epi16(u[r], dh), ones));
      acc_l[r] = _mm256_add_epi32(acc_l[r], _mm256_madd_epi16(_mm256_maddubs_epi16(u[r], dl), ones));
    }
  }
  const double unit = std::ldexp(1.0, d.exponent);
  for (int r = 0; r < rows; ++r) {
    int32_t hs[8], ls[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hs), acc_h[r]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ls), acc_l[r]);
    int64_t a = 0, b = 0;
    for (int i = 0; i < 8; ++i) {
      a += hs[i];
      b += ls[i];
    }
    // |a|, |b| <= 2 * 255 * 64 * K / 8 per lane < 2^31 for K < 65536 (checked by the caller).
    const int64_t dot = 128 * a + b - 128 * d.sum;  // sum_k q_k X_k, exact
    const double value = static_cast<double>(dot) * unit * static_cast<double>(scale[n0 + r]);
    y[n0 + r] = static_cast<Out>(static_cast<float>(value));
  }
}
#endif

// The integer paths' driver: y (M, N) in x's dtype, row blocks of kRows split over ATen's threads, and
// block(m, n0, rows, y_row_m) writing rows [n0, n0 + rows) of activation row m.
template <typename Block>
at::Tensor integer_rows(const at::Tensor& x, int64_t M, int64_t N, int64_t blocks, int64_t grain, bool bf16,
                        Block block) {
  at::Tensor out = at::empty({M, N}, x.options());  // written directly in x's dtype
  auto run = [&](auto* y) {
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n0 = b0 * kRows; n0 < std::min(N, b1 * kRows); n0 += kRows)
          block(m, n0, static_cast<int>(std::min<int64_t>(kRows, N - n0)), y + m * N);
    });
  };
  if (bf16)
    run(out.data_ptr<c10::BFloat16>());
  else
    run(out.data_ptr<float>());
  return out;
}

#ifdef HFC_X86
// Weight rows [n0, n0 + rows) of q (N, K) int8 widened to int16 into out (4 rows of kp, zero past K).
__attribute__((target("avx2,fma"))) void unpack_i16(const int8_t* q, int64_t K, int64_t kp, int64_t n0, int rows,
                                                   int16_t* out) {
  for (int r = 0; r < 4; ++r) {
    int16_t* dst = out + r * kp;
    int64_t k = 0;
    if (r < rows) {
      const int8_t* src = q + (n0 + r) * K;
      for (; k + 16 <= K; k += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k),
                            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
      for (; k < K; ++k) dst[k] = src[k];
    }
    std::fill(dst + k, dst + kp, int16_t{0});
  }
}
#endif

// isa: -1 = the best the CPU has; 0 = portable loop, 1 = AVX2, 2 = AVX-512, 3 = AVX-512 VNNI (for tests).
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, int64_t isa_request) {
  Isa isa = hfc::resolve_isa(isa_request, "int8_gemv");
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scale.device().is_cpu(),
              "hfcompress::int8_gemv runs on CPU tensors");
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1),
              "hfcompress::int8_gemv: x (M, K) and q (N, K) must agree on K, got ", x.sizes(), " and ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kChar, "hfcompress::int8_gemv: q must be int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == q.size(0),
              "hfcompress::int8_gemv: scale must be float32 with one value per weight row");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "hfcompress::int8_gemv: x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  const at::Tensor qc = q.contiguous();
  const at::Tensor sc = scale.contiguous();
  const at::Tensor xc = x.contiguous();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  // Activations in float32 (K values per row, negligible next to the N*K weights): float32 input is read
  // in place, bfloat16 converted into this thread's scratch buffer.
  const float* xf = nullptr;
  if (bf16) {
    tls_x.resize(static_cast<size_t>(M * K));
    const c10::BFloat16* src = xc.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < M * K; ++i) tls_x[i] = static_cast<float>(src[i]);
    xf = tls_x.data();
  } else {
    xf = xc.data_ptr<float>();
  }
  const int8_t* qp = qc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  if (M >= hfc::kGemmMinRows) {
    // Prefill: tiles of q * scale (bfloat16 where the CPU multiplies it natively) into ATen's GEMM, else the
    // integer GEMM of common.h (int16 activations in blocks of 128; float32 tiles if HFCOMPRESS_PREFILL=float).
    at::Tensor yf = at::empty({M, N}, x.options().dtype(at::kFloat));
    const bool bf16_tiles = bf16 && hfc::native_bf16_gemm(isa);
#ifdef HFC_X86
    if (!bf16_tiles && isa != Isa::kScalar && hfc::integer_prefill()) {
      hfc::I16Activations& a = hfc::i16_scratch();
      hfc::quantize_i16(xf, M, K, 128, a);
      hfc::i16_gemm(
          a, M, N, yf.data_ptr<float>(),
          [&](int64_t n0, int rows, int16_t* out) { unpack_i16(qp, K, a.kp, n0, rows, out); },
          [&](int64_t n, float* s) { std::fill(s, s + a.blocks, sp[n]); });
      hfc::release_if_large(a);
      return bf16 ? yf.to(x.scalar_type()) : yf;
    }
#endif
    const at::Tensor xg =
        bf16_tiles ? xc : at::from_blob(const_cast<float*>(xf), {M, K}, x.options().dtype(at::kFloat));
    hfc::tiled_gemm(xg, N, yf.data_ptr<float>(), bf16_tiles, [&](int64_t n0, int64_t count, float* tile) {
      for (int64_t i = 0; i < count; ++i) {
        const int8_t* row = qp + (n0 + i) * K;
        const float s = sp[n0 + i];
        for (int64_t k = 0; k < K; ++k) tile[i * K + k] = static_cast<float>(row[k]) * s;
      }
    });
    return bf16 ? yf.to(x.scalar_type()) : yf;
  }
  // Blocks of kRows rows; ~64 KiB of weights per task keeps the split cheap next to the work.
  const int64_t blocks = (N + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, K * kRows));
#ifdef HFC_X86
  if (isa == Isa::kVnni && K < 65536) {
    const int64_t kp = (K + 63) / 64 * 64;
    if (tls_digits.size() < static_cast<size_t>(M)) tls_digits.resize(static_cast<size_t>(M));
    bool finite = true;
    for (int64_t m = 0; m < M && finite; ++m) finite = make_digits(xf + m * K, K, kp, tls_digits[m]);
    if (finite) {
      // The digits live in the calling thread's storage; the worker threads only read them.
      const Digits* digits = tls_digits.data();
      return integer_rows(x, M, N, blocks, grain, bf16, [&](int64_t m, int64_t n0, int rows, auto* y) {
        block_vnni(digits[m], K, kp, qp, n0, rows, sp, y);
      });
    }
  }
  if (isa == Isa::kAvx2 && K < 65536) {
    const int64_t kp = (K + 31) / 32 * 32;
    if (tls_digits14.size() < static_cast<size_t>(M)) tls_digits14.resize(static_cast<size_t>(M));
    bool ok = true;
    for (int64_t m = 0; m < M && ok; ++m) ok = make_digits14(xf + m * K, K, kp, tls_digits14[m]);
    if (ok) {
      const Digits14* digits = tls_digits14.data();
      return integer_rows(x, M, N, blocks, grain, bf16, [&](int64_t m, int64_t n0, int rows, auto* y) {
        block_avx2_int(digits[m], K, kp, qp, n0, rows, sp, y);
      });
    }
  }
  if (isa == Isa::kVnni) isa = Isa::kAvx512;  // non-finite activations or huge K: the float path
#endif
  at::Tensor yf = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* y = yf.data_ptr<float>();
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t n_begin = b0 * kRows, n_end = std::min(N, b1 * kRows);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
      const int64_t m_count = std::min<int64_t>(kMaxM, M - m0);
      // Each pass writes rows m0.. of y; the offsets keep the (M, N) layout.
      rows_any(isa, xf + m0 * K, m_count, K, qp, n_begin, n_end, sp, y + m0 * N, N);
    }
  });
  return bf16 ? yf.to(x.scalar_type()) : yf;
}

}  // namespace

TORCH_LIBRARY(hfcompress, m) { m.def("int8_gemv(Tensor x, Tensor q, Tensor scale, int isa=-1) -> Tensor"); }

TORCH_LIBRARY_IMPL(hfcompress, CPU, m) { m.impl("int8_gemv", &int8_gemv); }
