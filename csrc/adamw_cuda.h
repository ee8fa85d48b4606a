// The torch-free boundary between the CUDA AdamW binding (adamw_cuda.cu: checks, grouping by
// dtype, step counters, the stream) and its kernels (adamw_cuda_kernel.cu), which see raw device
// pointers only. Keeping torch out of the kernel translation unit lets CI compile it with plain
// nvcc on machines without a GPU or a CUDA build of torch (tests/test_cuda_compile.py).
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include <cuda_runtime_api.h>

namespace perfml {

enum class AdamWDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Per-launch scalars, shared by every tensor of a group. Pointers are device addresses.
struct AdamWScalars {
  float lr;
  const float* lr_ptr; // non-null: read the learning rate here (a tensor lr) instead of `lr`
  float weight_decay;
  float beta1, beta2;
  float one_minus_beta1, one_minus_beta2; // from the double betas
  double log_beta1, log_beta2; // bias corrections: 1 - beta**step = -expm1(step * log(beta))
  float eps;
  float grad_sign; // -1 with maximize
  const float* grad_scale; // non-null: divide grads by *grad_scale and write them back
  const float* found_inf; // non-null: skip everything when *found_inf != 0
};

// Entry addresses, in this order: param, grad, exp_avg, exp_avg_sq, step (fp32, 1 element),
// master (fp32, only in groups with master copies).
constexpr int kAdamWParam = 0, kAdamWGrad = 1, kAdamWExpAvg = 2, kAdamWExpAvgSq = 3,
              kAdamWStep = 4, kAdamWMaster = 5;

// Tensors that share one kernel: params (and grads) of param_dtype; exp_avg/exp_avg_sq of
// param_dtype, or fp32 when `master` (then param_dtype is bf16 or fp16).
struct AdamWCudaGroup {
  AdamWDtype param_dtype = AdamWDtype::kFloat32;
  bool master = false;
  std::vector<std::array<void*, 6>> tensors;
  std::vector<int64_t> sizes;
};

// One AdamW step over the group, launched on `stream`; the step counters must already hold the
// new step (the binding increments them). Returns the first CUDA error.
cudaError_t adamw_cuda_launch(const AdamWCudaGroup& group, const AdamWScalars& scalars,
                              cudaStream_t stream);

} // namespace perfml
