// Fused next-token distillation loss and its gradient on CPU, one row (predicted position) at a time.
//
// For student logits a (V,) and teacher logits b (V,) of one row, temperature T, label y:
//
//   log q  = log_softmax(a / T)      log p = log_softmax(b / T)      log q1 = log_softmax(a)
//   kd     = T^2 D,  D = KL(p || q) (kind 0, forward), KL(q || p) (kind 1, reverse), or (kind 3) the
//            generalized JSD normalised by 1/(beta (1 - beta)):
//            KL(p || m) / (1 - beta) + KL(q || m) / beta,  m = beta p + (1 - beta) q;
//            kind 2: no teacher, kd = 0
//   ce     = -log q1[y]
//
// and, when need_grad, a is overwritten with the gradient of kd_weight * kd + ce_weight * ce w.r.t. a:
//
//   forward:  kd_weight T (q - p)                                  + ce_weight (q1 - e_y)
//   reverse:  kd_weight T q (log q - log p - D)                    + ce_weight (q1 - e_y)
//   JSD:      -(kd_weight T / beta) q (l - sum_w q_w l_w)          + ce_weight (q1 - e_y),   l = log(m / q)
//
// (For the JSD, dD/dq_v = log(q_v / m_v) / beta: the p/m and q/m terms of the two KLs cancel because
// beta p + (1 - beta) q = m; the softmax's Jacobian then subtracts the q-weighted mean, which is -KL(q || m) / beta.)
// log(m/p) and log(m/q) come from one log-add-exp per entry (see log_ratios_to_mixture).
//
// Eager PyTorch makes about ten passes over each (rows, V) buffer for this (two log_softmax, kl_div's
// exp/sub/mul, the sum, the gradient's exp/mul/exp/sub), each streaming megabytes through the caches. Here a
// row (32 KiB of float32 per model at V = 8192) is read three times while it stays in L2: its maximum, its
// sums of exponentials, then the divergence and the gradient in one sweep (reverse KL needs one more sweep,
// since its gradient needs D). Rows are split over ATen's OpenMP threads; each row is reduced by one thread
// in one order, so any thread count gives identical bits.
//
// Vectorisation: the loops are plain C++ under `#pragma omp simd` (reductions allowed without -ffast-math)
// with an exponential made of multiply-adds and integer bit operations, and the row function is compiled
// for AVX-512, AVX2+FMA and baseline x86-64 (one copy per target, picked per call by the isa argument). Accuracy:
// exp is within ~2 ulp of the true value; the sums are float32 (as ATen's own softmax), so results match
// the PyTorch path to float32 rounding, not bitwise.
//
// Registered as ``hfcompress::kd_logit_loss`` (see hfcompress/native.py for the build and
// hfcompress/distill/losses.py for its use).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "common.h"

namespace {

#define HFC_INLINE inline __attribute__((always_inline))

enum Kind : int64_t { kForward = 0, kReverse = 1, kNoTeacher = 2, kJsd = 3 };

// e^x for x <= 0 (every argument here is a logit minus its row maximum, or a log-probability). Cody-Waite
// reduction x = n ln2 + r with |r| <= ln2 / 2 and a degree-6 Taylor polynomial (truncation error r^7/7! <=
// 1.2e-7 relative), then the 2^n scale built in the exponent bits. Below log(FLT_MIN) it returns FLT_MIN,
// never a subnormal (their arithmetic is slow on x86, and ~1e-38 vs 0 cannot move a sum of probabilities);
// NaN stays NaN.
HFC_INLINE float exp_nonpositive(float x) {
  constexpr float kLogMin = -87.33654f;  // log(FLT_MIN)
  constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  x = x < kLogMin ? kLogMin : x;
  const float shifted = x * 1.44269504088896341f + kShifter;
  const float n = shifted - kShifter;
  const int32_t exponent = __builtin_bit_cast(int32_t, shifted) - __builtin_bit_cast(int32_t, kShifter);
  float r = x - n * 0.693359375f;  // ln2 high part: n * it is exact
  r = r + n * 2.12194440e-4f;       // minus n * (ln2 low part, which is negative)
  float poly = 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  return poly * __builtin_bit_cast(float, (exponent + 127) << 23);
}

// log(1 + x) for x in [0, 1]: 2 atanh(s) with s = x / (2 + x) in [0, 1/3], a series in s^2 whose truncation
// after s^15 is below 2e-9 relative; no cancellation for small x.
HFC_INLINE float log1p_unit(float x) {
  const float s = x / (2.0f + x);
  const float s2 = s * s;
  float poly = 1.0f / 15.0f;
  poly = poly * s2 + 1.0f / 13.0f;
  poly = poly * s2 + 1.0f / 11.0f;
  poly = poly * s2 + 1.0f / 9.0f;
  poly = poly * s2 + 1.0f / 7.0f;
  poly = poly * s2 + 1.0f / 5.0f;
  poly = poly * s2 + 1.0f / 3.0f;
  poly = poly * s2 + 1.0f;
  return 2.0f * s * poly;
}

// log(e^u + e^v)
HFC_INLINE float log_add_exp(float u, float v) {
  const float hi = u > v ? u : v, lo = u > v ? v : u;
  return hi + log1p_unit(exp_nonpositive(lo - hi));
}

// log(m/p) and log(m/q) for m = beta p + (1 - beta) q, from r = log p - log q, lb = log beta, l1b = log(1 - beta).
// The one of the two that stays near log beta or log(1 - beta) is a log-add-exp (no overflow, accurate for
// small beta); the other adds r to it, so the large |r| of a near-zero probability never cancels against
// another large number.
HFC_INLINE void log_ratios_to_mixture(float r, float lb, float l1b, float* log_m_p, float* log_m_q) {
  const bool p_larger = r > 0.0f;
  const float u = log_add_exp(p_larger ? lb : l1b, p_larger ? l1b - r : lb + r);  // log(m/p) or log(m/q)
  *log_m_p = p_larger ? u : u - r;
  *log_m_q = p_larger ? u + r : u;
}

HFC_INLINE float row_max(const float* x, int64_t V) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < V; ++v) m = x[v] > m ? x[v] : m;
  return m;
}

// sum_v exp((x_v - m) * scale)
HFC_INLINE float row_sum_exp(const float* x, int64_t V, float m, float scale) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t v = 0; v < V; ++v) s += exp_nonpositive((x[v] - m) * scale);
  return s;
}

struct Settings {
  int64_t kind;
  float inv_t, t, kd_weight, ce_weight;
  bool need_grad;
  float log_beta, log_1m_beta, beta;  // JSD only
};

// One row: returns (kd, ce) and, with need_grad, overwrites a with the gradient.
HFC_INLINE void kd_row_body(float* a, const float* b, int64_t V, int64_t y, const Settings& s, float* kd_out,
                             float* ce_out) {
  const float inv_t = s.inv_t;
  const bool unit_t = inv_t == 1.0f;
  const float ma = row_max(a, V);
  const float log_s1 = std::log(row_sum_exp(a, V, ma, 1.0f));
  const float ce = log_s1 - (a[y] - ma);  // read before a is overwritten
  const float cw = s.ce_weight;
  float kd = 0.0f;
  if (s.kind == kNoTeacher) {
    if (s.need_grad) {
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) a[v] = cw * exp_nonpositive(a[v] - ma - log_s1);
    }
  } else {
    const float mb = row_max(b, V);
    const float log_sa = unit_t ? log_s1 : std::log(row_sum_exp(a, V, ma, inv_t));
    const float log_sb = std::log(row_sum_exp(b, V, mb, inv_t));
    const float kscale = s.kd_weight * s.t;  // d(kd_weight T^2 D)/da = kd_weight T dD/d(a/T)
    float d = 0.0f;
    if (s.kind == kForward) {
      if (!s.need_grad) {
#pragma omp simd reduction(+ : d)
        for (int64_t v = 0; v < V; ++v) {
          const float lq = (a[v] - ma) * inv_t - log_sa, lp = (b[v] - mb) * inv_t - log_sb;
          d += exp_nonpositive(lp) * (lp - lq);
        }
      } else if (unit_t) {
        const float qw = kscale + cw;
#pragma omp simd reduction(+ : d)
        for (int64_t v = 0; v < V; ++v) {
          const float lq = (a[v] - ma) - log_sa, lp = (b[v] - mb) - log_sb;
          const float p = exp_nonpositive(lp);
          d += p * (lp - lq);
          a[v] = qw * exp_nonpositive(lq) - kscale * p;
        }
      } else {
#pragma omp simd reduction(+ : d)
        for (int64_t v = 0; v < V; ++v) {
          const float lq = (a[v] - ma) * inv_t - log_sa, lp = (b[v] - mb) * inv_t - log_sb;
          const float p = exp_nonpositive(lp);
          d += p * (lp - lq);
          a[v] = kscale * (exp_nonpositive(lq) - p) + cw * exp_nonpositive(a[v] - ma - log_s1);
        }
      }
    } else if (s.kind == kJsd) {  // one sweep for the two KLs to the mixture, one for the gradient
      const float lb = s.log_beta, l1b = s.log_1m_beta;
      float qbar = 0.0f;  // sum_v q_v l_v = -KL(q || m)
#pragma omp simd reduction(+ : d, qbar)
      for (int64_t v = 0; v < V; ++v) {
        const float lq = (a[v] - ma) * inv_t - log_sa, lp = (b[v] - mb) * inv_t - log_sb;
        float log_m_p, log_m_q;
        log_ratios_to_mixture(lp - lq, lb, l1b, &log_m_p, &log_m_q);
        d -= exp_nonpositive(lp) * log_m_p;  // p log(p / m)
        qbar += exp_nonpositive(lq) * log_m_q;
      }
      d = d / (1.0f - s.beta) - qbar / s.beta;
      if (s.need_grad) {
        const float gscale = -kscale / s.beta;
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) {
          const float lq = (a[v] - ma) * inv_t - log_sa, lp = (b[v] - mb) * inv_t - log_sb;
          float log_m_p, log_m_q;
          log_ratios_to_mixture(lp - lq, lb, l1b, &log_m_p, &log_m_q);
          a[v] = gscale * exp_nonpositive(lq) * (log_m_q - qbar) + cw * exp_nonpositive(a[v] - ma - log_s1);
        }
      }
    } else {  // reverse: KL(q || p), then its gradient needs the total
#pragma omp simd reduction(+ : d)
      for (int64_t v = 0; v < V; ++v) {
        const float lq = (a[v] - ma) * inv_t - log_sa, lp = (b[v] - mb) * inv_t - log_sb;
        d += exp_nonpositive(lq) * (lq - lp);
      }
      if (s.need_grad) {
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) {
          const float lq = (a[v] - ma) * inv_t - log_sa, lp = (b[v] - mb) * inv_t - log_sb;
          const float g = kscale * exp_nonpositive(lq) * (lq - lp - d);
          a[v] = g + cw * exp_nonpositive(a[v] - ma - log_s1);
        }
      }
    }
    kd = s.t * s.t * d;
  }
  if (s.need_grad) a[y] -= cw;
  *kd_out = kd;
  *ce_out = ce;
}

// The row function compiled for each instruction set (the body is inlined into each, so its `omp simd`
// loops vectorise for that target), picked per call so HFCOMPRESS_CPU_ISA can narrow it.
using RowFn = void (*)(float*, const float*, int64_t, int64_t, const Settings&, float*, float*);
void kd_row_generic(float* a, const float* b, int64_t V, int64_t y, const Settings& s, float* kd, float* ce) {
  kd_row_body(a, b, V, y, s, kd, ce);
}
#ifdef HFC_X86
__attribute__((target("avx2,fma"))) void kd_row_avx2(float* a, const float* b, int64_t V, int64_t y,
                                                     const Settings& s, float* kd, float* ce) {
  kd_row_body(a, b, V, y, s, kd, ce);
}
__attribute__((target("avx512f"))) void kd_row_avx512(float* a, const float* b, int64_t V, int64_t y,
                                                      const Settings& s, float* kd, float* ce) {
  kd_row_body(a, b, V, y, s, kd, ce);
}
#endif

RowFn row_function(hfc::Isa isa) {
#ifdef HFC_X86
  if (isa == hfc::Isa::kAvx512 || isa == hfc::Isa::kVnni) return kd_row_avx512;
  if (isa == hfc::Isa::kAvx2) return kd_row_avx2;
#endif
  return kd_row_generic;
}

std::tuple<at::Tensor, at::Tensor> kd_logit_loss(at::Tensor student, const std::optional<at::Tensor>& teacher,
                                                 const at::Tensor& targets, int64_t kind, double temperature,
                                                 double kd_weight, double ce_weight, bool need_grad, double beta,
                                                 int64_t isa) {
  const RowFn kd_row = row_function(hfc::resolve_isa(isa, "kd_logit_loss"));
  TORCH_CHECK(student.device().is_cpu() && student.scalar_type() == at::kFloat && student.dim() == 2 &&
                  student.is_contiguous(),
              "kd_logit_loss: student logits must be a contiguous float32 (rows, V) CPU tensor, got ",
              student.scalar_type(), " of shape ", student.sizes());
  const int64_t rows = student.size(0), V = student.size(1);
  TORCH_CHECK(kind == kForward || kind == kReverse || kind == kNoTeacher || kind == kJsd, "kd_logit_loss: kind "
              "must be 0 (forward KL), 1 (reverse KL), 2 (no teacher) or 3 (generalized JSD), got ", kind);
  TORCH_CHECK(kind != kJsd || (beta > 0 && beta < 1), "kd_logit_loss: the JSD's beta must be in (0, 1) (0 and 1 "
              "are the forward and reverse KL), got ", beta);
  TORCH_CHECK(temperature > 0, "kd_logit_loss: temperature must be > 0, got ", temperature);
  const bool with_teacher = kind != kNoTeacher;
  TORCH_CHECK(!with_teacher || (teacher.has_value() && teacher->sizes() == student.sizes() &&
                                teacher->scalar_type() == at::kFloat && teacher->is_contiguous() &&
                                teacher->device().is_cpu()),
              "kd_logit_loss: teacher logits must be a contiguous float32 CPU tensor of the student's shape ",
              student.sizes());
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kLong && targets.dim() == 1 &&
                  targets.size(0) == rows && targets.is_contiguous(),
              "kd_logit_loss: targets must be a contiguous int64 CPU tensor of ", rows, " labels");
  TORCH_CHECK(rows == 0 || V > 0, "kd_logit_loss: empty vocabulary");
  const int64_t* y = targets.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(y[r] >= 0 && y[r] < V, "kd_logit_loss: target ", y[r], " of row ", r, " is outside [0, ", V, ")");
  }
  at::Tensor kd = at::empty({rows}, student.options());
  at::Tensor ce = at::empty({rows}, student.options());
  const bool jsd = kind == kJsd;
  const Settings settings{kind, static_cast<float>(1.0 / temperature), static_cast<float>(temperature),
                          static_cast<float>(kd_weight), static_cast<float>(ce_weight), need_grad,
                          jsd ? static_cast<float>(std::log(beta)) : 0.0f,
                          jsd ? static_cast<float>(std::log1p(-beta)) : 0.0f, static_cast<float>(beta)};
  float* a = student.data_ptr<float>();
  const float* b = with_teacher ? teacher->data_ptr<float>() : nullptr;
  float* kd_ptr = kd.data_ptr<float>();
  float* ce_ptr = ce.data_ptr<float>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      kd_row(a + r * V, b ? b + r * V : nullptr, V, y[r], settings, kd_ptr + r, ce_ptr + r);
    }
  });
  return {kd, ce};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hfcompress, m) {
  m.def("kd_logit_loss(Tensor(a!) student_logits, Tensor? teacher_logits, Tensor targets, int kind, "
        "float temperature, float kd_weight, float ce_weight, bool need_grad, float beta=0.5, int isa=-1) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hfcompress, CPU, m) { m.impl("kd_logit_loss", &kd_logit_loss); }
