// FASTDL_HD marks small math shared by the CPU (.cpp) and CUDA (.cu) kernels:
// callable from host and device code under nvcc, a plain inline function under
// the host compiler.
#pragma once

#if defined(__CUDACC__)
#define FASTDL_HD __host__ __device__ __forceinline__
#else
#define FASTDL_HD inline
#endif
