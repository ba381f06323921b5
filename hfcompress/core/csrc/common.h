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

// From this many activation rows on, the weight-only kernels dequantize tiles of weight rows to float32 and
// multiply them with ATen's GEMM (MKL/oneDNN, blocked for the caches) instead of streaming the packed weights
// once per few rows: at M rows a weight is used M times, so the GEMM's arithmetic intensity wins, and the
// dequantization (one pass over each weight, into a per-thread tile that stays in L2) is amortised over M.
constexpr int64_t kGemmMinRows = 8;

// y (M, N) float32 = x (M, K) float32 @ W.T, where dequant(n0, rows, tile) writes weight rows [n0, n0 + rows)
// as float32 (rows, K) into tile. Tiles of weight rows are split over ATen's threads; inside a parallel
// region ATen's GEMM runs on the calling thread, so each thread multiplies its own tile.
template <typename Dequant>
void tiled_gemm(const float* x, int64_t M, int64_t K, int64_t N, float* y, Dequant dequant) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // ~512 KiB of float32 per tile (fits L2 with the GEMM's packing buffers), at least 16 rows, and enough tiles
  // to keep every thread busy.
  int64_t rows = std::max<int64_t>(16, (int64_t{1} << 17) / std::max<int64_t>(1, K));
  rows = std::min<int64_t>(rows, std::max<int64_t>(16, (N + threads - 1) / threads));
  rows = (rows + 15) / 16 * 16;
  const int64_t tiles = (N + rows - 1) / rows;
  const at::Tensor xt = at::from_blob(const_cast<float*>(x), {M, K}, at::TensorOptions().dtype(at::kFloat));
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> tile(static_cast<size_t>(rows * K));
    std::vector<float> out(static_cast<size_t>(M * rows));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * rows, count = std::min(rows, N - n0);
      dequant(n0, count, tile.data());
      const at::Tensor wt = at::from_blob(tile.data(), {count, K}, at::TensorOptions().dtype(at::kFloat));
      at::Tensor ot = at::from_blob(out.data(), {M, count}, at::TensorOptions().dtype(at::kFloat));
      at::mm_out(ot, xt, wt.t());
      for (int64_t m = 0; m < M; ++m) std::copy(out.data() + m * count, out.data() + (m + 1) * count, y + m * N + n0);
    }
  });
}

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
