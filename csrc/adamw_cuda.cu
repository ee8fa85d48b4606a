// The torch side of the CUDA AdamW (the cuda_ext backend of perfml.optim.AdamW): checks, step
// counters, grouping by dtype, the current stream. The kernels themselves live in the torch-free
// adamw_cuda_kernel.cu.
//
// Nothing here reads device memory from the host: the step counters are incremented on the device
// (one foreach launch), the kernels compute bias corrections from them and read lr, grad_scale and
// found_inf through pointers, and an overflowed step is undone on the device. So a step never
// synchronizes and can be captured in a CUDA graph.
#include <array>
#include <cmath>
#include <map>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "adamw_cuda.h"
#include "perfml.h"

namespace perfml {
namespace {

constexpr const char* kFn = "perfml._C.adamw_cuda";

AdamWDtype kernel_dtype(at::ScalarType t, size_t i) {
  switch (t) {
    case at::kFloat:
      return AdamWDtype::kFloat32;
    case at::kBFloat16:
      return AdamWDtype::kBFloat16;
    case at::kHalf:
      return AdamWDtype::kFloat16;
    default:
      TORCH_CHECK(false, kFn, ": params[", i, "] must be float32, bfloat16 or float16, got ", t);
  }
}

void check_array(const at::Tensor& t, const at::Tensor& param, size_t i, const char* name,
                 at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), kFn, ": ", name, "[", i, "] is an undefined tensor");
  TORCH_CHECK(t.device() == param.device(), kFn, ": ", name, "[", i, "] is on ", t.device(),
              " but params[", i, "] is on ", param.device());
  TORCH_CHECK(t.scalar_type() == dtype, kFn, ": ", name, "[", i, "] must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.numel() == param.numel(), kFn, ": ", name, "[", i, "] has ", t.numel(),
              " elements but params[", i, "] has ", param.numel());
  TORCH_CHECK(t.is_contiguous(), kFn, ": ", name, "[", i, "] must be contiguous");
}

// A 1-element fp32 tensor on `device` (lr_tensor, grad_scale, found_inf), as a device pointer.
const float* scalar_ptr(const std::optional<at::Tensor>& t, const at::Device& device,
                        const char* name) {
  if (!t.has_value() || !t->defined()) {
    return nullptr;
  }
  TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->numel() == 1, kFn,
              ": ", name, " must be a 1-element float32 tensor on ", device, ", got ",
              t->scalar_type(), " shape ", t->sizes(), " on ", t->device());
  return t->const_data_ptr<float>();
}

} // namespace

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
    const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  steps.size() == n && (masters.empty() || masters.size() == n),
              kFn, ": params, grads, exp_avgs, exp_avg_sqs, steps (and masters, if given) must "
              "have the same length, got ", n, ", ", grads.size(), ", ", exp_avgs.size(), ", ",
              exp_avg_sqs.size(), ", ", steps.size(), " (masters ", masters.size(), ")");
  if (n == 0) {
    return;
  }
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), kFn, ": params must be CUDA tensors, got one on ", device);

  // Every check before the first write, so a bad call leaves the state as it was.
  std::map<std::pair<int, bool>, AdamWCudaGroup> groups;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined() && p.device() == device, kFn, ": params[", i, "] is on ", p.device(),
                " but params[0] is on ", device, " (one call per device)");
    TORCH_CHECK(p.is_contiguous(), kFn, ": params[", i, "] must be contiguous");
    const AdamWDtype dtype = kernel_dtype(p.scalar_type(), i);
    const bool has_master = !masters.empty() && masters[i].has_value() && masters[i]->defined();
    TORCH_CHECK(!has_master || dtype != AdamWDtype::kFloat32, kFn, ": masters[", i,
                "] is given for a float32 param (master copies are for bf16/fp16 params)");
    const at::ScalarType state = has_master ? at::kFloat : p.scalar_type();
    check_array(grads[i], p, i, "grads", p.scalar_type());
    check_array(exp_avgs[i], p, i, "exp_avgs", state);
    check_array(exp_avg_sqs[i], p, i, "exp_avg_sqs", state);
    if (has_master) {
      check_array(*masters[i], p, i, "masters", at::kFloat);
    }
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.defined() && s.device() == device && s.scalar_type() == at::kFloat &&
                    s.numel() == 1,
                kFn, ": steps[", i, "] must be a 1-element float32 tensor on ", device);
    AdamWCudaGroup& group = groups[{static_cast<int>(dtype), has_master}];
    group.param_dtype = dtype;
    group.master = has_master;
    group.tensors.push_back({p.mutable_data_ptr(), grads[i].mutable_data_ptr(),
                             exp_avgs[i].mutable_data_ptr(), exp_avg_sqs[i].mutable_data_ptr(),
                             s.mutable_data_ptr(),
                             has_master ? masters[i]->mutable_data_ptr() : nullptr});
    group.sizes.push_back(p.numel());
  }

  AdamWScalars scalars{};
  scalars.lr = static_cast<float>(lr);
  scalars.lr_ptr = scalar_ptr(lr_tensor, device, "lr_tensor");
  scalars.weight_decay = static_cast<float>(weight_decay);
  scalars.beta1 = static_cast<float>(beta1);
  scalars.beta2 = static_cast<float>(beta2);
  scalars.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  scalars.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  // beta = 0 (no momentum): beta**step is 0 for step >= 1; a very negative log gives that
  scalars.log_beta1 = beta1 > 0.0 ? std::log(beta1) : -1e300;
  scalars.log_beta2 = beta2 > 0.0 ? std::log(beta2) : -1e300;
  scalars.eps = static_cast<float>(eps);
  scalars.grad_sign = maximize ? -1.0f : 1.0f;
  scalars.grad_scale = scalar_ptr(grad_scale, device, "grad_scale");
  scalars.found_inf = scalar_ptr(found_inf, device, "found_inf");

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  at::_foreach_add_(steps, 1);
  for (const auto& entry : groups) {
    const cudaError_t err = adamw_cuda_launch(entry.second, scalars, stream);
    TORCH_CHECK(err == cudaSuccess, kFn, ": kernel launch failed: ", cudaGetErrorString(err));
  }
  if (scalars.found_inf != nullptr) {
    // The kernels skipped the update; undo the count, on the device.
    at::_foreach_sub_(steps, std::vector<at::Tensor>(n, found_inf->reshape({})));
  }
}

} // namespace perfml
