// Declarations of the functions that csrc/bindings.cpp exposes as perfml._C.
//
// The kernel sources include only ATen headers and this file; only bindings.cpp pays for
// torch/extension.h (pybind11), which keeps the parallel build of the sources short.
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

namespace perfml {

// Which build of the CPU kernels runs on this machine: "avx2" or "default" (see rms_norm_cpu.cpp).
const char* cpu_kernel_isa();

// RMSNorm on CPU tensors; the semantics are those of _rms_norm_fwd_ref / _rms_norm_bwd_ref in
// perfml/ops/rms_norm.py. x: [M, N] contiguous; returns (y: [M, N], rstd: [M] fp32).
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(
    const at::Tensor& x,
    const std::optional<at::Tensor>& weight,
    double eps,
    double offset,
    int64_t cast);

// Returns (dx: [M, N] in x.dtype, dw: [N] in weight.dtype, or an empty tensor when there is no
// weight or needs_dw is false).
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(
    const at::Tensor& dy,
    const at::Tensor& x,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& rstd,
    double offset,
    bool needs_dw);

// One AdamW step over lists of CPU tensors (the cpu_ext backend of perfml.optim.AdamW); the
// semantics are those of adamw_ref in perfml/optim/adamw.py. Entry i: params[i] and grads[i]
// (fp32/bf16/fp16), exp_avgs[i] and exp_avg_sqs[i] (params[i]'s dtype, or fp32 when masters[i]
// holds an fp32 master copy), steps[i] (1-element fp32, incremented here). masters may be empty.
// found_inf != 0 skips the step (counters included); grad_scale unscales the grads in place.
void adamw_cpu(
    const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& exp_avgs,
    const std::vector<at::Tensor>& exp_avg_sqs,
    const std::vector<std::optional<at::Tensor>>& masters,
    const std::vector<at::Tensor>& steps,
    double lr,
    double beta1,
    double beta2,
    double eps,
    double weight_decay,
    bool maximize,
    const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf);

#ifdef PERFML_WITH_CUDA
// The same step over lists of CUDA tensors on one device (the cuda_ext backend): one
// multi-tensor launch per dtype group (csrc/adamw_cuda.cu). steps[i] live on the device and are
// incremented there, so the call never synchronizes and can be captured in a CUDA graph. lr_tensor
// (1-element fp32 on the device), when given, is read by the kernel instead of lr; grad_scale and
// found_inf are read on the device too.
void adamw_cuda(
    const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& exp_avgs,
    const std::vector<at::Tensor>& exp_avg_sqs,
    const std::vector<std::optional<at::Tensor>>& masters,
    const std::vector<at::Tensor>& steps,
    double lr,
    const std::optional<at::Tensor>& lr_tensor,
    double beta1,
    double beta2,
    double eps,
    double weight_decay,
    bool maximize,
    const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf);
#endif

} // namespace perfml
