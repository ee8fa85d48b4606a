// RMSNorm row kernels for CPU, written once with at::vec::Vectorized and compiled once per
// instruction set: the including file defines CPU_CAPABILITY (DEFAULT or AVX2) first, which
// selects at::vec's implementation and names the namespace perfml::CPU_CAPABILITY that keeps each
// build's symbols apart. Include it from exactly one translation unit per instruction set.
//
// Rows are independent, so at::parallel_for splits them over threads and each row takes two
// vectorized passes (sum of squares, then scale; in the backward the dot product, then dx). A
// row is read twice, but rows up to tens of thousands of elements stay in L2 between the passes,
// so memory sees one read of each input and one write of each output. bf16/fp16 are converted to
// fp32 in registers, one vector at a time: no converted copy of the row, no scalar conversions.
// Tried and dropped: running the second pass of row r in the same loop as the first pass of row
// r + 1 (one memory stream instead of two bursts) measured no faster on the dev machine.
//
// dweight is reduced deterministically: the host cuts the rows into a number of chunks that
// depends only on the shape, each chunk sums its rows into a private row of partial sums, and the
// partial rows are added in chunk order. The thread count never changes the result.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "rms_norm_cpu.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2) before including rms_norm_cpu_kernel.h"
#endif

namespace perfml {
namespace CPU_CAPABILITY {
namespace {

// Forward variants, fixed at compile time so the inner loops carry no flag tests.
enum class Scale { kNoWeight, kRoundThenWeight, kWeight };

// Loads and stores one step of kStep elements of T as two vectors of the math type A.
// bf16/fp16 vectors hold twice the lanes of fp32 ones, so one Vectorized<T> of a reduced type
// converts to exactly two Vectorized<float>; fp32/fp64 take two plain loads. Every loop steps by
// kStep whatever the dtype. count < kStep is a row's tail (zero-filled on load).
template <typename T>
struct Io {
  using A = at::opmath_type<T>;
  using AVec = at::vec::Vectorized<A>;
  static constexpr int64_t kStep = 2 * AVec::size();

  C10_ALWAYS_INLINE static void load(const T* p, int64_t count, AVec& a, AVec& b) {
    if constexpr (std::is_same_v<T, A>) {
      if (count == kStep) {
        a = AVec::loadu(p);
        b = AVec::loadu(p + AVec::size());
      } else if (count <= AVec::size()) {
        a = AVec::loadu(p, count);
        b = AVec(A(0));
      } else {
        a = AVec::loadu(p);
        b = AVec::loadu(p + AVec::size(), count - AVec::size());
      }
    } else {
      static_assert(at::vec::Vectorized<T>::size() == kStep);
      auto v = count == kStep ? at::vec::Vectorized<T>::loadu(p)
                              : at::vec::Vectorized<T>::loadu(p, count);
      std::tie(a, b) = at::vec::convert_to_float<T>(v);
    }
  }

  C10_ALWAYS_INLINE static void store(T* p, int64_t count, const AVec& a, const AVec& b) {
    if constexpr (std::is_same_v<T, A>) {
      if (count == kStep) {
        a.store(p);
        b.store(p + AVec::size());
      } else if (count <= AVec::size()) {
        a.store(p, static_cast<int>(count));
      } else {
        a.store(p);
        b.store(p + AVec::size(), static_cast<int>(count - AVec::size()));
      }
    } else {
      auto v = at::vec::convert_from_float<T>(a, b);
      if (count == kStep) {
        v.store(p);
      } else {
        v.store(p, static_cast<int>(count));
      }
    }
  }

  // Round to T and back: llama rounds the normalized row to x's dtype before the weight.
  C10_ALWAYS_INLINE static void round_trip(AVec& a, AVec& b) {
    if constexpr (!std::is_same_v<T, A>) {
      std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(a, b));
    }
  }
};

template <typename A>
C10_ALWAYS_INLINE A sum_lanes(const at::vec::Vectorized<A>& v) {
  __at_align__ A lanes[at::vec::Vectorized<A>::size()];
  v.store(lanes);
  A s = 0;
  for (int64_t i = 0; i < at::vec::Vectorized<A>::size(); ++i) {
    s += lanes[i];
  }
  return s;
}

// Calls f(i, count) over [0, n) in steps of `step`; in the full steps count is the constant
// `step` after inlining, so their loads and stores compile to the unmasked branch.
template <int64_t step, typename F>
C10_ALWAYS_INLINE void for_each_step(int64_t n, const F& f) {
  int64_t i = 0;
  for (; i + step <= n; i += step) {
    f(i, step);
  }
  if (i < n) {
    f(i, n - i);
  }
}

// Elements per parallel task: enough that a task is worth a thread wake-up (ATen's elementwise
// kernels use the same, at::internal::GRAIN_SIZE, from a header heavy to include).
constexpr int64_t kGrainSize = 32768;

inline int64_t grain_rows(int64_t n) {
  return std::max<int64_t>(1, kGrainSize / n);
}

// ---- forward ---------------------------------------------------------------------------------

// x, y: [m, n]; w: [n] weight + offset (unused for kNoWeight); rstd: [m].
template <typename T, typename O, Scale kScale>
void fwd_rows(const T* x, O* y, const at::opmath_type<T>* w, float* rstd, int64_t m, int64_t n,
              double eps) {
  using A = at::opmath_type<T>;
  using AVec = at::vec::Vectorized<A>;
  constexpr int64_t kStep = Io<T>::kStep;
  const A eps_a = static_cast<A>(eps);
  at::parallel_for(0, m, grain_rows(n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* xr = x + row * n;
      O* yr = y + row * n;
      AVec s0(A(0)), s1(A(0));
      for_each_step<kStep>(n, [&](int64_t i, int64_t count) {
        AVec a, b;
        Io<T>::load(xr + i, count, a, b);
        s0 = at::vec::fmadd(a, a, s0);
        s1 = at::vec::fmadd(b, b, s1);
      });
      const A r = A(1) / std::sqrt(sum_lanes(s0 + s1) / static_cast<A>(n) + eps_a);
      rstd[row] = static_cast<float>(r);
      const AVec rv(r);
      for_each_step<kStep>(n, [&](int64_t i, int64_t count) {
        AVec a, b;
        Io<T>::load(xr + i, count, a, b);
        a = a * rv;
        b = b * rv;
        if constexpr (kScale != Scale::kNoWeight) {
          if constexpr (kScale == Scale::kRoundThenWeight) {
            Io<T>::round_trip(a, b);
          }
          AVec wa, wb;
          Io<A>::load(w + i, count, wa, wb);
          a = a * wa;
          b = b * wb;
        }
        Io<O>::store(yr + i, count, a, b);
      });
    }
  });
}

// ---- backward --------------------------------------------------------------------------------

// Rows [begin, end). dy: [m, n] in D (x's dtype or the math dtype); dw_part: [n] running sum of
// dy * x * rstd over this chunk's rows (only with kDw).
template <typename T, typename D, bool kWeight, bool kDw>
void bwd_rows(const D* dy, const T* x, const at::opmath_type<T>* w, const float* rstd, T* dx,
              at::opmath_type<T>* dw_part, int64_t begin, int64_t end, int64_t n) {
  using A = at::opmath_type<T>;
  using AVec = at::vec::Vectorized<A>;
  static_assert(std::is_same_v<A, at::opmath_type<D>>);
  constexpr int64_t kStep = Io<T>::kStep;
  for (int64_t row = begin; row < end; ++row) {
    const T* xr = x + row * n;
    const D* dyr = dy + row * n;
    T* dxr = dx + row * n;
    const A r = static_cast<A>(rstd[row]);
    // c = sum(dy * w * x) / n: how much of the upstream gradient lies along the row itself.
    AVec c0(A(0)), c1(A(0));
    for_each_step<kStep>(n, [&](int64_t i, int64_t count) {
      AVec a, b, ga, gb;
      Io<T>::load(xr + i, count, a, b);
      Io<D>::load(dyr + i, count, ga, gb);
      if constexpr (kWeight) {
        AVec wa, wb;
        Io<A>::load(w + i, count, wa, wb);
        ga = ga * wa;
        gb = gb * wb;
      }
      c0 = at::vec::fmadd(ga, a, c0);
      c1 = at::vec::fmadd(gb, b, c1);
    });
    const A c = sum_lanes(c0 + c1) / static_cast<A>(n);
    const AVec k(r * r * c), rv(r);
    for_each_step<kStep>(n, [&](int64_t i, int64_t count) {
      AVec a, b, ga, gb;
      Io<T>::load(xr + i, count, a, b);
      Io<D>::load(dyr + i, count, ga, gb);
      AVec wga = ga, wgb = gb;
      if constexpr (kWeight) {
        AVec wa, wb;
        Io<A>::load(w + i, count, wa, wb);
        wga = ga * wa;
        wgb = gb * wb;
      }
      Io<T>::store(dxr + i, count, (wga - a * k) * rv, (wgb - b * k) * rv);
      if constexpr (kDw) {
        AVec pa, pb;
        Io<A>::load(dw_part + i, count, pa, pb);
        Io<A>::store(dw_part + i, count, pa + ga * a * rv, pb + gb * b * rv);
      }
    });
  }
}

template <typename T, typename D>
void bwd(const RmsNormBwdArgs& args) {
  using A = at::opmath_type<T>;
  const D* dy = static_cast<const D*>(args.dy);
  const T* x = static_cast<const T*>(args.x);
  const A* w = static_cast<const A*>(args.w);
  T* dx = static_cast<T*>(args.dx);
  const int64_t m = args.m, n = args.n;
  if (args.dw == nullptr) {
    at::parallel_for(0, m, grain_rows(n), [&](int64_t begin, int64_t end) {
      if (w != nullptr) {
        bwd_rows<T, D, true, false>(dy, x, w, args.rstd, dx, nullptr, begin, end, n);
      } else {
        bwd_rows<T, D, false, false>(dy, x, w, args.rstd, dx, nullptr, begin, end, n);
      }
    });
    return;
  }
  // Threads take whole chunks; the chunking came from the shape alone.
  A* part = static_cast<A*>(args.dw_part);
  const int64_t chunks = args.chunks, rows_per_chunk = args.rows_per_chunk;
  const int64_t grain = m * n < kGrainSize ? chunks : 1;
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      A* pc = part + c * n;
      std::fill(pc, pc + n, A(0));
      const int64_t r0 = c * rows_per_chunk;
      bwd_rows<T, D, true, true>(dy, x, w, args.rstd, dx, pc, r0, std::min(m, r0 + rows_per_chunk),
                                 n);
    }
  });
  // dw[j] = sum over chunks, in chunk order, of part[c][j]; columns split over threads.
  using AVec = at::vec::Vectorized<A>;
  constexpr int64_t kStep = Io<A>::kStep;
  A* dw = static_cast<A*>(args.dw);
  at::parallel_for(
      0, n, std::max<int64_t>(kStep, kGrainSize / chunks),
      [&](int64_t begin, int64_t end) {
        for_each_step<kStep>(end - begin, [&](int64_t i, int64_t count) {
          const int64_t j = begin + i;
          AVec a, b;
          Io<A>::load(part + j, count, a, b);
          for (int64_t c = 1; c < chunks; ++c) {
            AVec pa, pb;
            Io<A>::load(part + c * n + j, count, pa, pb);
            a = a + pa;
            b = b + pb;
          }
          Io<A>::store(dw + j, count, a, b);
        });
      });
}

} // namespace

void rms_norm_fwd_kernel(const RmsNormFwdArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "rms_norm_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* x = static_cast<const scalar_t*>(args.x);
    const A* w = static_cast<const A*>(args.w);
    const int64_t m = args.m, n = args.n;
    if (w == nullptr) {
      fwd_rows<scalar_t, scalar_t, Scale::kNoWeight>(
          x, static_cast<scalar_t*>(args.y), w, args.rstd, m, n, args.eps);
    } else if (args.cast != kCastLlama) {
      fwd_rows<scalar_t, scalar_t, Scale::kWeight>(
          x, static_cast<scalar_t*>(args.y), w, args.rstd, m, n, args.eps);
    } else if (!args.y_in_math) {
      fwd_rows<scalar_t, scalar_t, Scale::kRoundThenWeight>(
          x, static_cast<scalar_t*>(args.y), w, args.rstd, m, n, args.eps);
    } else {
      fwd_rows<scalar_t, A, Scale::kRoundThenWeight>(
          x, static_cast<A*>(args.y), w, args.rstd, m, n, args.eps);
    }
  });
}

void rms_norm_bwd_kernel(const RmsNormBwdArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "rms_norm_bwd", [&] {
    if (args.dy_in_math) {
      bwd<scalar_t, at::opmath_type<scalar_t>>(args);
    } else {
      bwd<scalar_t, scalar_t>(args);
    }
  });
}

} // namespace CPU_CAPABILITY
} // namespace perfml
