// CUDA kernels for the LayerNorm / RMSNorm family (shapes and checks: norm.h;
// the backward math is derived in kernels/norm.py).
//
// Rows of the (rows, cols) input go to groups of blockDim.x threads (a
// multiple of 32); a block holds blockDim.y such rows. Accesses are 16-byte
// vectors (VEC = 8 fp16/bf16 or 4 fp32 values) when the pointers are aligned
// and cols % VEC == 0, else scalars (VEC = 1) through the same templates.
//
//  * CACHED rows (up to kFwdElems / kBwdElems values per thread) are read
//    from global memory once and kept in registers between the reduction and
//    the output; wider rows loop over the row again (an L2 hit, mostly).
//  * Row sums: a warp shuffle tree, then (rows wider than a warp) a fixed-order
//    pass through shared memory. Statistics in fp32.
//  * dweight/dbias without atomics: the CACHED backward runs a persistent grid
//    whose threads own fixed columns, so each block adds its rows into
//    registers and writes one fp32 partial row; wider rows get their partial
//    rows from a column-tiled kernel over fixed row groups. sum_partials_kernel
//    adds the partial rows in a fixed order: the same bits every run.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <type_traits>

#include "common/launch.cuh"
#include "common/vec.cuh"
#include "norm.h"

namespace fastdl {
namespace {

constexpr int kWarp = 32;
constexpr int kFwdMaxThreads = 512;   // threads of one row, forward
constexpr int kBwdMaxThreads = 512;   // backward (more live registers per value)

// Values one thread keeps in registers on the CACHED path.
constexpr int fwd_elems(int vec) { return vec == 1 ? 16 : 32; }
constexpr int bwd_elems(int vec) { return vec == 1 ? 8 : 16; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums each v[k] over the blockDim.x threads of this thread's row and gives
// every one of them the totals. Every thread of the block must call it: it
// synchronizes the block when a row spans several warps.
template <int K>
__device__ __forceinline__ void row_sum(float (&v)[K]) {
  __shared__ float scratch[K][kWarp];
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  if (blockDim.x == kWarp) return;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = tid % kWarp, row_warps = blockDim.x / kWarp;
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) scratch[k][tid / kWarp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = warp_sum(lane < row_warps ? scratch[k][threadIdx.y * row_warps + lane] : 0.f);
  }
}

// s = x (+ res, rounded to T and stored to res_out when `store`), as floats.
template <typename T, int VEC>
__device__ __forceinline__ void load_sum(const T* x, const T* res, T* res_out, int64_t off,
                                         float (&s)[VEC], bool store) {
  const Vec<T, VEC> xv = load_vec<T, VEC>(x + off);
  if (res == nullptr) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) s[j] = static_cast<float>(xv.val[j]);
    return;
  }
  const Vec<T, VEC> rv = load_vec<T, VEC>(res + off);
  Vec<T, VEC> sv;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    sv.val[j] = static_cast<T>(static_cast<float>(xv.val[j]) + static_cast<float>(rv.val[j]));
    s[j] = static_cast<float>(sv.val[j]);
  }
  if (store) store_vec<T, VEC>(res_out + off, sv);
}

// Loads VEC parameter values at column c as floats (1 when p is null).
template <typename W, int VEC>
__device__ __forceinline__ void load_param(const W* p, int c, float (&out)[VEC], float dflt) {
  if (p == nullptr) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = dflt;
    return;
  }
  const Vec<W, VEC> v = load_vec<W, VEC>(p + c);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = static_cast<float>(v.val[j]);
}

template <typename T, typename W, int VEC>
__device__ __forceinline__ void store_out(T* y, int64_t off, int c, const float (&s)[VEC], float mu,
                                          float rs, const W* w, const W* b) {
  float wv[VEC], bv[VEC];
  load_param<W, VEC>(w, c, wv, 1.f);
  load_param<W, VEC>(b, c, bv, 0.f);
  Vec<T, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) out.val[j] = static_cast<T>((s[j] - mu) * rs * wv[j] + bv[j]);
  store_vec<T, VEC>(y + off, out);
}

// Every block walks rows r0 + threadIdx.y for r0 = blockIdx.x * blockDim.y,
// stepping by the grid: all threads of a block run the same number of
// iterations (row_sum synchronizes), rows past the end count as empty.
template <typename T, typename W, int VEC, bool RMS, bool CACHED>
__global__ void __launch_bounds__(kFwdMaxThreads)
    norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ res, const W* __restrict__ w,
                    const W* __restrict__ b, T* __restrict__ y, T* __restrict__ res_out,
                    float* __restrict__ mean, float* __restrict__ rstd, int64_t rows, int cols,
                    float eps) {
  constexpr int NV = CACHED ? fwd_elems(VEC) / VEC : 1;
  const int tpr = blockDim.x, tx = threadIdx.x;
  const float inv_n = 1.f / static_cast<float>(cols);
  for (int64_t r0 = int64_t(blockIdx.x) * blockDim.y; r0 < rows; r0 += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = r0 + threadIdx.y;
    const bool live = row < rows;
    const int nvec = live ? cols / VEC : 0;
    const int64_t base = live ? row * cols : 0;
    float mu = 0.f, rs;
    if constexpr (CACHED) {
      float v[NV][VEC];
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int vi = i * tpr + tx;
        if (vi < nvec) {
          load_sum<T, VEC>(x, res, res_out, base + int64_t(vi) * VEC, v[i], true);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) v[i][j] = 0.f;
        }
      }
      if constexpr (!RMS) {
        float t[1] = {0.f};
#pragma unroll
        for (int i = 0; i < NV; ++i)
#pragma unroll
          for (int j = 0; j < VEC; ++j) t[0] += v[i][j];
        row_sum(t);
        mu = t[0] * inv_n;
      }
      float t[1] = {0.f};
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        if (i * tpr + tx < nvec) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) t[0] += (v[i][j] - mu) * (v[i][j] - mu);
        }
      }
      row_sum(t);
      rs = rsqrtf(t[0] * inv_n + eps);
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int vi = i * tpr + tx;
        if (vi < nvec) store_out<T, W, VEC>(y, base + int64_t(vi) * VEC, vi * VEC, v[i], mu, rs, w, b);
      }
    } else {
      // Pass 1 stores the sum; later passes form it again from x and res
      // (rounded the same way) rather than read res_out back through the
      // read-only cache.
      float t[1] = {0.f};
      for (int vi = tx; vi < nvec; vi += tpr) {
        float s[VEC];
        load_sum<T, VEC>(x, res, res_out, base + int64_t(vi) * VEC, s, true);
#pragma unroll
        for (int j = 0; j < VEC; ++j) t[0] += RMS ? s[j] * s[j] : s[j];
      }
      row_sum(t);
      if constexpr (!RMS) {
        // Two-pass variance: no cancellation in E[x^2] - E[x]^2.
        mu = t[0] * inv_n;
        t[0] = 0.f;
        for (int vi = tx; vi < nvec; vi += tpr) {
          float s[VEC];
          load_sum<T, VEC>(x, res, nullptr, base + int64_t(vi) * VEC, s, false);
#pragma unroll
          for (int j = 0; j < VEC; ++j) t[0] += (s[j] - mu) * (s[j] - mu);
        }
        row_sum(t);
      }
      rs = rsqrtf(t[0] * inv_n + eps);
      for (int vi = tx; vi < nvec; vi += tpr) {
        float s[VEC];
        load_sum<T, VEC>(x, res, nullptr, base + int64_t(vi) * VEC, s, false);
        store_out<T, W, VEC>(y, base + int64_t(vi) * VEC, vi * VEC, s, mu, rs, w, b);
      }
    }
    if (live && tx == 0) {
      if constexpr (!RMS) mean[row] = mu;
      rstd[row] = rs;
    }
  }
}

// One VEC-wide piece of the backward at column c: loads x and g, returns
// xhat and g, and adds gw = g * w and gw * xhat to the row sums t.
template <typename T, typename W, int VEC>
__device__ __forceinline__ void bwd_load(const T* x, const T* g, const W* w, int64_t off, int c,
                                         float mu, float rs, float (&xh)[VEC], float (&gv)[VEC],
                                         float (&t)[2]) {
  const Vec<T, VEC> xv = load_vec<T, VEC>(x + off);
  const Vec<T, VEC> gvv = load_vec<T, VEC>(g + off);
  float wv[VEC];
  load_param<W, VEC>(w, c, wv, 1.f);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    xh[j] = (static_cast<float>(xv.val[j]) - mu) * rs;
    gv[j] = static_cast<float>(gvv.val[j]);
    t[0] += gv[j] * wv[j];
    t[1] += gv[j] * wv[j] * xh[j];
  }
}

// dx = rs * (g w - c1 - xhat c2) (+ gres) for one VEC-wide piece.
template <typename T, typename W, int VEC>
__device__ __forceinline__ void bwd_store(T* dx, const T* gres, const W* w, int64_t off, int c,
                                          const float (&xh)[VEC], const float (&gv)[VEC], float rs,
                                          float c1, float c2) {
  float wv[VEC], gr[VEC];
  load_param<W, VEC>(w, c, wv, 1.f);
  if (gres != nullptr) {
    const Vec<T, VEC> v = load_vec<T, VEC>(gres + off);
#pragma unroll
    for (int j = 0; j < VEC; ++j) gr[j] = static_cast<float>(v.val[j]);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) gr[j] = 0.f;
  }
  Vec<T, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) out.val[j] = static_cast<T>(rs * (gv[j] * wv[j] - c1 - xh[j] * c2) + gr[j]);
  store_vec<T, VEC>(dx + off, out);
}

// Adds the blockDim.y row slots' per-column sums acc in slot order and writes
// them as this block's partial row `part` (cols floats). buf: blockDim.y * cols
// floats of dynamic shared memory.
template <int NV, int VEC>
__device__ void write_partial(const float (&acc)[NV][VEC], float* buf, float* part, int cols) {
  const int tpr = blockDim.x, tx = threadIdx.x, nvec = cols / VEC;
  __syncthreads();  // buf is free (a previous call has finished reading it)
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int vi = i * tpr + tx;
    if (vi < nvec) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) buf[threadIdx.y * cols + vi * VEC + j] = acc[i][j];
    }
  }
  __syncthreads();
  for (int c = threadIdx.y * tpr + tx; c < cols; c += tpr * blockDim.y) {
    float s = 0.f;
    for (int slot = 0; slot < blockDim.y; ++slot) s += buf[slot * cols + c];
    part[c] = s;
  }
}

// part_w / part_b: (gridDim.x, cols) when CACHED and the gradient is wanted,
// else null (wide rows get them from norm_bwd_dwdb_kernel).
template <typename T, typename W, int VEC, bool RMS, bool CACHED>
__global__ void __launch_bounds__(kBwdMaxThreads)
    norm_bwd_kernel(const T* __restrict__ g, const T* __restrict__ gres, const T* __restrict__ x,
                    const W* __restrict__ w, const float* __restrict__ mean,
                    const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ part_w,
                    float* __restrict__ part_b, int64_t rows, int cols) {
  constexpr int NV = CACHED ? bwd_elems(VEC) / VEC : 1;
  const int tpr = blockDim.x, tx = threadIdx.x;
  const float inv_n = 1.f / static_cast<float>(cols);
  float acc_w[NV][VEC] = {}, acc_b[NV][VEC] = {};
  for (int64_t r0 = int64_t(blockIdx.x) * blockDim.y; r0 < rows; r0 += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = r0 + threadIdx.y;
    const bool live = row < rows;
    const int nvec = live ? cols / VEC : 0;
    const int64_t base = live ? row * cols : 0;
    const float mu = (live && !RMS) ? mean[row] : 0.f;
    const float rs = live ? rstd[row] : 0.f;
    float t[2] = {0.f, 0.f};
    if constexpr (CACHED) {
      float xh[NV][VEC], gv[NV][VEC];
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int vi = i * tpr + tx;
        if (vi < nvec) {
          bwd_load<T, W, VEC>(x, g, w, base + int64_t(vi) * VEC, vi * VEC, mu, rs, xh[i], gv[i], t);
        }
      }
      row_sum(t);
      const float c1 = RMS ? 0.f : t[0] * inv_n, c2 = t[1] * inv_n;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int vi = i * tpr + tx;
        if (vi < nvec) {
          bwd_store<T, W, VEC>(dx, gres, w, base + int64_t(vi) * VEC, vi * VEC, xh[i], gv[i], rs, c1, c2);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            acc_w[i][j] += gv[i][j] * xh[i][j];
            acc_b[i][j] += gv[i][j];
          }
        }
      }
    } else {
      for (int vi = tx; vi < nvec; vi += tpr) {
        float xh[VEC], gv[VEC];
        bwd_load<T, W, VEC>(x, g, w, base + int64_t(vi) * VEC, vi * VEC, mu, rs, xh, gv, t);
      }
      row_sum(t);
      const float c1 = RMS ? 0.f : t[0] * inv_n, c2 = t[1] * inv_n;
      float unused[2] = {0.f, 0.f};
      for (int vi = tx; vi < nvec; vi += tpr) {
        float xh[VEC], gv[VEC];
        bwd_load<T, W, VEC>(x, g, w, base + int64_t(vi) * VEC, vi * VEC, mu, rs, xh, gv, unused);
        bwd_store<T, W, VEC>(dx, gres, w, base + int64_t(vi) * VEC, vi * VEC, xh, gv, rs, c1, c2);
      }
    }
  }
  if constexpr (CACHED) {
    extern __shared__ float buf[];
    if (part_w != nullptr) write_partial<NV, VEC>(acc_w, buf, part_w + int64_t(blockIdx.x) * cols, cols);
    if (part_b != nullptr) write_partial<NV, VEC>(acc_b, buf, part_b + int64_t(blockIdx.x) * cols, cols);
  }
}

constexpr int kDwCols = 64;  // columns per block of the column-wise kernel (blockDim.x)
constexpr int kDwRows = 4;   // row lanes per block (blockDim.y)

// Wide rows: block (c, grp) sums g * xhat and g over row group grp for
// kDwCols columns. It reads x and g once more, but its partial sums stay in
// registers however wide the row is. mean is null for RMS.
template <typename T>
__global__ void __launch_bounds__(kDwCols * kDwRows)
    norm_bwd_dwdb_kernel(const T* __restrict__ g, const T* __restrict__ x,
                         const float* __restrict__ mean, const float* __restrict__ rstd,
                         float* __restrict__ part_w, float* __restrict__ part_b, int64_t rows,
                         int cols, int64_t rows_per_group) {
  __shared__ float red[2][kDwRows][kDwCols];
  const int c = blockIdx.x * kDwCols + threadIdx.x;
  const int64_t first = int64_t(blockIdx.y) * rows_per_group;
  const int64_t last = first + rows_per_group < rows ? first + rows_per_group : rows;
  float aw = 0.f, ab = 0.f;
  if (c < cols) {
    for (int64_t r = first + threadIdx.y; r < last; r += kDwRows) {
      const float gv = static_cast<float>(g[r * cols + c]);
      if (part_w != nullptr) {
        const float mu = mean != nullptr ? mean[r] : 0.f;
        aw += gv * (static_cast<float>(x[r * cols + c]) - mu) * rstd[r];
      }
      ab += gv;
    }
  }
  red[0][threadIdx.y][threadIdx.x] = aw;
  red[1][threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float sw = 0.f, sb = 0.f;
#pragma unroll
    for (int k = 0; k < kDwRows; ++k) {
      sw += red[0][k][threadIdx.x];
      sb += red[1][k][threadIdx.x];
    }
    if (part_w != nullptr) part_w[int64_t(blockIdx.y) * cols + c] = sw;
    if (part_b != nullptr) part_b[int64_t(blockIdx.y) * cols + c] = sb;
  }
}

constexpr int kSumCols = 32;
constexpr int kSumLanes = 16;

// out[c] = sum over p of part[p, c]: lane k adds rows k, k + kSumLanes, ...,
// then the lanes are added in order. Fixed order, same bits every run.
template <typename W>
__global__ void __launch_bounds__(kSumCols * kSumLanes)
    sum_partials_kernel(const float* __restrict__ part, W* __restrict__ out, int parts, int cols) {
  __shared__ float red[kSumLanes][kSumCols];
  const int c = blockIdx.x * kSumCols + threadIdx.x;
  float s = 0.f;
  if (c < cols) {
    for (int p = threadIdx.y; p < parts; p += kSumLanes) s += part[int64_t(p) * cols + c];
  }
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < kSumLanes; ++k) total += red[k][threadIdx.x];
    out[c] = static_cast<W>(total);
  }
}

// --- host side ------------------------------------------------------------------------

// Calls f(T{}, W{}) for the input dtype and the parameters' dtype.
template <typename F>
void dispatch_norm_types(at::ScalarType t, at::ScalarType w, F&& f) {
  auto with_w = [&](auto ttag) {
    if (w == at::kFloat) {
      f(ttag, float{});
    } else {
      f(ttag, ttag);
    }
  };
  switch (t) {
    case at::kFloat: return f(float{}, float{});
    case at::kHalf: return with_w(at::Half{});
    case at::kBFloat16: return with_w(at::BFloat16{});
    default: TORCH_CHECK(false, "fastdl: input must be float32, float16 or bfloat16 on CUDA, got ", t);
  }
}

template <typename F>
void dispatch_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

bool vec_ok(std::initializer_list<const void*> ptrs, int bytes) {
  for (const void* p : ptrs) {
    if (p != nullptr && !is_aligned(p, bytes)) return false;
  }
  return true;
}

struct RowConfig {
  int tpr;  // threads per row (blockDim.x)
  int rpb;  // rows per block (blockDim.y)
  bool cached;
};

// Rows of nvec vectors, at most `per_thread` vectors per thread when cached.
// Narrow rows share a block (rpb rows) so blocks stay `block` threads wide.
RowConfig row_config(int64_t nvec, int per_thread, int max_tpr, int block) {
  const int64_t need = (nvec + per_thread - 1) / per_thread;
  if (need > max_tpr) return {max_tpr, 1, false};
  const int tpr = static_cast<int>(std::max<int64_t>(kWarp, (need + kWarp - 1) / kWarp * kWarp));
  return {tpr, std::max(1, block / tpr), true};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef normalized_shape, double eps, bool rms) {
  FASTDL_CHECK_DEVICE_TYPE(input, at::kCUDA);
  FASTDL_CHECK_FLOAT(input);
  const NormDims d = check_norm_fwd_args(input, residual, weight, bias, normalized_shape);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const auto stat_opts = x.options().dtype(at::kFloat);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor res_out = residual ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor mean = rms ? at::empty({0}, stat_opts) : at::zeros(d.stat_shape, stat_opts);
  at::Tensor rstd = at::zeros(d.stat_shape, stat_opts);
  if (x.numel() == 0) return {out, res_out, mean, rstd};
  const at::Tensor r = residual ? residual->contiguous() : at::Tensor();
  const at::Tensor w = weight ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const int cols = static_cast<int>(d.cols);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int dev = input.get_device();
  dispatch_norm_types(x.scalar_type(), norm_param_dtype(x, weight, bias), [&](auto ttag, auto wtag) {
    using T = decltype(ttag);
    using W = decltype(wtag);
    constexpr int kVec = 16 / sizeof(T);
    const T* xp = x.data_ptr<T>();
    const T* rp = r.defined() ? r.data_ptr<T>() : nullptr;
    const W* wp = w.defined() ? w.data_ptr<W>() : nullptr;
    const W* bp = b.defined() ? b.data_ptr<W>() : nullptr;
    T* yp = out.data_ptr<T>();
    T* rop = r.defined() ? res_out.data_ptr<T>() : nullptr;
    const bool vec = cols % kVec == 0 && vec_ok({xp, rp, yp, rop}, 16) &&
                     vec_ok({wp, bp}, int(sizeof(W)) * kVec);
    dispatch_bool(vec, [&](auto vtag) {
      constexpr int VEC = decltype(vtag)::value ? kVec : 1;
      const RowConfig cfg = row_config(cols / VEC, fwd_elems(VEC) / VEC, kFwdMaxThreads, 256);
      const int64_t blocks_needed = (d.rows + cfg.rpb - 1) / cfg.rpb;
      const int64_t cap = int64_t(sm_count(dev)) * std::max(1, 2048 / (cfg.tpr * cfg.rpb)) * 8;
      const dim3 grid(static_cast<unsigned>(std::min(blocks_needed, cap)));
      const dim3 block(cfg.tpr, cfg.rpb);
      dispatch_bool(rms, [&](auto rtag) {
        dispatch_bool(cfg.cached, [&](auto ctag) {
          norm_fwd_kernel<T, W, VEC, decltype(rtag)::value, decltype(ctag)::value>
              <<<grid, block, 0, stream>>>(xp, rp, wp, bp, yp, rop,
                                           rms ? nullptr : mean.data_ptr<float>(),
                                           rstd.data_ptr<float>(), d.rows, cols,
                                           static_cast<float>(eps));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return {out, res_out, mean, rstd};
}

template <typename W>
void sum_partials(const at::Tensor& part, at::Tensor& out, cudaStream_t stream) {
  const int parts = static_cast<int>(part.size(0)), cols = static_cast<int>(part.size(1));
  const dim3 grid((cols + kSumCols - 1) / kSumCols), block(kSumCols, kSumLanes);
  sum_partials_kernel<W><<<grid, block, 0, stream>>>(part.data_ptr<float>(), out.data_ptr<W>(), parts, cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_residual, const at::Tensor& x,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& rstd, bool rms, std::array<bool, 2> grad_mask) {
  FASTDL_CHECK_DEVICE_TYPE(x, at::kCUDA);
  FASTDL_CHECK_FLOAT(x);
  const NormDims d = check_norm_bwd_args(grad_out, grad_residual, x, weight, bias, mean, rstd, rms);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor gres = grad_residual ? grad_residual->contiguous() : at::Tensor();
  const at::Tensor w = weight ? weight->contiguous() : at::Tensor();
  const at::Tensor mu = rms ? at::Tensor() : mean.contiguous();
  const at::Tensor rs = rstd.contiguous();
  const bool need_dw = grad_mask[0] && weight.has_value();
  const bool need_db = grad_mask[1] && bias.has_value();
  const auto wtype = norm_param_dtype(xc, weight, bias);
  at::Tensor dx = at::empty(xc.sizes(), xc.options());
  at::Tensor dw = need_dw ? at::empty(weight->sizes(), weight->options()) : at::empty({0}, xc.options().dtype(wtype));
  at::Tensor db = need_db ? at::empty(bias->sizes(), bias->options()) : at::empty({0}, xc.options().dtype(wtype));
  if (xc.numel() == 0) {
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }
  const int cols = static_cast<int>(d.cols);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int dev = x.get_device();
  const auto f32 = xc.options().dtype(at::kFloat);
  dispatch_norm_types(xc.scalar_type(), wtype, [&](auto ttag, auto wtag) {
    using T = decltype(ttag);
    using W = decltype(wtag);
    constexpr int kVec = 16 / sizeof(T);
    const T* gp = g.data_ptr<T>();
    const T* grp = gres.defined() ? gres.data_ptr<T>() : nullptr;
    const T* xp = xc.data_ptr<T>();
    const W* wp = w.defined() ? w.data_ptr<W>() : nullptr;
    T* dxp = dx.data_ptr<T>();
    const float* mp = rms ? nullptr : mu.data_ptr<float>();
    const bool vec = cols % kVec == 0 && vec_ok({gp, grp, xp, dxp}, 16) &&
                     vec_ok({wp}, int(sizeof(W)) * kVec);
    at::Tensor part_w, part_b;
    dispatch_bool(vec, [&](auto vtag) {
      constexpr int VEC = decltype(vtag)::value ? kVec : 1;
      const RowConfig cfg = row_config(cols / VEC, bwd_elems(VEC) / VEC, kBwdMaxThreads, kBwdMaxThreads);
      const int64_t blocks_needed = (d.rows + cfg.rpb - 1) / cfg.rpb;
      // Cached: a persistent grid of about 1024 threads per SM; its block
      // count is also the number of partial rows, a function of the shape
      // and the device only.
      const int per_sm = std::max(1, 1024 / (cfg.tpr * cfg.rpb));
      const int64_t grid = std::min(blocks_needed, int64_t(sm_count(dev)) * per_sm * (cfg.cached ? 1 : 8));
      size_t smem = 0;
      if (cfg.cached) {
        if (need_dw) part_w = at::empty({grid, d.cols}, f32);
        if (need_db) part_b = at::empty({grid, d.cols}, f32);
        if (need_dw || need_db) smem = sizeof(float) * cfg.rpb * cols;
      }
      dispatch_bool(rms, [&](auto rtag) {
        dispatch_bool(cfg.cached, [&](auto ctag) {
          norm_bwd_kernel<T, W, VEC, decltype(rtag)::value, decltype(ctag)::value>
              <<<dim3(static_cast<unsigned>(grid)), dim3(cfg.tpr, cfg.rpb), smem, stream>>>(
                  gp, grp, xp, wp, mp, rs.data_ptr<float>(), dxp,
                  part_w.defined() ? part_w.data_ptr<float>() : nullptr,
                  part_b.defined() ? part_b.data_ptr<float>() : nullptr, d.rows, cols);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
      if (!cfg.cached && (need_dw || need_db)) {
        const int64_t target = int64_t(sm_count(dev)) * 2;
        const int64_t rows_per_group = std::max<int64_t>(64, (d.rows + target - 1) / target);
        const int64_t groups = (d.rows + rows_per_group - 1) / rows_per_group;
        if (need_dw) part_w = at::empty({groups, d.cols}, f32);
        if (need_db) part_b = at::empty({groups, d.cols}, f32);
        const dim3 dgrid((cols + kDwCols - 1) / kDwCols, static_cast<unsigned>(groups));
        norm_bwd_dwdb_kernel<T><<<dgrid, dim3(kDwCols, kDwRows), 0, stream>>>(
            gp, xp, mp, rs.data_ptr<float>(), need_dw ? part_w.data_ptr<float>() : nullptr,
            need_db ? part_b.data_ptr<float>() : nullptr, d.rows, cols, rows_per_group);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    if (need_dw) sum_partials<W>(part_w, dw, stream);
    if (need_db) sum_partials<W>(part_b, db, stream);
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
}

}  // namespace fastdl
