// The CUDA AdamW kernels: every (param dtype, master copy) combination of AdamWFunctor, launched
// through multi_tensor_apply, behind the torch-free entry point adamw_cuda_launch (adamw_cuda.h).
//
// This translation unit includes no torch header on purpose: tests/test_cuda_compile.py compiles
// it with plain nvcc for sm_90 on machines without a GPU, which checks every functor and launcher
// instantiation below even where the extension itself is built without CUDA.
#include <array>
#include <cstdint>
#include <vector>

#include "adamw_cuda.h"
#include "adamw_cuda_kernel.cuh"
#include "multi_tensor_apply.cuh"

namespace perfml {

namespace adamw {
// Every functor the dispatch below can launch, instantiated explicitly so a compile of this file
// alone checks all of them.
template struct AdamWFunctor<float, false>;
template struct AdamWFunctor<__nv_bfloat16, false>;
template struct AdamWFunctor<__nv_bfloat16, true>;
template struct AdamWFunctor<__half, false>;
template struct AdamWFunctor<__half, true>;
} // namespace adamw

namespace {

// Elements per chunk: the unit a block takes, and so the tail of a launch (at most one chunk per
// block). 8192 elements are 8 vector iterations of a 512-thread block at kVec 4, ILP 2; the
// per-chunk set-up (binary search, two double expm1) is small next to them.
constexpr int64_t kChunkSize = 8192;

template <typename P, bool kMaster>
cudaError_t launch(const AdamWCudaGroup& group, const AdamWScalars& scalars, cudaStream_t stream) {
  using Functor = adamw::AdamWFunctor<P, kMaster>;
  constexpr int kDepth = Functor::kDepth;
  static_assert(kChunkSize % Functor::kVec == 0);
  std::vector<std::array<void*, kDepth>> lists(group.tensors.size());
  for (size_t i = 0; i < group.tensors.size(); ++i) {
    for (int d = 0; d < kDepth; ++d) {
      lists[i][d] = group.tensors[i][d];
    }
  }
  return mta::multi_tensor_apply<kDepth>(lists, group.sizes, kChunkSize, Functor{scalars}, stream);
}

} // namespace

cudaError_t adamw_cuda_launch(const AdamWCudaGroup& group, const AdamWScalars& scalars,
                              cudaStream_t stream) {
  switch (group.param_dtype) {
    case AdamWDtype::kFloat32:
      return group.master ? cudaErrorInvalidValue : launch<float, false>(group, scalars, stream);
    case AdamWDtype::kBFloat16:
      return group.master ? launch<__nv_bfloat16, true>(group, scalars, stream)
                          : launch<__nv_bfloat16, false>(group, scalars, stream);
    case AdamWDtype::kFloat16:
      return group.master ? launch<__half, true>(group, scalars, stream)
                          : launch<__half, false>(group, scalars, stream);
  }
  return cudaErrorInvalidValue;
}

} // namespace perfml
