// Weight-only int4 matrix multiply on CPU (group-wise scales, symmetric or with a zero point).
//
//   y[m, n] = sum_k x[m, k] * W[n, k],   W[n, k] = (u[n, k] - c[n, g]) * s[n, g],   g = k / group_size
//
// with unsigned 4-bit codes u in [0, 15] (a signed code q in [-8, 7] is u - 8), per-group float32 scales s and
// offsets c = 8 + zero_point (c = 8 for symmetric weights). x is float32 or bfloat16, y in x's dtype.
//
// Decode (few rows) streams the packed weights once, so its time is the time to read half a byte per weight,
// and the work per byte must keep up with memory. The activations are quantized to int8 in blocks of 32
// (X_k = round(x_k / d_b), d_b = max_block |x| / 127, as llama.cpp's Q8_0 does), which turns each block's dot
// product into exact integer arithmetic on 32 byte pairs:
//
//   sum_k x^_k W[n, k] = sum_g s[n, g] (sum_{b in g} d_b D[n, b]) - sum_g c[n, g] s[n, g] T_g
//   D[n, b] = sum_{k in b} u[n, k] X_k        (unsigned x signed bytes: AVX2 vpmaddubsw + vpmaddwd,
//                                               AVX-512 VNNI vpdpbusd; |D| <= 32 * 15 * 127, exact)
//   T_g     = sum_{b in g} d_b sum_{k in b} X_k   (per activation row, once per call)
//
// Error: x^_k = d_b X_k differs from x_k by at most d_b / 2 = max_block |x| / 254, so
// |y - x W.T| <= sum_b (max_b |x| / 254) sum_{k in b} |W[n, k]|, plus float32 rounding of the sums (the test
// derives its tolerance from exactly this). Non-finite activations give non-finite outputs.
//
// Layout (built by int4_pack from the checkpoint's codes at load): rows in blocks of 4, K in chunks of 64;
// chunk c of row block r holds, for each of its 4 rows, 32 bytes whose low nibbles are k = 64c .. 64c + 31 and
// high nibbles k = 64c + 32 .. 64c + 63 (one AND and one shift give two activation blocks' worth of bytes).
// A row block's chunks are contiguous and row blocks follow each other, so a thread reads one sequential
// stream. N is padded to a multiple of 4 and K to a multiple of 64 (padding codes meet zero activations).
//
// Many rows (prefill, M >= kGemmMinRows): where bfloat16 is native (and x is bfloat16), tiles of weight rows are
// dequantized to bfloat16 and multiplied with ATen's GEMM; elsewhere the integer GEMM of common.h (int16
// activations per block of the group, vpmaddwd against widened codes u - c) runs, or float32 tiles with
// HFCOMPRESS_PREFILL=float.
//
// Registered as ``hfcompress::int4_gemv`` and ``hfcompress::int4_pack`` (see hfcompress/core/native.py).

#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>

#include "common.h"

namespace {

using hfc::Isa;
#ifdef HFC_X86
using hfc::hsum256;
#endif

constexpr int kRows = 4;       // weight rows per block
constexpr int kChunk = 64;     // K per chunk (two activation blocks)
constexpr int kBlock = 32;     // activations per int8 block
constexpr int64_t kPrefetch = 2048;  // bytes ahead in the weight stream

// One activation row, quantized: X (kp int8, zero padded), d (kp / 32 block scales), t (G group sums).
struct QuantRow {
  std::vector<int8_t> X;
  std::vector<float> d;
  std::vector<float> t;
};

thread_local std::vector<QuantRow> tls_rows;
thread_local std::vector<float> tls_x;

// Quantize one row (portable; every path uses this arithmetic, so all paths see the same X and d).
// The block scale is max|x| / 127 and X = round-half-even(x * (1 / d)); a block of zeros has d = 0, X = 0.
void quantize_row_scalar(const float* x, int64_t K, int64_t kp, int64_t blocks_per_group, QuantRow& r) {
  const int64_t blocks = kp / kBlock;
  r.X.assign(static_cast<size_t>(kp), 0);
  r.d.assign(static_cast<size_t>(blocks), 0.f);
  const int64_t groups = (blocks + blocks_per_group - 1) / blocks_per_group;
  r.t.assign(static_cast<size_t>(groups), 0.f);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k0 = b * kBlock, k1 = std::min<int64_t>(K, k0 + kBlock);
    float amax = 0.f;
    bool finite = true;
    for (int64_t k = k0; k < k1; ++k) {
      finite &= std::isfinite(x[k]);
      amax = std::max(amax, std::fabs(x[k]));
    }
    if (!finite) {  // inf or NaN: make it show in the output
      r.d[b] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float d = amax / 127.f;
    const float inv = d != 0.f ? 1.f / d : 0.f;
    int32_t sum = 0;
    for (int64_t k = k0; k < k1; ++k) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(x[k] * inv));
      r.X[k] = static_cast<int8_t>(v);
      sum += v;
    }
    r.d[b] = d;
    r.t[b / blocks_per_group] += d * static_cast<float>(sum);
  }
}

#ifdef HFC_X86
// The same quantization with AVX2 (bitwise identical: the same float operations, and vcvtps2dq rounds half
// to even like nearbyint under the default rounding mode).
__attribute__((target("avx2,fma"))) void quantize_row_avx2(const float* x, int64_t K, int64_t kp,
                                                           int64_t blocks_per_group, QuantRow& r) {
  if (K % kBlock) return quantize_row_scalar(x, K, kp, blocks_per_group, r);
  const int64_t blocks = kp / kBlock;
  r.X.resize(static_cast<size_t>(kp));
  r.d.resize(static_cast<size_t>(blocks));
  const int64_t groups = (blocks + blocks_per_group - 1) / blocks_per_group;
  r.t.assign(static_cast<size_t>(groups), 0.f);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 big = _mm256_set1_ps(3.4028234663852886e38f);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k0 = b * kBlock;
    if (k0 >= K) {
      std::memset(r.X.data() + k0, 0, kBlock);
      r.d[b] = 0.f;
      continue;
    }
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + k0 + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));  // max_ps drops NaN: checked below
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float am = _mm_cvtss_f32(m4);
    bool finite = am <= 3.4028234663852886e38f;
    for (int i = 0; i < 4; ++i)
      finite &= _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, v[i]), big, _CMP_LE_OQ)) == 0xff;
    if (!finite) {
      std::memset(r.X.data() + k0, 0, kBlock);
      r.d[b] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float d = am / 127.f;
    const __m256 inv = _mm256_set1_ps(d != 0.f ? 1.f / d : 0.f);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
    // int32 -> int8 with the lane order restored (packs work within 128-bit lanes).
    const __m256i w01 = _mm256_packs_epi32(q[0], q[1]), w23 = _mm256_packs_epi32(q[2], q[3]);
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23),
                                                      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r.X.data() + k0), bytes);
    const __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 1));
    r.d[b] = d;
    r.t[b / blocks_per_group] += d * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
}
#endif

void quantize_row(Isa isa, const float* x, int64_t K, int64_t kp, int64_t blocks_per_group, QuantRow& r) {
#ifdef HFC_X86
  if (isa != Isa::kScalar) return quantize_row_avx2(x, K, kp, blocks_per_group, r);
#endif
  quantize_row_scalar(x, K, kp, blocks_per_group, r);
}

struct Weights {
  const uint8_t* packed;  // (N4 / 4, kp / 64, 4, 32)
  const float* scale;     // (N, G)
  const float* offset;    // (N, G) c * s, or nullptr: 8 * s
  int64_t N, K, kp, G, blocks_per_group;
};

// sum_g c[n, g] s[n, g] T_g: the offsets' share, subtracted from the integer part.
inline float offset_term(const Weights& w, int64_t n, const QuantRow& r) {
  float total = 0.f;
  const float* s = w.offset ? w.offset + n * w.G : w.scale + n * w.G;
  for (int64_t g = 0; g < w.G; ++g) total += s[g] * r.t[g];
  return w.offset ? total : 8.f * total;
}

// Portable loop: the reference for the vector paths (same quantized activations, plain sums).
void rows_scalar(const Weights& w, const QuantRow* rows, int64_t M, int64_t n_begin, int64_t n_end, float* y) {
  const int64_t chunks = w.kp / kChunk;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* base = w.packed + (n / kRows) * chunks * kChunk * kRows / 2 + (n % kRows) * 32;
    for (int64_t m = 0; m < M; ++m) {
      const QuantRow& r = rows[m];
      float acc = 0.f, acc_group = 0.f;
      for (int64_t b = 0; b < w.kp / kBlock; ++b) {
        const uint8_t* bytes = base + (b / 2) * kChunk * kRows / 2;
        int32_t dot = 0;
        for (int j = 0; j < kBlock; ++j) {
          const int u = (b & 1) ? bytes[j] >> 4 : bytes[j] & 15;
          dot += u * r.X[b * kBlock + j];
        }
        acc_group += r.d[b] * static_cast<float>(dot);
        if ((b + 1) % w.blocks_per_group == 0 || b + 1 == w.kp / kBlock) {
          acc += w.scale[n * w.G + std::min(w.G - 1, b / w.blocks_per_group)] * acc_group;
          acc_group = 0.f;
        }
      }
      y[m * w.N + n] = acc - offset_term(w, n, r);
    }
  }
}

#ifdef HFC_X86
// End of a weight group: acc += s[n, group] * acc_group, acc_group = 0 (padding blocks past K count as the
// last group's; their activations are zero).
template <int M>
__attribute__((target("avx2,fma"))) inline void close_group_avx2(const Weights& w, int64_t n0, int64_t group,
                                                                 __m256 (&acc)[M][kRows],
                                                                 __m256 (&acc_group)[M][kRows]) {
  const int64_t g = std::min(group, w.G - 1);
  for (int r = 0; r < kRows; ++r) {
    const int64_t n = std::min(n0 + r, w.N - 1);
    const __m256 s = _mm256_set1_ps(w.scale[n * w.G + g]);
    for (int m = 0; m < M; ++m) {
      acc[m][r] = _mm256_fmadd_ps(acc_group[m][r], s, acc[m][r]);
      acc_group[m][r] = _mm256_setzero_ps();
    }
  }
}

template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline void close_group_vnni(
    const Weights& w, int64_t n0, int64_t group, __m512 (&acc)[M][2], __m512 (&acc_group)[M][2]) {
  const int64_t g = std::min(group, w.G - 1);
  for (int p = 0; p < 2; ++p) {  // lanes 0-7: row n0 + 2p, lanes 8-15: row n0 + 2p + 1
    const int64_t na = std::min(n0 + 2 * p, w.N - 1), nb = std::min(n0 + 2 * p + 1, w.N - 1);
    const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(w.scale[na * w.G + g]), 0xff00,
                                        _mm512_set1_ps(w.scale[nb * w.G + g]));
    for (int m = 0; m < M; ++m) {
      acc[m][p] = _mm512_fmadd_ps(acc_group[m][p], s, acc[m][p]);
      acc_group[m][p] = _mm512_setzero_ps();
    }
  }
}

// AVX2: one row block (4 rows) against M activation rows; per 32 weights and row: vpmaddubsw (u x X, pairs to
// int16: |2 * 15 * 127| < 2^15, no saturation), vpmaddwd (to int32), convert, FMA with the block scale.
template <int M>
__attribute__((target("avx2,fma"))) void block_avx2(const Weights& w, const QuantRow* rows, int64_t rb, float* y) {
  const int64_t chunks = w.kp / kChunk;
  const uint8_t* base = w.packed + rb * chunks * (kChunk * kRows / 2);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[M][kRows], acc_group[M][kRows];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < kRows; ++r) acc[m][r] = acc_group[m][r] = _mm256_setzero_ps();
  int64_t left = w.blocks_per_group, group = 0;
  const int64_t n0 = rb * kRows;
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* p = base + c * (kChunk * kRows / 2);
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch + 64), _MM_HINT_T0);
    __m256i lo[kRows], hi[kRows];
    for (int r = 0; r < kRows; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * r));
      lo[r] = _mm256_and_si256(v, low4);
      hi[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    }
    for (int half = 0; half < 2; ++half) {
      const int64_t b = 2 * c + half;
      for (int m = 0; m < M; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[m].X.data() + b * kBlock));
        const __m256 d = _mm256_broadcast_ss(rows[m].d.data() + b);
        for (int r = 0; r < kRows; ++r) {
          const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(half ? hi[r] : lo[r], xv), ones);
          acc_group[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), d, acc_group[m][r]);
        }
      }
      if (--left == 0) {
        close_group_avx2<M>(w, n0, group++, acc, acc_group);
        left = w.blocks_per_group;
      }
    }
  }
  if (left != w.blocks_per_group) close_group_avx2<M>(w, n0, group, acc, acc_group);
  for (int r = 0; r < kRows && n0 + r < w.N; ++r)
    for (int m = 0; m < M; ++m) y[m * w.N + n0 + r] = hsum256(acc[m][r]) - offset_term(w, n0 + r, rows[m]);
}

// AVX-512 VNNI: a 64-byte load holds two rows' 32 bytes; after the AND / shift, one vpdpbusd multiplies 64
// codes (32 of each row) by the activation block broadcast to both halves, so lanes 0-7 sum row r and lanes
// 8-15 row r + 1, and one block scale serves the whole vector.
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void block_vnni(const Weights& w,
                                                                               const QuantRow* rows, int64_t rb,
                                                                               float* y) {
  const int64_t chunks = w.kp / kChunk;
  const uint8_t* base = w.packed + rb * chunks * (kChunk * kRows / 2);
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  __m512 acc[M][2], acc_group[M][2];
  for (int m = 0; m < M; ++m)
    for (int p = 0; p < 2; ++p) acc[m][p] = acc_group[m][p] = _mm512_setzero_ps();
  int64_t left = w.blocks_per_group, group = 0;
  const int64_t n0 = rb * kRows;
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* p = base + c * (kChunk * kRows / 2);
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch + 64), _MM_HINT_T0);
    __m512i lo[2], hi[2];
    for (int q = 0; q < 2; ++q) {
      const __m512i v = _mm512_loadu_si512(p + 64 * q);
      lo[q] = _mm512_and_si512(v, low4);
      hi[q] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    }
    for (int half = 0; half < 2; ++half) {
      const int64_t b = 2 * c + half;
      for (int m = 0; m < M; ++m) {
        const __m512i xv = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[m].X.data() + b * kBlock)));
        const __m512 d = _mm512_set1_ps(rows[m].d[b]);
        for (int q = 0; q < 2; ++q) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), half ? hi[q] : lo[q], xv);
          acc_group[m][q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), d, acc_group[m][q]);
        }
      }
      if (--left == 0) {
        close_group_vnni<M>(w, n0, group++, acc, acc_group);
        left = w.blocks_per_group;
      }
    }
  }
  if (left != w.blocks_per_group) close_group_vnni<M>(w, n0, group, acc, acc_group);
  for (int m = 0; m < M; ++m) {
    for (int q = 0; q < 2; ++q) {
      const __m256 a = _mm512_castps512_ps256(acc[m][q]);
      const __m256 b = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[m][q]), 1));
      const float sums[2] = {hsum256(a), hsum256(b)};
      for (int i = 0; i < 2; ++i) {
        const int64_t n = n0 + 2 * q + i;
        if (n < w.N) y[m * w.N + n] = sums[i] - offset_term(w, n, rows[m]);
      }
    }
  }
}
#endif

void row_blocks(Isa isa, const Weights& w, const QuantRow* rows, int64_t M, int64_t rb_begin, int64_t rb_end,
                float* y) {
#ifdef HFC_X86
  if (isa == Isa::kVnni) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t count = std::min<int64_t>(4, M - m0);
      for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
        float* ym = y + m0 * w.N;
        switch (count) {
          case 1: block_vnni<1>(w, rows + m0, rb, ym); break;
          case 2: block_vnni<2>(w, rows + m0, rb, ym); break;
          case 3: block_vnni<3>(w, rows + m0, rb, ym); break;
          default: block_vnni<4>(w, rows + m0, rb, ym); break;
        }
      }
    }
    return;
  }
  if (isa != Isa::kScalar) {  // AVX2, and AVX-512 without VNNI
    for (int64_t m0 = 0; m0 < M; m0 += 2) {
      const int64_t count = std::min<int64_t>(2, M - m0);
      for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
        if (count == 1)
          block_avx2<1>(w, rows + m0, rb, y + m0 * w.N);
        else
          block_avx2<2>(w, rows + m0, rb, y + m0 * w.N);
      }
    }
    return;
  }
#endif
  rows_scalar(w, rows, M, rb_begin * kRows, std::min(w.N, rb_end * kRows), y);
}

// The group's offset c (8 for symmetric weights; c s is stored rounded, c an integer in [0, 16]).
inline int16_t group_offset(const Weights& w, int64_t n, int64_t g) {
  if (!w.offset) return 8;
  const float s = w.scale[n * w.G + g];
  return static_cast<int16_t>(s != 0.f ? std::nearbyint(w.offset[n * w.G + g] / s) : 0.f);
}

// Weight rows [n0, n0 + count) as float32 (count, K): (u - c) s, an exact integer difference and one rounding
// (what kernels.dequantize computes). Runs of 32 codes share a block and so a group: plain loops that vectorise.
void dequantize_rows(const Weights& w, int64_t n0, int64_t count, float* out) {
  const int64_t chunks = w.kp / kChunk;
  const int64_t blocks = (w.K + kBlock - 1) / kBlock;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = n0 + i;
    const uint8_t* base = w.packed + (n / kRows) * chunks * (kChunk * kRows / 2) + (n % kRows) * 32;
    const float* s = w.scale + n * w.G;
    float* row = out + i * w.K;
    float lanes[kBlock];
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t g = std::min(w.G - 1, b / w.blocks_per_group);
      const float sg = s[g];
      const float cg = group_offset(w, n, g);
      const uint8_t* bytes = base + (b / 2) * (kChunk * kRows / 2);
      const int shift = (b & 1) ? 4 : 0;
      for (int j = 0; j < kBlock; ++j) lanes[j] = (static_cast<float>((bytes[j] >> shift) & 15) - cg) * sg;
      const int64_t k0 = b * kBlock, len = std::min<int64_t>(kBlock, w.K - k0);
      std::memcpy(row + k0, lanes, static_cast<size_t>(len) * sizeof(float));
    }
  }
}

#ifdef HFC_X86
// Weight rows [n0, n0 + rows) (n0 a multiple of 4) as int16 codes u - c into out (4 rows of kp), for i16_gemm.
__attribute__((target("avx2,fma"))) void unpack_i16(const Weights& w, int64_t n0, int rows, int16_t* out) {
  const int64_t chunks = w.kp / kChunk;
  const uint8_t* base = w.packed + (n0 / kRows) * chunks * (kChunk * kRows / 2);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  for (int r = 0; r < kRows; ++r) {
    int16_t* row = out + r * w.kp;
    if (r >= rows) {
      std::fill(row, row + w.kp, int16_t{0});
      continue;
    }
    const int64_t n = n0 + r;
    for (int64_t c = 0; c < chunks; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + c * (kChunk * kRows / 2) + 32 * r));
      const __m256i halves[2] = {_mm256_and_si256(v, low4), _mm256_and_si256(_mm256_srli_epi16(v, 4), low4)};
      for (int h = 0; h < 2; ++h) {
        const int64_t k0 = c * kChunk + h * kBlock;
        const __m256i off = _mm256_set1_epi16(group_offset(w, n, std::min(w.G - 1, k0 / kBlock / w.blocks_per_group)));
        const __m256i a = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(halves[h])), off);
        const __m256i b = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(halves[h], 1)), off);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + k0), a);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + k0 + 16), b);
      }
    }
  }
}

// Prefill without native bfloat16: the integer GEMM of common.h (int16 activations, in blocks of the weight
// group where that is <= 256 columns, else of 128 (per channel) or the largest power of two <= 256 dividing it).
void prefill_i16(const Weights& w, const float* xf, int64_t M, float* y) {
  const int64_t group = w.blocks_per_group * kBlock;
  int64_t ab = 128;
  if (w.G > 1) {
    ab = group;
    for (const int64_t size : {256, 128, 64, 32})
      if (ab > 256 && group % size == 0) ab = size;  // group is a multiple of 32
  }
  hfc::I16Activations& a = hfc::i16_scratch();
  hfc::quantize_i16(xf, M, w.K, ab, a, kChunk);
  hfc::i16_gemm(
      a, M, w.N, y, [&](int64_t n0, int rows, int16_t* out) { unpack_i16(w, n0, rows, out); },
      [&](int64_t n, float* s) {
        for (int64_t b = 0; b < a.blocks; ++b) s[b] = w.scale[n * w.G + std::min(w.G - 1, b * ab / group)];
      });
  hfc::release_if_large(a);
}
#endif

// isa: -1 = the best the CPU has; 0 portable, 1 AVX2, 2 AVX-512 (runs the AVX2 code), 3 AVX-512 VNNI.
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                     const std::optional<at::Tensor>& offset, int64_t out_features, int64_t group_size,
                     int64_t isa_request) {
  const Isa isa = hfc::resolve_isa(isa_request, "int4_gemv");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && scale.device().is_cpu(),
              "hfcompress::int4_gemv runs on CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "hfcompress::int4_gemv: x must be float32 or bfloat16");
  TORCH_CHECK(x.dim() == 2, "hfcompress::int4_gemv: x must be (M, K)");
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  const int64_t kp = (K + kChunk - 1) / kChunk * kChunk, chunks = kp / kChunk, n4 = (N + kRows - 1) / kRows;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 4 && packed.size(0) == n4 &&
                  packed.size(1) == chunks && packed.size(2) == kRows && packed.size(3) == 32,
              "hfcompress::int4_gemv: packed must be uint8 (", n4, ", ", chunks, ", 4, 32) for N = ", N, ", K = ", K,
              " (from int4_pack), got ", packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(group_size > 0 && (group_size % kBlock == 0 || group_size >= K),
              "hfcompress::int4_gemv: group_size must be a multiple of 32 or cover all of K, got ", group_size);
  const int64_t blocks_per_group = group_size >= K ? kp / kBlock : group_size / kBlock;
  const int64_t G = group_size >= K ? 1 : (K + group_size - 1) / group_size;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 2 && scale.size(0) == N && scale.size(1) == G,
              "hfcompress::int4_gemv: scale must be float32 (", N, ", ", G, "), got ", scale.sizes());
  TORCH_CHECK(!offset.has_value() || (offset->scalar_type() == at::kFloat && offset->sizes() == scale.sizes()),
              "hfcompress::int4_gemv: offset must be float32 like scale");
  TORCH_CHECK(K < (int64_t{1} << 24), "hfcompress::int4_gemv: K too large");
  const at::Tensor xc = x.contiguous(), pc = packed.contiguous(), sc = scale.contiguous();
  const at::Tensor oc = offset.has_value() ? offset->contiguous() : at::Tensor();
  const Weights w{pc.data_ptr<uint8_t>(), sc.data_ptr<float>(), offset.has_value() ? oc.data_ptr<float>() : nullptr,
                  N, K, kp, G, blocks_per_group};
  const float* xf = M >= hfc::kGemmMinRows && x.scalar_type() == at::kBFloat16 && hfc::native_bf16_gemm(isa)
                        ? nullptr : hfc::as_float(xc, tls_x);
  at::Tensor yf = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* y = yf.data_ptr<float>();
  if (M >= hfc::kGemmMinRows) {
    const bool bf16_tiles = x.scalar_type() == at::kBFloat16 && hfc::native_bf16_gemm(isa);
#ifdef HFC_X86
    if (!bf16_tiles && isa != Isa::kScalar && hfc::integer_prefill()) {
      prefill_i16(w, xf, M, y);
      return x.scalar_type() == at::kFloat ? yf : yf.to(x.scalar_type());
    }
#endif
    const at::Tensor xg =
        bf16_tiles ? xc : at::from_blob(const_cast<float*>(xf), {M, K}, x.options().dtype(at::kFloat));
    hfc::tiled_gemm(xg, N, y, bf16_tiles,
                    [&](int64_t n0, int64_t count, float* tile) { dequantize_rows(w, n0, count, tile); });
  } else {
    if (tls_rows.size() < static_cast<size_t>(M)) tls_rows.resize(static_cast<size_t>(M));
    for (int64_t m = 0; m < M; ++m) quantize_row(isa, xf + m * K, K, kp, blocks_per_group, tls_rows[m]);
    const QuantRow* rows = tls_rows.data();  // the caller's storage; the workers only read it
    // ~64 KiB of packed weights per task.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (kp * kRows / 2));
    at::parallel_for(0, n4, grain, [&](int64_t b0, int64_t b1) { row_blocks(isa, w, rows, M, b0, b1, y); });
  }
  return x.scalar_type() == at::kFloat ? yf : yf.to(x.scalar_type());
}

// Signed codes q (N, K) int8 in [-8, 7] -> the packed layout above (uint8 (ceil(N/4), ceil(K/64), 4, 32)).
at::Tensor int4_pack(const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kChar && q.dim() == 2,
              "hfcompress::int4_pack: q must be an int8 (N, K) CPU tensor");
  const at::Tensor qc = q.contiguous();
  const int64_t N = q.size(0), K = q.size(1);
  const int64_t chunks = (K + kChunk - 1) / kChunk, n4 = (N + kRows - 1) / kRows;
  at::Tensor out = at::zeros({n4, chunks, kRows, 32}, q.options().dtype(at::kByte));
  const int8_t* src = qc.data_ptr<int8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t n = 0; n < N; ++n) {  // checked first, so the packing loop below is plain
    const int8_t* row = src + n * K;
    bool ok = true;
    for (int64_t k = 0; k < K; ++k) ok &= row[k] >= -8 && row[k] <= 7;
    if (!ok) {
      for (int64_t k = 0; k < K; ++k)
        TORCH_CHECK(row[k] >= -8 && row[k] <= 7, "hfcompress::int4_pack: code ", static_cast<int>(row[k]), " at (",
                    n, ", ", k, ") is outside [-8, 7]");
    }
  }
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = src + n * K;
      for (int64_t c = 0; c * kChunk < K; ++c) {
        uint8_t* bytes = dst + (((n / kRows) * chunks + c) * kRows + n % kRows) * 32;
        for (int j = 0; j < 32; ++j) {
          const int64_t k_lo = c * kChunk + j, k_hi = k_lo + 32;
          const int lo = k_lo < K ? row[k_lo] + 8 : 0, hi = k_hi < K ? row[k_hi] + 8 : 0;
          bytes[j] = static_cast<uint8_t>(lo | (hi << 4));
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hfcompress, m) {
  m.def("int4_gemv(Tensor x, Tensor packed, Tensor scale, Tensor? offset, int out_features, int group_size, "
        "int isa=-1) -> Tensor");
  m.def("int4_pack(Tensor q) -> Tensor");
}

TORCH_LIBRARY_IMPL(hfcompress, CPU, m) {
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int4_pack", &int4_pack);
}
