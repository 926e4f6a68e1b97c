// 16-byte vector loads and stores for memory-bound kernels: one LDG.128 /
// STG.128 per thread moves 4 fp32 or 8 fp16/bf16 values.
#pragma once
#include <cstdint>

namespace fastdl {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* ptr) {
  return *reinterpret_cast<const Vec<T, N>*>(ptr);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* ptr, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(ptr) = v;
}

inline bool is_aligned(const void* ptr, int bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % bytes == 0;
}

}  // namespace fastdl
