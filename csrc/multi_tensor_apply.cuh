// A generic multi-tensor-apply launcher: one kernel launch updates many tensors, each cut into
// fixed-size chunks, with a functor that says what to do to one chunk.
//
// Torch-free (CUDA runtime only), so CI machines without a GPU or a CUDA build of torch can still
// compile it with nvcc (tests/test_cuda_compile.py).
//
// Design, after apex's and torch's multi_tensor_apply, with two changes:
//  - The tensor list travels in the kernel's parameters (a __grid_constant__ struct of at most
//    4 KiB, the limit on every CUDA version and architecture): per tensor kDepth addresses, its
//    size and a running count of chunks. No table in device memory, so nothing to copy before a
//    launch and nothing that could go stale inside a captured CUDA graph.
//  - The grid is persistent: as many blocks as fit on the device at once, each striding over the
//    launch's chunks and finding a chunk's tensor by binary search in the running counts. apex and
//    torch instead map each block to one chunk through a per-block table, which caps a launch at
//    ~320 chunks (about 20M elements), so a 124M-parameter model needs a launch per 20M elements,
//    each ending in a partial wave. Here a launch is bounded by tensor count only (~60-70 per
//    launch), and the tail is at most one chunk per block.
// The list entries are lists of per-tensor pointers; a list may point at a 1-element array per
// tensor (AdamW's step counters), which the functor reads as a scalar. sizes are the element
// counts of list 0's tensors.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <vector>

#include <cuda_runtime.h>

namespace perfml {
namespace mta {

constexpr int kBlockThreads = 512;
// At least two blocks per SM (so at most 64 registers per thread): one block's stores overlap the
// other's loads, and a memory-bound functor needs the threads to keep enough bytes in flight.
constexpr int kMinBlocksPerSm = 2;
constexpr int kParamBytes = 4096; // kernel parameter space available on every CUDA setup
constexpr int kReservedBytes = 384; // the functor's own arguments and the launch scalars

// Tensors per launch: kDepth addresses + size + running chunk count, 8 bytes each.
template <int kDepth>
constexpr int max_tensors() {
  return (kParamBytes - kReservedBytes) / (8 * (kDepth + 2));
}

template <int kDepth>
struct TensorListMeta {
  static constexpr int kMaxTensors = max_tensors<kDepth>();
  void* addresses[kDepth][kMaxTensors];
  int64_t sizes[kMaxTensors];
  // chunk_end[t]: chunks of tensors 0..t together; tensor t owns [chunk_end[t-1], chunk_end[t]).
  int64_t chunk_end[kMaxTensors];
  int num_tensors;
};

// Functor: a copyable struct with
//   __device__ void operator()(const TensorListMeta<kDepth>& meta, int tensor, int64_t begin,
//                              int64_t end) const;
// called by every thread of the block for elements [begin, end) of tensor `tensor`.
template <int kDepth, typename Functor>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm)
    multi_tensor_apply_kernel(const __grid_constant__ TensorListMeta<kDepth> meta,
                              const __grid_constant__ Functor functor,
                              int64_t chunk_size) {
  const int64_t total = meta.chunk_end[meta.num_tensors - 1];
  for (int64_t chunk = blockIdx.x; chunk < total; chunk += gridDim.x) {
    // The first tensor whose running count passes `chunk`; the same for every thread.
    int lo = 0, hi = meta.num_tensors - 1;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (meta.chunk_end[mid] > chunk) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    const int64_t first = lo == 0 ? 0 : meta.chunk_end[lo - 1];
    const int64_t begin = (chunk - first) * chunk_size;
    const int64_t end = begin + chunk_size < meta.sizes[lo] ? begin + chunk_size : meta.sizes[lo];
    functor(meta, lo, begin, end);
  }
}

// Blocks that fit on the current device at once for this kernel (cached per device).
template <int kDepth, typename Functor>
cudaError_t resident_blocks(int* blocks) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) {
    return err;
  }
  if (device < kMaxDevices && cached[device].load(std::memory_order_relaxed) > 0) {
    *blocks = cached[device].load(std::memory_order_relaxed);
    return cudaSuccess;
  }
  int sms = 0, per_sm = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) {
    return err;
  }
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, multi_tensor_apply_kernel<kDepth, Functor>, kBlockThreads, 0);
  if (err != cudaSuccess) {
    return err;
  }
  *blocks = std::max(1, sms * std::max(1, per_sm));
  if (device < kMaxDevices) {
    cached[device].store(*blocks, std::memory_order_relaxed);
  }
  return cudaSuccess;
}

// Apply `functor` to every element of every tensor: tensors[i] holds the kDepth addresses of
// entry i, sizes[i] its element count (entries of size 0 are skipped). chunk_size must be a
// multiple of the functor's vector width. Launches on `stream`, in order; returns the first error.
template <int kDepth, typename Functor>
cudaError_t multi_tensor_apply(const std::vector<std::array<void*, kDepth>>& tensors,
                               const std::vector<int64_t>& sizes,
                               int64_t chunk_size,
                               const Functor& functor,
                               cudaStream_t stream) {
  using Meta = TensorListMeta<kDepth>;
  static_assert(sizeof(Meta) + sizeof(Functor) + sizeof(int64_t) <= kParamBytes,
                "kernel parameters over 4 KiB: lower max_tensors or the functor's size");
  int grid_limit = 0;
  cudaError_t err = resident_blocks<kDepth, Functor>(&grid_limit);
  if (err != cudaSuccess) {
    return err;
  }
  Meta meta;
  meta.num_tensors = 0;
  int64_t chunks = 0;
  auto launch = [&]() -> cudaError_t {
    const int64_t grid = std::min<int64_t>(chunks, grid_limit);
    multi_tensor_apply_kernel<kDepth, Functor>
        <<<static_cast<unsigned>(grid), kBlockThreads, 0, stream>>>(meta, functor, chunk_size);
    meta.num_tensors = 0;
    chunks = 0;
    return cudaGetLastError();
  };
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (sizes[i] == 0) {
      continue;
    }
    const int t = meta.num_tensors;
    for (int d = 0; d < kDepth; ++d) {
      meta.addresses[d][t] = tensors[i][d];
    }
    meta.sizes[t] = sizes[i];
    chunks += (sizes[i] + chunk_size - 1) / chunk_size;
    meta.chunk_end[t] = chunks;
    meta.num_tensors = t + 1;
    if (meta.num_tensors == Meta::kMaxTensors) {
      err = launch();
      if (err != cudaSuccess) {
        return err;
      }
    }
  }
  if (meta.num_tensors > 0) {
    err = launch();
  }
  return err;
}

} // namespace mta
} // namespace perfml
