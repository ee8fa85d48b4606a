// AdamW element loops for CPU, written once with at::vec::Vectorized<float> and compiled once per
// instruction set: the including file defines CPU_CAPABILITY (DEFAULT or AVX2) first, which
// selects at::vec's implementation and names the namespace perfml::CPU_CAPABILITY that keeps each
// build's symbols apart. Include it from exactly one translation unit per instruction set.
//
// The update is a pure stream: each element of param, grad, exp_avg and exp_avg_sq is read once
// and written once (grad only when unscaling), so the loop is built to keep the memory system
// busy: the host cuts every tensor into pieces of a fixed size, one parallel region hands the
// pieces of all tensors out (no per-tensor thread wake-ups or barriers, small tensors batched
// with large ones), and each piece runs one vectorized pass. bf16/fp16 arrays are
// widened to fp32 in registers, one vector at a time; all math is fp32.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "adamw_cpu.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2) before including adamw_cpu_kernel.h"
#endif

namespace perfml {
namespace CPU_CAPABILITY {
namespace {

using FVec = at::vec::Vectorized<float>;

// One step of kStep elements of T as two fp32 vectors: a reduced-precision vector holds twice
// the lanes of an fp32 one, so it widens to exactly two. count < kStep is a tensor's tail.
template <typename T>
struct Lanes {
  static constexpr int64_t kStep = 2 * FVec::size();

  C10_ALWAYS_INLINE static void load(const T* p, int64_t count, FVec& a, FVec& b) {
    if constexpr (std::is_same_v<T, float>) {
      if (count == kStep) {
        a = FVec::loadu(p);
        b = FVec::loadu(p + FVec::size());
      } else if (count <= FVec::size()) {
        a = FVec::loadu(p, count);
        b = FVec(0.f);
      } else {
        a = FVec::loadu(p);
        b = FVec::loadu(p + FVec::size(), count - FVec::size());
      }
    } else {
      static_assert(at::vec::Vectorized<T>::size() == kStep);
      auto v = count == kStep ? at::vec::Vectorized<T>::loadu(p)
                              : at::vec::Vectorized<T>::loadu(p, count);
      std::tie(a, b) = at::vec::convert_to_float<T>(v);
    }
  }

  C10_ALWAYS_INLINE static void store(T* p, int64_t count, const FVec& a, const FVec& b) {
    if constexpr (std::is_same_v<T, float>) {
      if (count == kStep) {
        a.store(p);
        b.store(p + FVec::size());
      } else if (count <= FVec::size()) {
        a.store(p, static_cast<int>(count));
      } else {
        a.store(p);
        b.store(p + FVec::size(), static_cast<int>(count - FVec::size()));
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
};

// The hyperparameters broadcast once per piece.
struct Consts {
  FVec beta1, beta2, omb1, omb2, eps, decay, sign, scale, step_size, inv_bc2_sqrt;

  Consts(const AdamWCpuArgs& a, const AdamWCpuTensor& t)
      : beta1(a.beta1),
        beta2(a.beta2),
        omb1(a.one_minus_beta1),
        omb2(a.one_minus_beta2),
        eps(a.eps),
        decay(a.decay),
        sign(a.grad_sign),
        scale(a.grad_scale),
        step_size(t.step_size),
        inv_bc2_sqrt(t.inv_bc2_sqrt) {}
};

// One vector of the update: g is the (unscaled, sign-applied) gradient, p the fp32 param.
C10_ALWAYS_INLINE void update(const Consts& c, const FVec& g, FVec& p, FVec& m, FVec& v) {
  p = p * c.decay;
  m = at::vec::fmadd(m, c.beta1, g * c.omb1);
  v = at::vec::fmadd(v, c.beta2, g * g * c.omb2);
  const FVec denom = at::vec::fmadd(v.sqrt(), c.inv_bc2_sqrt, c.eps);
  p = p - c.step_size * m / denom;
}

// Elements [begin, end) of one tensor. T: param/grad type; S: state type; kMaster: the fp32
// master copy is the param that is updated (param gets its rounding); kUnscale: grads are
// divided by the GradScaler scale and written back.
template <typename T, typename S, bool kMaster, bool kUnscale>
void adamw_range(const AdamWCpuTensor& t, const AdamWCpuArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t kStep = Lanes<float>::kStep;
  static_assert(Lanes<T>::kStep == kStep && Lanes<S>::kStep == kStep);
  T* param = static_cast<T*>(t.param);
  T* grad = static_cast<T*>(t.grad);
  S* exp_avg = static_cast<S*>(t.exp_avg);
  S* exp_avg_sq = static_cast<S*>(t.exp_avg_sq);
  float* master = t.master;
  const Consts c(a, t);
  auto body = [&](int64_t i, int64_t count) {
    FVec g0, g1, p0, p1, m0, m1, v0, v1;
    Lanes<T>::load(grad + i, count, g0, g1);
    if constexpr (kUnscale) {
      g0 = g0 / c.scale;
      g1 = g1 / c.scale;
      Lanes<T>::store(grad + i, count, g0, g1);
    }
    g0 = g0 * c.sign;
    g1 = g1 * c.sign;
    if constexpr (kMaster) {
      Lanes<float>::load(master + i, count, p0, p1);
    } else {
      Lanes<T>::load(param + i, count, p0, p1);
    }
    Lanes<S>::load(exp_avg + i, count, m0, m1);
    Lanes<S>::load(exp_avg_sq + i, count, v0, v1);
    update(c, g0, p0, m0, v0);
    update(c, g1, p1, m1, v1);
    if constexpr (kMaster) {
      Lanes<float>::store(master + i, count, p0, p1);
    }
    Lanes<T>::store(param + i, count, p0, p1);
    Lanes<S>::store(exp_avg + i, count, m0, m1);
    Lanes<S>::store(exp_avg_sq + i, count, v0, v1);
  };
  int64_t i = begin;
  for (; i + kStep <= end; i += kStep) {
    body(i, kStep); // count is the constant kStep after inlining: the unmasked loads and stores
  }
  if (i < end) {
    body(i, end - i);
  }
}

using RangeFn = void (*)(const AdamWCpuTensor&, const AdamWCpuArgs&, int64_t, int64_t);

template <typename T, bool kUnscale>
RangeFn pick_states(const AdamWCpuTensor& t) {
  if constexpr (std::is_same_v<T, float>) {
    return &adamw_range<float, float, false, kUnscale>;
  } else {
    if (t.master != nullptr) {
      return &adamw_range<T, float, true, kUnscale>;
    }
    return &adamw_range<T, T, false, kUnscale>;
  }
}

template <bool kUnscale>
RangeFn pick(const AdamWCpuTensor& t) {
  switch (t.param_dtype) {
    case c10::ScalarType::BFloat16:
      return pick_states<c10::BFloat16, kUnscale>(t);
    case c10::ScalarType::Half:
      return pick_states<c10::Half, kUnscale>(t);
    default:
      return pick_states<float, kUnscale>(t);
  }
}

} // namespace

void adamw_cpu_kernel(const AdamWCpuArgs& args) {
  // One parallel region for the whole step; inside it each thread takes the next piece from a
  // shared counter rather than a fixed share, so a thread the OS preempts (a busy machine) holds
  // up one piece, not half of the step. Which thread runs a piece never changes its result.
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), args.num_pieces);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t k = next.fetch_add(1); k < args.num_pieces; k = next.fetch_add(1)) {
      const AdamWCpuPiece& piece = args.pieces[k];
      const AdamWCpuTensor& t = args.tensors[piece.tensor];
      const RangeFn fn = args.unscale ? pick<true>(t) : pick<false>(t);
      fn(t, args, piece.begin, piece.end);
    }
  });
}

} // namespace CPU_CAPABILITY
} // namespace perfml
