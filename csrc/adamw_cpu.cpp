// AdamW step over many CPU tensors at once: the `cpu_ext` backend of perfml.optim.AdamW.
//
// Semantics are those of adamw_ref in perfml/optim/adamw.py (torch.optim.AdamW with decoupled
// weight decay, and torch's fused contract for GradScaler: found_inf skips the whole step, step
// counters included; grad_scale divides the grads, which are written back unscaled). Math in fp32
// whatever the storage dtype; bias corrections in double per tensor, from its own step count.
//
// This file holds the host side (checks, step counters, the work split, the choice of kernel
// build) and the DEFAULT build of the element loops (adamw_cpu_kernel.h), which runs on any CPU;
// the AVX2 build (adamw_cpu_avx2.cpp) runs where torch itself runs AVX2 or AVX-512 kernels, picked
// the way the RMSNorm kernels pick theirs (rms_norm_cpu.cpp).
// Trade-off: the whole step is one parallel region over fixed-size pieces of all tensors, so the
// split does not depend on the thread count (results are bitwise the same whatever it is) and the
// 100+ small tensors of a transformer cost no thread wake-ups of their own.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT

#include <cmath>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Version.h>

#include "adamw_cpu.h"
#include "adamw_cpu_kernel.h"
#include "perfml.h"

namespace perfml {
namespace {

// Elements per piece: 64K elements is 256 KiB of fp32 per array, a few hundred microseconds of
// work, so a piece amortizes its dispatch and two threads still get hundreds of pieces from a
// GPT-2-sized model.
constexpr int64_t kPieceSize = int64_t{1} << 16;

bool adamw_use_avx2() {
#ifdef PERFML_HAVE_AVX2_KERNELS
  static const bool avx2 = [] {
    const std::string capability = at::get_cpu_capability();
    return capability == "AVX2" || capability == "AVX512";
  }();
  return avx2;
#else
  return false;
#endif
}

bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_array(const at::Tensor& t, const at::Tensor& param, size_t i, const char* name,
                 at::ScalarType dtype) {
  constexpr const char* fn = "perfml._C.adamw_cpu";
  TORCH_CHECK(t.defined(), fn, ": ", name, "[", i, "] is an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, "[", i, "] must be a CPU tensor, got one on ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, "[", i, "] must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.numel() == param.numel(), fn, ": ", name, "[", i, "] has ", t.numel(),
              " elements but params[", i, "] has ", param.numel());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, "[", i, "] must be contiguous");
}

// A 1-element CPU tensor's value (grad_scale, found_inf).
double scalar_value(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.numel() == 1, "perfml._C.adamw_cpu: ", name,
              " must be a 1-element CPU tensor, got shape ", t.sizes(), " on ", t.device());
  return t.item<double>();
}

} // namespace

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
    const std::optional<at::Tensor>& found_inf) {
  constexpr const char* fn = "perfml._C.adamw_cpu";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  steps.size() == n && (masters.empty() || masters.size() == n),
              fn, ": params, grads, exp_avgs, exp_avg_sqs, steps (and masters, if given) must "
              "have the same length, got ", n, ", ", grads.size(), ", ", exp_avgs.size(), ", ",
              exp_avg_sqs.size(), ", ", steps.size(), " (masters ", masters.size(), ")");
  if (found_inf.has_value() && found_inf->defined() &&
      scalar_value(*found_inf, "found_inf") != 0.0) {
    return; // an overflowed step changes nothing, not even the step counters
  }
  const bool unscale = grad_scale.has_value() && grad_scale->defined();
  const double scale = unscale ? scalar_value(*grad_scale, "grad_scale") : 1.0;

  // Every check before the first write, so a bad call leaves the state as it was.
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined() && p.device().is_cpu(), fn, ": params[", i,
                "] must be a CPU tensor");
    TORCH_CHECK(is_kernel_dtype(p.scalar_type()), fn, ": params[", i,
                "] must be float32, bfloat16 or float16, got ", p.scalar_type());
    TORCH_CHECK(p.is_contiguous(), fn, ": params[", i, "] must be contiguous");
    const bool has_master = !masters.empty() && masters[i].has_value() && masters[i]->defined();
    TORCH_CHECK(!has_master || p.scalar_type() != at::kFloat, fn, ": masters[", i,
                "] is given for a float32 param (master copies are for bf16/fp16 params)");
    const at::ScalarType state = has_master ? at::kFloat : p.scalar_type();
    check_array(grads[i], p, i, "grads", p.scalar_type());
    check_array(exp_avgs[i], p, i, "exp_avgs", state);
    check_array(exp_avg_sqs[i], p, i, "exp_avg_sqs", state);
    if (has_master) {
      check_array(*masters[i], p, i, "masters", at::kFloat);
    }
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.defined() && s.device().is_cpu() && s.scalar_type() == at::kFloat &&
                    s.numel() == 1,
                fn, ": steps[", i, "] must be a 1-element float32 CPU tensor");
  }

  std::vector<AdamWCpuTensor> tensors(n);
  std::vector<AdamWCpuPiece> pieces;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const bool has_master = !masters.empty() && masters[i].has_value() && masters[i]->defined();
    float* step = steps[i].mutable_data_ptr<float>();
    *step += 1.0f;
    const double k = static_cast<double>(*step);
    AdamWCpuTensor& t = tensors[i];
    t.param_dtype = p.scalar_type();
    t.state_dtype = exp_avgs[i].scalar_type();
    t.param = p.mutable_data_ptr();
    t.grad = grads[i].mutable_data_ptr();
    t.exp_avg = exp_avgs[i].mutable_data_ptr();
    t.exp_avg_sq = exp_avg_sqs[i].mutable_data_ptr();
    t.master = has_master ? masters[i]->mutable_data_ptr<float>() : nullptr;
    t.numel = p.numel();
    t.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, k)));
    t.inv_bc2_sqrt = static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(beta2, k)));
    for (int64_t begin = 0; begin < t.numel; begin += kPieceSize) {
      pieces.push_back({static_cast<int64_t>(i), begin, std::min(t.numel, begin + kPieceSize)});
    }
  }
  if (pieces.empty()) {
    return;
  }
  AdamWCpuArgs args{};
  args.tensors = tensors.data();
  args.pieces = pieces.data();
  args.num_pieces = static_cast<int64_t>(pieces.size());
  args.beta1 = static_cast<float>(beta1);
  args.beta2 = static_cast<float>(beta2);
  args.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  args.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  args.eps = static_cast<float>(eps);
  args.decay = static_cast<float>(1.0 - lr * weight_decay);
  args.grad_sign = maximize ? -1.0f : 1.0f;
  args.unscale = unscale;
  args.grad_scale = static_cast<float>(scale);
#ifdef PERFML_HAVE_AVX2_KERNELS
  if (adamw_use_avx2()) {
    AVX2::adamw_cpu_kernel(args);
    return;
  }
#endif
  DEFAULT::adamw_cpu_kernel(args);
}

} // namespace perfml
