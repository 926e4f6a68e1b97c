// Launch helpers: device guard, current stream, SM count, launch error check.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace fastdl {

// Cached per device: cudaDeviceGetAttribute is cheap but not free, and the
// launch path of small tensors is dominated by such host costs.
inline int sm_count(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (cache[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n;
  }
  return cache[device];
}

// Blocks for a grid-stride loop over `work` items, capped at a few waves of
// full occupancy so the tail wave stays short.
inline unsigned grid_for(int64_t work, int threads, int device, int waves = 4) {
  const int64_t needed = (work + threads - 1) / threads;
  const int64_t cap = int64_t(sm_count(device)) * (2048 / threads) * waves;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(needed, cap)));
}

}  // namespace fastdl
