// Declarations of the functions that csrc/bindings.cpp exposes as perfml._C.
//
// The kernel sources include only ATen headers and this file; only bindings.cpp pays for
// torch/extension.h (pybind11), which keeps the parallel build of the sources short.
#pragma once

#include <optional>
#include <tuple>

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

} // namespace perfml
