// The AVX2 + FMA + F16C build of the RMSNorm row kernels (rms_norm_cpu_kernel.h), chosen at run
// time by rms_norm_cpu.cpp where torch itself runs AVX2 or AVX-512 kernels.
//
// Why a pragma and not -mavx2: the extension's compile flags apply to every source, and the rest
// of the extension must run on any x86-64. Why the includes come first: an inline function from
// a shared header (c10::Half's conversions, at::parallel_for, the standard library) that was
// first compiled under the pragma would be AVX2 code, and the linker keeps one copy of it for the
// whole library, so a DEFAULT caller on an older CPU could land in AVX2 instructions. Headers
// included before the pragma are compiled for the baseline; at::vec's own code, included after
// it, lives in namespace at::vec::AVX2 and cannot be mistaken for another build's.
#include "rms_norm_cpu.h"

#ifdef PERFML_HAVE_AVX2_KERNELS

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>

#include <immintrin.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
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
#include "rms_norm_cpu_kernel.h"

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif // PERFML_HAVE_AVX2_KERNELS
