// The boundary between the CPU AdamW host code (adamw_cpu.cpp: checks, step counters, bias
// corrections, work split, choice of instruction set) and its element loops, compiled once per
// instruction set from adamw_cpu_kernel.h: DEFAULT (any CPU, in adamw_cpu.cpp) and AVX2
// (adamw_cpu_avx2.cpp).
//
// The kernels see raw pointers and per-tensor scalars only, so the AVX2 translation unit needs no
// Tensor headers (see rms_norm_cpu_avx2.cpp for why that matters).
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(PERFML_HAVE_AVX2_KERNELS)
#define PERFML_HAVE_AVX2_KERNELS 1
#endif

namespace perfml {

// One parameter tensor: every array holds `numel` elements, contiguous.
struct AdamWCpuTensor {
  c10::ScalarType param_dtype; // param and grad: fp32, bf16 or fp16
  c10::ScalarType state_dtype; // exp_avg and exp_avg_sq: param_dtype, or fp32 with a master copy
  void* param;
  void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  float* master; // fp32 master copy of param (updated, then rounded into param); null: none
  int64_t numel;
  // From this tensor's own step count (tensors may have taken different numbers of steps).
  float step_size; // lr / (1 - beta1**step)
  float inv_bc2_sqrt; // 1 / sqrt(1 - beta2**step)
};

// A contiguous range of one tensor's elements: the unit of work handed to a thread.
struct AdamWCpuPiece {
  int64_t tensor;
  int64_t begin, end;
};

struct AdamWCpuArgs {
  const AdamWCpuTensor* tensors;
  const AdamWCpuPiece* pieces;
  int64_t num_pieces;
  float beta1, beta2;
  float one_minus_beta1, one_minus_beta2; // from the double betas, not 1 - the float ones
  float eps;
  float decay; // 1 - lr * weight_decay (decoupled weight decay)
  float grad_sign; // -1 with maximize
  bool unscale; // divide grads by grad_scale and write them back (torch's fused contract)
  float grad_scale;
};

namespace DEFAULT {
void adamw_cpu_kernel(const AdamWCpuArgs& args);
} // namespace DEFAULT

#ifdef PERFML_HAVE_AVX2_KERNELS
namespace AVX2 {
void adamw_cpu_kernel(const AdamWCpuArgs& args);
} // namespace AVX2
#endif

} // namespace perfml
