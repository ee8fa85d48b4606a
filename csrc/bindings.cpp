// The Python module perfml._C: one pybind11 entry per kernel declared in perfml.h.
//
// Kernels release the GIL while they run: they touch no Python objects, and a data-loader
// thread should not stall behind a long normalization or optimizer step. The CUDA entries exist
// only in a build with CUDA (PERFML_WITH_CUDA); Python checks for them with hasattr.
#include <torch/extension.h>

#include "perfml.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "perfml C++/CUDA kernels; see perfml/ops/* and perfml/optim/* for the Python entry points";
  m.def(
      "cpu_kernel_isa",
      &perfml::cpu_kernel_isa,
      "Which build of the CPU kernels runs here: 'avx2' or 'default' (torch's CPU capability "
      "decides; ATEN_CPU_CAPABILITY=default forces the portable one).");
  m.def(
      "rms_norm_fwd",
      &perfml::rms_norm_fwd,
      "RMSNorm forward on CPU: (x [M, N], weight [N] | None, eps, offset, cast) -> "
      "(y [M, N], rstd [M] fp32). cast: 0 llama, 1 gemma, 2 none.",
      py::arg("x"),
      py::arg("weight"),
      py::arg("eps"),
      py::arg("offset"),
      py::arg("cast"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "rms_norm_bwd",
      &perfml::rms_norm_bwd,
      "RMSNorm backward on CPU: (dy, x, weight | None, rstd, offset, needs_dw) -> "
      "(dx [M, N] in x.dtype, dw [N] in weight.dtype or empty).",
      py::arg("dy"),
      py::arg("x"),
      py::arg("weight"),
      py::arg("rstd"),
      py::arg("offset"),
      py::arg("needs_dw"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "adamw_cpu",
      &perfml::adamw_cpu,
      "One AdamW step over lists of CPU tensors (see perfml/optim/adamw.py, adamw_ref): "
      "(params, grads, exp_avgs, exp_avg_sqs, masters, steps, lr, beta1, beta2, eps, "
      "weight_decay, maximize, grad_scale, found_inf); updates everything in place.",
      py::arg("params"),
      py::arg("grads"),
      py::arg("exp_avgs"),
      py::arg("exp_avg_sqs"),
      py::arg("masters"),
      py::arg("steps"),
      py::arg("lr"),
      py::arg("beta1"),
      py::arg("beta2"),
      py::arg("eps"),
      py::arg("weight_decay"),
      py::arg("maximize"),
      py::arg("grad_scale"),
      py::arg("found_inf"),
      py::call_guard<py::gil_scoped_release>());
#ifdef PERFML_WITH_CUDA
  m.def(
      "adamw_cuda",
      &perfml::adamw_cuda,
      "One AdamW step over lists of CUDA tensors, one multi-tensor launch per dtype group: "
      "(params, grads, exp_avgs, exp_avg_sqs, masters, steps, lr, lr_tensor, beta1, beta2, eps, "
      "weight_decay, maximize, grad_scale, found_inf); never synchronizes.",
      py::arg("params"),
      py::arg("grads"),
      py::arg("exp_avgs"),
      py::arg("exp_avg_sqs"),
      py::arg("masters"),
      py::arg("steps"),
      py::arg("lr"),
      py::arg("lr_tensor"),
      py::arg("beta1"),
      py::arg("beta2"),
      py::arg("eps"),
      py::arg("weight_decay"),
      py::arg("maximize"),
      py::arg("grad_scale"),
      py::arg("found_inf"),
      py::call_guard<py::gil_scoped_release>());
#endif
}
