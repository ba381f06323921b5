// Weight-only int8 matrix-vector kernel for decode on CPU.
//
//   y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]      x: (M, K) float32 or bfloat16, q: (N, K) int8
//
// Decode multiplies one activation row by every weight once, so the time is the time to stream the int8
// weights from memory. The kernel converts 16 (AVX-512) or 8 (AVX2) int8 weights at a time to float32 and
// accumulates with FMA in float32; a block of 4 weight rows shares each activation load, and up to 4
// activation rows share each weight load. Rows are split over ATen's thread pool. The instruction set is
// chosen at run time, so one build serves every x86-64 CPU; other CPUs take the portable loop.
//
// Registered as the operator ``hfcompress::int8_gemv`` (see kernels.py for how it is built and used).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HFC_X86 1
#endif

namespace {

constexpr int kRows = 4;   // weight rows per block
constexpr int kMaxM = 4;   // activation rows per pass

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

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

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
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

Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kScalar;
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

Isa cached_isa() {
#ifdef HFC_X86
  static const Isa isa = detect_isa();
  return isa;
#else
  return Isa::kScalar;
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

// isa: -1 = the best the CPU has; 0 = portable loop, 1 = AVX2, 2 = AVX-512 (for tests of each path).
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, int64_t isa_request) {
  const Isa best = cached_isa();
  TORCH_CHECK(isa_request >= -1 && isa_request <= static_cast<int64_t>(best),
              "hfcompress::int8_gemv: instruction set ", isa_request, " requested but this CPU supports up to ",
              static_cast<int>(best), " (0 = portable, 1 = AVX2, 2 = AVX-512)");
  const Isa isa = isa_request < 0 ? best : static_cast<Isa>(isa_request);
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
  // Activations in float32: K values per row, negligible next to the N*K weights.
  std::vector<float> xf(static_cast<size_t>(M * K));
  if (x.scalar_type() == at::kFloat) {
    const at::Tensor xc = x.contiguous();
    std::memcpy(xf.data(), xc.data_ptr<float>(), sizeof(float) * M * K);
  } else {
    const at::Tensor xc = x.contiguous();
    const c10::BFloat16* src = xc.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(src[i]);
  }
  at::Tensor yf = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* y = yf.data_ptr<float>();
  const int8_t* qp = qc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  // Blocks of kRows rows; ~64 KiB of weights per task keeps the split cheap next to the work.
  const int64_t blocks = (N + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, K * kRows));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t n_begin = b0 * kRows, n_end = std::min(N, b1 * kRows);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
      const int64_t m_count = std::min<int64_t>(kMaxM, M - m0);
      // Each pass writes rows m0.. of y; the offsets keep the (M, N) layout.
      rows_any(isa, xf.data() + m0 * K, m_count, K, qp, n_begin, n_end, sp, y + m0 * N, N);
    }
  });
  return x.scalar_type() == at::kFloat ? yf : yf.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(hfcompress, m) { m.def("int8_gemv(Tensor x, Tensor q, Tensor scale, int isa=-1) -> Tensor"); }

TORCH_LIBRARY_IMPL(hfcompress, CPU, m) { m.impl("int8_gemv", &int8_gemv); }
