// RMSNorm forward and backward for CPU tensors: the `cpp` path of perfml.ops.rms_norm.
//
// Semantics are those of _rms_norm_fwd_ref / _rms_norm_bwd_ref in perfml/ops/rms_norm.py: math in
// fp32 (fp64 for fp64 inputs) whatever the storage dtype, one fp32 rstd per row saved for the
// backward, and the three casting conventions (0 llama, 1 gemma, 2 none).
//
// This file holds the host side (checks, allocation, the choice of kernel build) and the DEFAULT
// build of the row kernels (rms_norm_cpu_kernel.h), which runs on any CPU. The AVX2 build
// (rms_norm_cpu_avx2.cpp) runs where torch itself runs AVX2 or AVX-512 kernels.
// Trade-off: two builds of the kernels instead of one -march flag, so that one binary is both
// portable and fast; on the 2-core AVX-512 dev machine the AVX2 build is 5-10x faster than the
// DEFAULT one on cached rows (at::vec's portable code compiles to mostly scalar instructions) and
// runs about as fast as a copy of x on large ones.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT

#include <algorithm>
#include <cmath>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Version.h>

#include "perfml.h"
#include "rms_norm_cpu.h"
#include "rms_norm_cpu_kernel.h"

namespace perfml {
namespace {

// dweight chunks: a constant, not the thread count, so that dw has the same bits whatever the
// thread count; 64 keeps every thread of common hosts busy. The partial rows are capped at 4M
// elements (16 MiB in fp32; wide rows get fewer chunks) so they stay small next to the inputs.
constexpr int64_t kMaxDwChunks = 64;
constexpr int64_t kDwPartialBudget = int64_t{1} << 22;

bool use_avx2_kernels() {
#ifdef PERFML_HAVE_AVX2_KERNELS
  // torch's own decision for its CPU kernels: cpuinfo, overridable with ATEN_CPU_CAPABILITY.
  static const bool avx2 = [] {
    const std::string capability = at::get_cpu_capability();
    return capability == "AVX2" || capability == "AVX512";
  }();
  return avx2;
#else
  return false;
#endif
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

void check_rows(const at::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got one on ",
              t.device());
  TORCH_CHECK(t.dim() == 2, fn, ": ", name, " must be 2-D [rows, hidden], got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous (shape ", t.sizes(),
              ", strides ", t.strides(), ")");
  TORCH_CHECK(is_supported_float(t.scalar_type()), fn, ": ", name,
              " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.size(1) >= 1, fn, ": ", name, " must have a hidden size (dim 1) of at least 1");
}

bool has(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

void check_weight(const std::optional<at::Tensor>& weight, const at::Tensor& x, const char* fn) {
  if (!has(weight)) {
    return;
  }
  const at::Tensor& w = *weight;
  TORCH_CHECK(w.device().is_cpu(), fn, ": weight must be a CPU tensor, got one on ", w.device());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1), fn, ": weight must have shape [",
              x.size(1), "] to match x's hidden size, got ", w.sizes());
  TORCH_CHECK(is_supported_float(w.scalar_type()), fn,
              ": weight must be float32, bfloat16, float16 or float64, got ", w.scalar_type());
}

// weight + offset in the math dtype, contiguous: a small [n] tensor made once per call, so the
// row loops read one dtype whatever weight's is (fp32 weights with bf16 x are common).
at::Tensor effective_weight(const at::Tensor& w, at::ScalarType math, double offset) {
  at::Tensor w_eff = w.to(math).contiguous();
  return offset != 0.0 ? w_eff + offset : w_eff;
}

} // namespace

const char* cpu_kernel_isa() {
  return use_avx2_kernels() ? "avx2" : "default";
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(
    const at::Tensor& x,
    const std::optional<at::Tensor>& weight,
    double eps,
    double offset,
    int64_t cast) {
  constexpr const char* fn = "perfml._C.rms_norm_fwd";
  check_rows(x, fn, "x");
  check_weight(weight, x, fn);
  TORCH_CHECK(cast == kCastLlama || cast == kCastGemma || cast == kCastNone, fn,
              ": cast must be 0 (llama), 1 (gemma) or 2 (none), got ", cast);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, fn, ": eps must be finite and >= 0, got ", eps);
  const int64_t m = x.size(0), n = x.size(1);
  const bool with_weight = has(weight);
  const at::ScalarType math = at::toOpMathType(x.scalar_type());
  const at::ScalarType out_dtype = with_weight && cast == kCastLlama
      ? at::promote_types(x.scalar_type(), weight->scalar_type())
      : x.scalar_type();
  // llama's product is computed in the math dtype and rounded to promote(x, weight), so a y
  // dtype other than x's is written in the math dtype and, if it is wider still (fp64 weight
  // with fp32 x), cast once at the end: the same roundings as the reference.
  const bool y_in_math = out_dtype != x.scalar_type();
  at::Tensor y = at::empty({m, n}, x.options().dtype(y_in_math ? math : out_dtype));
  at::Tensor rstd = at::empty({m}, x.options().dtype(at::kFloat));
  if (m > 0) {
    const at::Tensor w_eff =
        with_weight ? effective_weight(*weight, math, offset) : at::Tensor();
    const RmsNormFwdArgs args{
        x.scalar_type(), y_in_math, x.const_data_ptr(), y.mutable_data_ptr(),
        with_weight ? w_eff.const_data_ptr() : nullptr, rstd.mutable_data_ptr<float>(), m, n,
        eps, cast};
#ifdef PERFML_HAVE_AVX2_KERNELS
    if (use_avx2_kernels()) {
      AVX2::rms_norm_fwd_kernel(args);
    } else {
      DEFAULT::rms_norm_fwd_kernel(args);
    }
#else
    DEFAULT::rms_norm_fwd_kernel(args);
#endif
  }
  return {y.scalar_type() == out_dtype ? y : y.to(out_dtype), rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(
    const at::Tensor& dy,
    const at::Tensor& x,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& rstd,
    double offset,
    bool needs_dw) {
  constexpr const char* fn = "perfml._C.rms_norm_bwd";
  check_rows(x, fn, "x");
  check_rows(dy, fn, "dy");
  TORCH_CHECK(dy.sizes() == x.sizes(), fn, ": dy must have x's shape ", x.sizes(), ", got ",
              dy.sizes());
  check_weight(weight, x, fn);
  TORCH_CHECK(rstd.device().is_cpu(), fn, ": rstd must be a CPU tensor, got one on ",
              rstd.device());
  TORCH_CHECK(rstd.scalar_type() == at::kFloat, fn,
              ": rstd must be float32 (as rms_norm_fwd returns it), got ", rstd.scalar_type());
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == x.size(0) && rstd.is_contiguous(), fn,
              ": rstd must be a contiguous [", x.size(0), "] tensor (one per row of x), got shape ",
              rstd.sizes());
  const int64_t m = x.size(0), n = x.size(1);
  const bool with_weight = has(weight);
  const bool compute_dw = with_weight && needs_dw;
  const at::ScalarType math = at::toOpMathType(x.scalar_type());
  at::Tensor dx = at::empty({m, n}, x.options());
  if (m == 0) {
    return {dx, compute_dw ? at::zeros({n}, weight->options()) : x.new_empty({0})};
  }
  // dy comes in the forward's output dtype, which llama promotes (bf16 x with an fp32 weight
  // gives fp32 dy). The kernels read dy in x's dtype or in the math dtype; any other dtype is
  // cast to the math dtype, which is what the reference computes with.
  const bool dy_in_math = dy.scalar_type() != x.scalar_type();
  const at::Tensor dy_k = dy_in_math && dy.scalar_type() != math ? dy.to(math) : dy;
  const at::Tensor w_eff = with_weight ? effective_weight(*weight, math, offset) : at::Tensor();

  // At most kMaxDwChunks chunks of at least one row, with the partial rows within budget.
  const int64_t want_chunks =
      std::min({m, kMaxDwChunks, std::max<int64_t>(1, kDwPartialBudget / n)});
  const int64_t rows_per_chunk = (m + want_chunks - 1) / want_chunks;
  const int64_t chunks = (m + rows_per_chunk - 1) / rows_per_chunk;
  at::Tensor dw_part, dw;
  if (compute_dw) {
    dw_part = at::empty({chunks, n}, x.options().dtype(math));
    dw = at::empty({n}, x.options().dtype(math));
  }
  const RmsNormBwdArgs args{
      x.scalar_type(), dy_in_math, dy_k.const_data_ptr(), x.const_data_ptr(),
      with_weight ? w_eff.const_data_ptr() : nullptr, rstd.const_data_ptr<float>(),
      dx.mutable_data_ptr(), compute_dw ? dw_part.mutable_data_ptr() : nullptr,
      compute_dw ? dw.mutable_data_ptr() : nullptr, chunks, rows_per_chunk, m, n};
#ifdef PERFML_HAVE_AVX2_KERNELS
  if (use_avx2_kernels()) {
    AVX2::rms_norm_bwd_kernel(args);
  } else {
    DEFAULT::rms_norm_bwd_kernel(args);
  }
#else
  DEFAULT::rms_norm_bwd_kernel(args);
#endif
  if (!compute_dw) {
    return {dx, x.new_empty({0})};
  }
  return {dx, dw.to(weight->scalar_type())};
}

} // namespace perfml
