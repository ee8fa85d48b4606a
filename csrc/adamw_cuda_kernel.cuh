// The AdamW functor for multi_tensor_apply.cuh: the update of one chunk of one tensor.
//
// Torch-free, like the launcher, so that nvcc alone compiles it (tests/test_cuda_compile.py).
// Semantics are those of adamw_ref in perfml/optim/adamw.py: math in fp32, bias corrections from
// the tensor's own device-side step counter (in double, as -expm1(step * log(beta)), which keeps
// all the digits of 1 - beta2**step at small steps), decoupled weight decay, maximize, and
// GradScaler's contract (grads divided by the scale and written back; found_inf skips).
//
// Memory: every array is streamed once. Threads move kVec elements per access (16 bytes for fp32
// arrays and for all-bf16/fp16 tensors, 8 bytes for the bf16 params of a master-weights group) and
// issue kIlp accesses of every array before using any, 8 elements per array in flight per thread;
// tensors whose arrays are not all aligned for that take the scalar loop. That fits 64 registers,
// so two 512-thread blocks share an SM (checked by tests/test_cuda_compile.py: no spills).
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "adamw_cuda.h"
#include "multi_tensor_apply.cuh"

namespace perfml {
namespace adamw {

__device__ __forceinline__ float to_float(float x) {
  return x;
}
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
__device__ __forceinline__ float to_float(__half x) {
  return __half2float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// N elements of T moved as one aligned access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load(const T* p, int64_t i, float (&out)[N]) {
  const Pack<T, N> x = *reinterpret_cast<const Pack<T, N>*>(p + i);
#pragma unroll
  for (int j = 0; j < N; ++j) {
    out[j] = to_float(x.v[j]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store(T* p, int64_t i, const float (&in)[N]) {
  Pack<T, N> x;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    x.v[j] = from_float<T>(in[j]);
  }
  *reinterpret_cast<Pack<T, N>*>(p + i) = x;
}

// The scalars of one tensor's update.
struct Consts {
  float decay, beta1, beta2, omb1, omb2, eps, step_size, inv_bc2_sqrt, sign, scale;
};

// g: the unscaled grad; w: the fp32 param (or master); m, v: the moments.
__device__ __forceinline__ void update(const Consts& c, float g, float& w, float& m, float& v) {
  g *= c.sign;
  w *= c.decay;
  m = fmaf(c.beta1, m, c.omb1 * g);
  v = fmaf(c.beta2, v, c.omb2 * (g * g));
  const float denom = fmaf(sqrtf(v), c.inv_bc2_sqrt, c.eps);
  w = w - c.step_size * (m / denom);
}

inline __device__ bool aligned_to(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// P: param/grad type (float, __nv_bfloat16, __half); kMaster: fp32 master copy and fp32 state.
template <typename P, bool kMaster>
struct AdamWFunctor {
  static_assert(!kMaster || !std::is_same_v<P, float>, "master copies are for bf16/fp16 params");
  using S = std::conditional_t<kMaster, float, P>;
  static constexpr int kDepth = kMaster ? 6 : 5;
  static constexpr int kVec = (sizeof(P) == 2 && !kMaster) ? 8 : 4;
  static constexpr int kIlp = 8 / kVec; // 8 elements of each array in flight per thread

  AdamWScalars s;

  __device__ void operator()(const mta::TensorListMeta<kDepth>& meta, int t, int64_t begin,
                             int64_t end) const {
    if (s.found_inf != nullptr && *s.found_inf != 0.0f) {
      return;
    }
    P* const param = static_cast<P*>(meta.addresses[kAdamWParam][t]);
    P* const grad = static_cast<P*>(meta.addresses[kAdamWGrad][t]);
    S* const exp_avg = static_cast<S*>(meta.addresses[kAdamWExpAvg][t]);
    S* const exp_avg_sq = static_cast<S*>(meta.addresses[kAdamWExpAvgSq][t]);
    float* master = nullptr;
    if constexpr (kMaster) {
      master = static_cast<float*>(meta.addresses[kAdamWMaster][t]);
    }
    const double step = *static_cast<const float*>(meta.addresses[kAdamWStep][t]);
    const float lr = s.lr_ptr != nullptr ? *s.lr_ptr : s.lr;
    const bool unscale = s.grad_scale != nullptr;
    Consts c;
    c.decay = 1.0f - lr * s.weight_decay;
    c.beta1 = s.beta1;
    c.beta2 = s.beta2;
    c.omb1 = s.one_minus_beta1;
    c.omb2 = s.one_minus_beta2;
    c.eps = s.eps;
    c.step_size = static_cast<float>(static_cast<double>(lr) / -expm1(step * s.log_beta1));
    c.inv_bc2_sqrt = static_cast<float>(1.0 / sqrt(-expm1(step * s.log_beta2)));
    c.sign = s.grad_sign;
    c.scale = unscale ? *s.grad_scale : 1.0f;

    // The updated fp32 values live in the master copy, or in the param itself.
    auto load_w = [&](int64_t i, float(&w)[kVec]) {
      if constexpr (kMaster) {
        load<kVec>(master, i, w);
      } else {
        load<kVec>(param, i, w);
      }
    };

    const bool vectorized = aligned_to(param, kVec * sizeof(P)) &&
        aligned_to(grad, kVec * sizeof(P)) && aligned_to(exp_avg, kVec * sizeof(S)) &&
        aligned_to(exp_avg_sq, kVec * sizeof(S)) &&
        (!kMaster || aligned_to(master, kVec * sizeof(float)));
    // begin is a multiple of the chunk size, itself a multiple of kVec
    const int64_t vec_end = vectorized ? begin + (end - begin) / kVec * kVec : begin;
    const int64_t stride = static_cast<int64_t>(blockDim.x) * kVec;
    for (int64_t base = begin + static_cast<int64_t>(threadIdx.x) * kVec; base < vec_end;
         base += kIlp * stride) {
      float g[kIlp][kVec], w[kIlp][kVec], m[kIlp][kVec], v[kIlp][kVec];
#pragma unroll
      for (int u = 0; u < kIlp; ++u) {
        const int64_t i = base + u * stride;
        if (i < vec_end) {
          load<kVec>(grad, i, g[u]);
          load_w(i, w[u]);
          load<kVec>(exp_avg, i, m[u]);
          load<kVec>(exp_avg_sq, i, v[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kIlp; ++u) {
        const int64_t i = base + u * stride;
        if (i < vec_end) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            if (unscale) {
              g[u][j] = g[u][j] / c.scale;
            }
            update(c, g[u][j], w[u][j], m[u][j], v[u][j]);
          }
          if (unscale) {
            store<kVec>(grad, i, g[u]);
          }
          if constexpr (kMaster) {
            store<kVec>(master, i, w[u]);
          }
          store<kVec>(param, i, w[u]);
          store<kVec>(exp_avg, i, m[u]);
          store<kVec>(exp_avg_sq, i, v[u]);
        }
      }
    }
    // Whatever the vector loop did not cover: a misaligned tensor, or a chunk's last elements.
    for (int64_t i = vec_end + threadIdx.x; i < end; i += blockDim.x) {
      float g = to_float(grad[i]);
      if (unscale) {
        g = g / c.scale;
        grad[i] = from_float<P>(g);
      }
      float w;
      if constexpr (kMaster) {
        w = master[i];
      } else {
        w = to_float(param[i]);
      }
      float m = to_float(exp_avg[i]);
      float v = to_float(exp_avg_sq[i]);
      update(c, g, w, m, v);
      if constexpr (kMaster) {
        master[i] = w;
      }
      param[i] = from_float<P>(w);
      exp_avg[i] = from_float<S>(m);
      exp_avg_sq[i] = from_float<S>(v);
    }
  }
};

} // namespace adamw
} // namespace perfml
