// The boundary between the RMSNorm host code (rms_norm_cpu.cpp: checks, allocation, choice of
// instruction set) and its row kernels, which are compiled once per instruction set from
// rms_norm_cpu_kernel.h: DEFAULT (any CPU, in rms_norm_cpu.cpp) and AVX2 (rms_norm_cpu_avx2.cpp).
//
// The kernels see raw pointers and sizes only, so the AVX2 translation unit includes no Tensor
// headers: the fewer shared inline functions it compiles, the fewer could carry AVX2 code into the
// rest of the library (see rms_norm_cpu_avx2.cpp).
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

// AVX2 kernels are built where the compiler can target AVX2 per translation unit with a pragma:
// GCC on x86-64 (the compiler of torch's Linux wheels and of torch.utils.cpp_extension there).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PERFML_HAVE_AVX2_KERNELS 1
#endif

namespace perfml {

enum RmsNormCast : int64_t { kCastLlama = 0, kCastGemma = 1, kCastNone = 2 };

// "math" below is the dtype the arithmetic runs in: fp32, or fp64 for fp64 x.
struct RmsNormFwdArgs {
  c10::ScalarType dtype; // x's dtype
  bool y_in_math; // y is written in the math dtype (llama with a weight wider than x)
  const void* x; // [m, n] contiguous
  void* y; // [m, n] in x's dtype, or the math dtype when y_in_math
  const void* w; // [n] weight + offset in the math dtype; null: no weight
  float* rstd; // [m]
  int64_t m, n;
  double eps;
  int64_t cast; // RmsNormCast
};

struct RmsNormBwdArgs {
  c10::ScalarType dtype; // x's dtype
  bool dy_in_math; // dy is in the math dtype rather than x's
  const void* dy; // [m, n]
  const void* x; // [m, n]
  const void* w; // [n] weight + offset in the math dtype; null: no weight
  const float* rstd; // [m]
  void* dx; // [m, n] in x's dtype
  // dweight (null when not wanted): partial sums of `chunks` row blocks of `rows_per_chunk` rows,
  // [chunks, n], then their ordered sum [n], both in the math dtype.
  void* dw_part;
  void* dw;
  int64_t chunks, rows_per_chunk;
  int64_t m, n;
};

namespace DEFAULT {
void rms_norm_fwd_kernel(const RmsNormFwdArgs& args);
void rms_norm_bwd_kernel(const RmsNormBwdArgs& args);
} // namespace DEFAULT

#ifdef PERFML_HAVE_AVX2_KERNELS
namespace AVX2 {
void rms_norm_fwd_kernel(const RmsNormFwdArgs& args);
void rms_norm_bwd_kernel(const RmsNormBwdArgs& args);
} // namespace AVX2
#endif

} // namespace perfml
