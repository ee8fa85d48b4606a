// The AVX2 + FMA + F16C build of the CPU AdamW element loops (adamw_cpu_kernel.h), chosen at run
// time by adamw_cpu.cpp where torch itself runs AVX2 or AVX-512 kernels.
//
// Built the way rms_norm_cpu_avx2.cpp builds the RMSNorm kernels, for the same reasons: a target
// pragma rather than -mavx2 so the rest of the extension stays baseline x86-64, and every shared
// header included before the pragma so no inline function of theirs is compiled as AVX2 code.
#include "adamw_cpu.h"

#ifdef PERFML_HAVE_AVX2_KERNELS

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>

#include <immintrin.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/irange.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// GCC warns that lambdas returning __m256 in at::vec's headers change the ABI; they never cross
// into baseline code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// sleef.h declares its AVX2 functions only under __AVX2__, which GCC's target pragma does not
// define in C++; at::vec's AVX2 headers name those functions (these kernels call none of them).
#define __AVX__ 1
#define __AVX2__ 1
#define SLEEF_STATIC_LIBS
#include <sleef.h>
#undef __AVX2__
#undef __AVX__

#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "adamw_cpu_kernel.h"

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif // PERFML_HAVE_AVX2_KERNELS
