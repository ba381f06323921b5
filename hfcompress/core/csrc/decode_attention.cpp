// Attention of one query token per head over a KV cache, with grouped K/V heads read in place:
//
//   out[b, h] = sum_l p_l V[b, h / G, l],   p = softmax_l(scale * q[b, h] . K[b, h / G, l] + mask[b, l])
//
// for H query heads over KVH = H / G key/value heads (grouped-query attention; G = 1 is plain multi-head).
// This is a decode step's attention: at one query row per head the arithmetic is tiny (H * L * (D + Dv)
// multiply-adds), and a library GEMM or flash-attention call spends more in its setup than in the work (ATen's
// CPU flash kernel ~40 us per layer at L = 128, two bmm ~36 us; this loop a few us). Positions the mask
// excludes (a static cache's unused tail) are skipped, not computed and then zeroed.
//
// mask: none, bool (B, L) (true = attend), or float (B, L) added to the scores (as SDPA takes them). Sums and
// the softmax run in float32 (float64 for float64 inputs); the output is in the query's dtype. A row whose
// every position is masked gives NaN, as softmax over all -inf does.
//
// Registered as ``hfcompress::decode_attention`` (see hfcompress/core/native.py).

#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

using hfc::Isa;

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

// Portable dot product and axpy (the reference the vector paths match up to summation order).
template <typename T, typename Acc>
Acc dot_scalar(const Acc* q, const T* k, int64_t n) {
  Acc s = 0;
  for (int64_t i = 0; i < n; ++i) s += q[i] * static_cast<Acc>(k[i]);
  return s;
}

template <typename T, typename Acc>
void axpy_scalar(Acc a, const T* v, Acc* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] += a * static_cast<Acc>(v[i]);
}

#ifdef HFC_X86
// 8 values of K or V as float32: float32 loaded, bfloat16 widened (its bits are the top half of a float32).
template <typename T>
__attribute__((target("avx2,fma"))) inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

template <typename T>
__attribute__((target("avx2,fma"))) float dot_avx2(const float* q, const T* k, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(k + i + 8), a1);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a0);
  float total = hfc::hsum256(_mm256_add_ps(a0, a1));
  for (; i < n; ++i) total += q[i] * to_float(k[i]);
  return total;
}

template <typename T>
__attribute__((target("avx2,fma"))) void axpy_avx2(float a, const T* v, float* out, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(av, load8(v + i), _mm256_loadu_ps(out + i)));
  for (; i < n; ++i) out[i] += a * to_float(v[i]);
}
#endif

#ifdef HFC_X86
// exp(x) for x <= 0 (scores minus their maximum), 8 lanes: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-7
// polynomial (Cephes' expf coefficients; relative error ~1e-7, below float32's rounding of the sums after it),
// times 2^n through the exponent bits. x below -87 (including -inf) gives 0 or a denormal-free tiny value.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

__attribute__((target("avx2,fma"))) void exp_shifted_avx2(const float* s, float* out, int64_t n, float top) {
  const __m256 t = _mm256_set1_ps(top);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + i), t)));
  for (; i < n; ++i) out[i] = std::exp(s[i] - top);
}
#endif

// out[l] = exp(s[l] - top) (s <= top; -inf gives 0): the softmax's numerators, vectorised on the AVX2 path.
template <typename Acc>
void exp_shifted(Isa isa, const Acc* s, Acc* out, int64_t n, Acc top) {
#ifdef HFC_X86
  if constexpr (std::is_same_v<Acc, float>) {
    if (isa != Isa::kScalar) return exp_shifted_avx2(s, out, n, top);
  }
#endif
  (void)isa;
  for (int64_t i = 0; i < n; ++i) out[i] = std::exp(s[i] - top);
}

template <typename T, typename Acc>
Acc dot(Isa isa, const Acc* q, const T* k, int64_t n) {
#ifdef HFC_X86
  if constexpr (std::is_same_v<Acc, float>) {
    if (isa != Isa::kScalar) return dot_avx2(q, k, n);
  }
#endif
  (void)isa;
  return dot_scalar<T, Acc>(q, k, n);
}

template <typename T, typename Acc>
void axpy(Isa isa, Acc a, const T* v, Acc* out, int64_t n) {
#ifdef HFC_X86
  if constexpr (std::is_same_v<Acc, float>) {
    if (isa != Isa::kScalar) return axpy_avx2(a, v, out, n);
  }
#endif
  (void)isa;
  axpy_scalar<T, Acc>(a, v, out, n);
}

template <typename T>
void run(Isa isa, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
         double scale, at::Tensor& out) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k.size(1), L = k.size(2), Dv = v.size(3), G = H / KVH;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const bool* mask_bool = mask && mask->scalar_type() == at::kBool ? mask->data_ptr<bool>() : nullptr;
  const at::Tensor mask_acc = mask && mask->scalar_type() != at::kBool
                                  ? mask->to(std::is_same_v<Acc, double> ? at::kDouble : at::kFloat).contiguous()
                                  : at::Tensor();
  const Acc* mask_add = mask_acc.defined() ? mask_acc.data_ptr<Acc>() : nullptr;
  // Heads per task: enough work (~16k multiply-adds) to be worth a thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, L * (D + Dv)));
  at::parallel_for(0, B * H, grain, [&](int64_t r0, int64_t r1) {
    std::vector<Acc> qf(static_cast<size_t>(D)), scores(static_cast<size_t>(L)), probs(static_cast<size_t>(L));
    std::vector<Acc> acc(static_cast<size_t>(Dv));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / H, h = r % H, kvh = h / G;
      const T* qrow = qp + r * D;
      for (int64_t i = 0; i < D; ++i) qf[i] = static_cast<Acc>(qrow[i]) * static_cast<Acc>(scale);
      const T* kb = kp + (b * KVH + kvh) * L * D;
      const T* vb = vp + (b * KVH + kvh) * L * Dv;
      Acc top = -std::numeric_limits<Acc>::infinity();
      for (int64_t l = 0; l < L; ++l) {
        if (mask_bool && !mask_bool[b * L + l]) {
          scores[l] = -std::numeric_limits<Acc>::infinity();
          continue;
        }
        Acc s = dot<T, Acc>(isa, qf.data(), kb + l * D, D);
        if (mask_add) s += mask_add[b * L + l];
        scores[l] = s;
        top = std::max(top, s);
      }
      std::fill(acc.begin(), acc.end(), Acc(0));
      Acc total = 0;
      if (top == -std::numeric_limits<Acc>::infinity()) {
        total = std::numeric_limits<Acc>::quiet_NaN();  // nothing to attend: NaN, like softmax of all -inf
      } else {
        exp_shifted<Acc>(isa, scores.data(), probs.data(), L, top);  // probs[l] = exp(scores[l] - top)
        for (int64_t l = 0; l < L; ++l) {
          if (scores[l] == -std::numeric_limits<Acc>::infinity()) continue;  // masked: skipped, not zeroed
          total += probs[l];
          axpy<T, Acc>(isa, probs[l], vb + l * Dv, acc.data(), Dv);
        }
      }
      T* orow = op + r * Dv;
      for (int64_t i = 0; i < Dv; ++i) orow[i] = static_cast<T>(acc[i] / total);
    }
  });
}

// isa: -1 = the best the CPU has; 0 portable; 1 and up AVX2 (+ FMA).
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& mask, double scale, int64_t isa_request) {
  const Isa isa = hfc::resolve_isa(isa_request, "decode_attention");
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu() && value.device().is_cpu(),
              "hfcompress::decode_attention runs on CPU tensors");
  TORCH_CHECK(query.dim() == 3 && key.dim() == 4 && value.dim() == 4,
              "hfcompress::decode_attention: query (B, H, D), key (B, KVH, L, D), value (B, KVH, L, Dv)");
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
              "hfcompress::decode_attention: query, key and value must share a dtype");
  const int64_t B = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t KVH = key.size(1), L = key.size(2);
  TORCH_CHECK(key.size(0) == B && value.size(0) == B && key.size(3) == D && value.size(1) == KVH &&
                  value.size(2) == L && KVH > 0 && H % KVH == 0,
              "hfcompress::decode_attention: shapes do not match: query ", query.sizes(), ", key ", key.sizes(),
              ", value ", value.sizes());
  if (mask) {
    TORCH_CHECK(mask->device().is_cpu() && mask->dim() == 2 && mask->size(0) == B && mask->size(1) == L,
                "hfcompress::decode_attention: mask must be (B, L) = (", B, ", ", L, "), got ", mask->sizes());
  }
  const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const std::optional<at::Tensor> m =
      mask ? std::optional<at::Tensor>(mask->contiguous()) : std::optional<at::Tensor>();
  at::Tensor out = at::empty({B, H, value.size(3)}, query.options());
  switch (query.scalar_type()) {
    case at::kFloat: run<float>(isa, q, k, v, m, scale, out); break;
    case at::kBFloat16: run<c10::BFloat16>(isa, q, k, v, m, scale, out); break;
    case at::kDouble: run<double>(isa, q, k, v, m, scale, out); break;
    default: TORCH_CHECK(false, "hfcompress::decode_attention: float32, bfloat16 or float64, got ", query.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hfcompress, m) {
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale, int isa=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(hfcompress, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
