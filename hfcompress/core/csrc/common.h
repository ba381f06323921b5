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
#include <cstdlib>
#include <cstdint>
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
