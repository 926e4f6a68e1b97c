// CUDA kernels for the BatchNorm family (math and op contracts: the docstring
// of fastdl/_ops/batchnorm.py; layout rule: batchnorm.h).
//
// Per-channel reductions (statistics, and the backward's sum(dz),
// sum(dz * (x - mean))) run in two levels: a kernel over (channel block,
// split) writes one partial result per split, a second kernel merges the
// splits of each channel in a fixed order (deterministic). Two traversals:
//   channels_last (rows, C): thread (tx, ty) owns VEC adjacent channels and
//     walks rows ty, ty + TY, ...; one 16-byte load per row.
//   NCHW (N, C, S): block (channel, split); its threads walk the channel's
//     N planes of S contiguous values, VEC at a time (S % VEC == 0).
// Statistics use Welford within a thread and Chan's merge across threads and
// splits: stable for means far from zero, unlike E[x^2] - E[x]^2.
//
// The elementwise passes (forward, and the backward's grad_input) walk the
// tensor flat with 16-byte vectors; a ChannelPos follows the channel of the
// current element with adds and compares, since a 64-bit division per
// element would cost more than its memory access.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "batchnorm.h"
#include "common/launch.cuh"
#include "common/vec.cuh"

// fp32, fp16 and bf16 storage; float64 runs on the CPU kernels.
#define FASTDL_BN_DISPATCH(TYPE, NAME, ...)                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace fastdl {
namespace {

constexpr int kThreads = 256;

// (mean, sum of squared deviations, count) of a set of values.
struct Welford {
  float mean, m2, n;
  __device__ void merge(const Welford& o) {
    const float total = n + o.n;
    const float wo = o.n / fmaxf(total, 1.f);
    const float d = o.mean - mean;
    mean += d * wo;
    m2 += o.m2 + d * d * n * wo;
    n = total;
  }
  __device__ void write(float* mean_out, float* var_out, int c) const {
    mean_out[c] = mean;
    var_out[c] = m2 / n;
  }
};

// sum(dz) and sum(dz * (x - mean)).
struct Sums {
  float s1, s2;
  __device__ void merge(const Sums& o) {
    s1 += o.s1;
    s2 += o.s2;
  }
  __device__ void write(float* s1_out, float* s2_out, int c) const {
    s1_out[c] = s1;
    s2_out[c] = s2;
  }
};

// Merges the L states of each thread over threadIdx.y (blockDim.y a power of
// two); the results land in buf[threadIdx.x * L + j].
template <typename S, int L>
__device__ void reduce_over_y(const S* st, S* buf) {
  const int w = blockDim.x * L, base = threadIdx.x * L;
#pragma unroll
  for (int j = 0; j < L; ++j) buf[threadIdx.y * w + base + j] = st[j];
  __syncthreads();
  for (int h = blockDim.y / 2; h > 0; h >>= 1) {
    if (threadIdx.y < h) {
#pragma unroll
      for (int j = 0; j < L; ++j) buf[threadIdx.y * w + base + j].merge(buf[(threadIdx.y + h) * w + base + j]);
    }
    __syncthreads();
  }
}

// (plane index, offset in plane) of a walk over N planes of `len` slots that
// starts at slot `first` and moves `step` slots at a time: one division at
// the start, adds and compares after.
struct PlaneWalk {
  int64_t n, s, step_n, step_s, len;
  __device__ PlaneWalk(int64_t first, int64_t step, int64_t len_)
      : n(first / len_), s(first % len_), step_n(step / len_), step_s(step % len_), len(len_) {}
  __device__ void next() {
    s += step_s;
    n += step_n;
    if (s >= len) {
      s -= len;
      ++n;
    }
  }
};

// --- statistics -------------------------------------------------------------------------
template <typename T, int VEC>
__global__ void batch_norm_stats_cl_kernel(const T* __restrict__ x, int64_t rows, int C,
                                           Welford* __restrict__ part) {
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  Welford st[VEC] = {};
  if (c0 < C) {
    // Every lane of a thread sees the same count: one reciprocal per row.
    float k = 0.f;
    for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
         r += int64_t(gridDim.y) * blockDim.y) {
      const Vec<T, VEC> v = load_vec<T, VEC>(x + r * C + c0);
      k += 1.f;
      const float inv = 1.f / k;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xv = static_cast<float>(v.val[j]);
        const float d = xv - st[j].mean;
        st[j].mean += d * inv;
        st[j].m2 += d * (xv - st[j].mean);
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) st[j].n = k;
  }
  __shared__ Welford buf[kThreads * VEC];
  reduce_over_y<Welford, VEC>(st, buf);
  if (threadIdx.y == 0 && c0 < C) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) part[int64_t(blockIdx.y) * C + c0 + j] = buf[threadIdx.x * VEC + j];
  }
}

// Block (channel blockIdx.x, split blockIdx.y), threads along y.
template <typename T, int VEC>
__global__ void batch_norm_stats_nchw_kernel(const T* __restrict__ x, int64_t N, int64_t S, int C,
                                             Welford* __restrict__ part) {
  const int c = blockIdx.x;
  const int64_t per_plane = S / VEC;
  Welford st = {};
  for (PlaneWalk w(int64_t(blockIdx.y) * blockDim.y + threadIdx.y, int64_t(gridDim.y) * blockDim.y, per_plane);
       w.n < N; w.next()) {
    const Vec<T, VEC> v = load_vec<T, VEC>(x + (w.n * C + c) * S + w.s * VEC);
    // Statistics of the VEC values, then one Chan merge.
    float xs[VEC], sum = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      xs[j] = static_cast<float>(v.val[j]);
      sum += xs[j];
    }
    const float lm = sum * (1.f / VEC);
    float lm2 = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) lm2 += (xs[j] - lm) * (xs[j] - lm);
    st.merge(Welford{lm, lm2, float(VEC)});
  }
  __shared__ Welford buf[kThreads];
  reduce_over_y<Welford, 1>(&st, buf);
  if (threadIdx.y == 0) part[int64_t(blockIdx.y) * C + c] = buf[0];
}

// Block per channel: merges its `splits` partial states, in a fixed order.
template <typename S>
__global__ void merge_splits_kernel(const S* __restrict__ part, int splits, int C, float* __restrict__ out0,
                                    float* __restrict__ out1) {
  const int c = blockIdx.x;
  S st = {};
  for (int i = threadIdx.y; i < splits; i += blockDim.y) st.merge(part[int64_t(i) * C + c]);
  __shared__ S buf[kThreads];
  reduce_over_y<S, 1>(&st, buf);
  if (threadIdx.y == 0) buf[0].write(out0, out1, c);
}

// --- backward reductions -------------------------------------------------------------------
// dz = g * act'(z), z = (x - mean) * scale + shift (+ res); returns dz.
template <typename Op>
__device__ __forceinline__ float bn_dz(float g, float xmu, float r, float scale, float shift, float slope) {
  return g * Op::grad(xmu * scale + shift + r, slope);
}

template <typename T, int VEC, typename Op>
__global__ void batch_norm_bwd_reduce_cl_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                                const T* __restrict__ res, T* __restrict__ dz,
                                                const float* __restrict__ mean, const float* __restrict__ scale,
                                                const float* __restrict__ shift, int64_t rows, int C, float slope,
                                                Sums* __restrict__ part) {
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  Sums st[VEC] = {};
  if (c0 < C) {
    float m[VEC], k[VEC], b[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      m[j] = mean[c0 + j];
      k[j] = scale[c0 + j];
      b[j] = shift[c0 + j];
    }
    for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
         r += int64_t(gridDim.y) * blockDim.y) {
      const int64_t off = r * C + c0;
      const Vec<T, VEC> gv = load_vec<T, VEC>(g + off), xv = load_vec<T, VEC>(x + off);
      Vec<T, VEC> rv{}, out;
      if (res) rv = load_vec<T, VEC>(res + off);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xmu = static_cast<float>(xv.val[j]) - m[j];
        const float r_j = res ? static_cast<float>(rv.val[j]) : 0.f;
        const float d = bn_dz<Op>(static_cast<float>(gv.val[j]), xmu, r_j, k[j], b[j], slope);
        out.val[j] = static_cast<T>(d);
        st[j].s1 += d;
        st[j].s2 += d * xmu;
      }
      if (dz) store_vec<T, VEC>(dz + off, out);
    }
  }
  __shared__ Sums buf[kThreads * VEC];
  reduce_over_y<Sums, VEC>(st, buf);
  if (threadIdx.y == 0 && c0 < C) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) part[int64_t(blockIdx.y) * C + c0 + j] = buf[threadIdx.x * VEC + j];
  }
}

template <typename T, int VEC, typename Op>
__global__ void batch_norm_bwd_reduce_nchw_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                                  const T* __restrict__ res, T* __restrict__ dz,
                                                  const float* __restrict__ mean, const float* __restrict__ scale,
                                                  const float* __restrict__ shift, int64_t N, int64_t S, int C,
                                                  float slope, Sums* __restrict__ part) {
  const int c = blockIdx.x;
  const float m = mean[c], k = scale[c], b = shift[c];
  Sums st = {};
  for (PlaneWalk w(int64_t(blockIdx.y) * blockDim.y + threadIdx.y, int64_t(gridDim.y) * blockDim.y, S / VEC);
       w.n < N; w.next()) {
    const int64_t off = (w.n * C + c) * S + w.s * VEC;
    const Vec<T, VEC> gv = load_vec<T, VEC>(g + off), xv = load_vec<T, VEC>(x + off);
    Vec<T, VEC> rv{}, out;
    if (res) rv = load_vec<T, VEC>(res + off);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float xmu = static_cast<float>(xv.val[j]) - m;
      const float r_j = res ? static_cast<float>(rv.val[j]) : 0.f;
      const float d = bn_dz<Op>(static_cast<float>(gv.val[j]), xmu, r_j, k, b, slope);
      out.val[j] = static_cast<T>(d);
      st.s1 += d;
      st.s2 += d * xmu;
    }
    if (dz) store_vec<T, VEC>(dz + off, out);
  }
  __shared__ Sums buf[kThreads];
  reduce_over_y<Sums, 1>(&st, buf);
  if (threadIdx.y == 0) part[int64_t(blockIdx.y) * C + c] = buf[0];
}

// --- elementwise passes ------------------------------------------------------------------------
// Channel of flat element i of an (N, C, inner) tensor (inner = S for NCHW,
// 1 for channels_last) and i's offset within inner.
struct ChannelPos {
  int64_t off;
  int c;
  __device__ ChannelPos(int64_t i, int64_t inner, int C) {
    const int64_t q = i / inner;
    off = i - q * inner;
    c = static_cast<int>(q % C);
  }
  __device__ void next(int64_t inner, int C) {  // i + 1
    if (++off == inner) {
      off = 0;
      if (++c == C) c = 0;
    }
  }
  // i + step, with step_off = step % inner and step_c = (step / inner) % C.
  __device__ void advance(int64_t step_off, int step_c, int64_t inner, int C) {
    off += step_off;
    c += step_c;
    if (off >= inner) {
      off -= inner;
      ++c;
    }
    if (c >= C) c -= C;
  }
};

// Calls f(i, c) for VEC-vectors i = v * VEC of a flat walk and then, on
// block 0, for the numel % VEC leftovers one element at a time (VEC = 1).
template <int VEC, typename FV, typename F1>
__device__ __forceinline__ void walk_flat(int64_t numel, int64_t inner, int C, FV&& fvec, F1&& fone) {
  const int64_t nvec = numel / VEC;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t step = stride * VEC;
  const int64_t step_off = step % inner;
  const int step_c = static_cast<int>((step / inner) % C);
  ChannelPos p(first * VEC, inner, C);
  for (int64_t v = first; v < nvec; v += stride) {
    fvec(v * VEC, p);
    p.advance(step_off, step_c, inner, C);
  }
  const int64_t i = nvec * VEC + threadIdx.x;
  if (blockIdx.x == 0 && i < numel) fone(i, ChannelPos(i, inner, C));
}

template <typename T, int VEC, typename Op>
__global__ void batch_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ y,
                                      const float* __restrict__ mean, const float* __restrict__ scale,
                                      const float* __restrict__ shift, int64_t numel, int64_t inner, int C,
                                      float slope) {
  auto one = [&](float xv, float rv, int c) {
    return Op::fwd((xv - __ldg(mean + c)) * __ldg(scale + c) + __ldg(shift + c) + rv, slope);
  };
  walk_flat<VEC>(
      numel, inner, C,
      [&](int64_t i, ChannelPos p) {
        const Vec<T, VEC> xv = load_vec<T, VEC>(x + i);
        Vec<T, VEC> rv{}, out;
        if (res) rv = load_vec<T, VEC>(res + i);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          out.val[j] = static_cast<T>(one(static_cast<float>(xv.val[j]), res ? static_cast<float>(rv.val[j]) : 0.f, p.c));
          p.next(inner, C);
        }
        store_vec<T, VEC>(y + i, out);
      },
      [&](int64_t i, ChannelPos p) {
        y[i] = static_cast<T>(one(static_cast<float>(x[i]), res ? static_cast<float>(res[i]) : 0.f, p.c));
      });
}

template <typename T, int VEC, typename Op>
__global__ void batch_norm_bwd_kernel(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ res,
                                      T* __restrict__ dx, const float* __restrict__ mean,
                                      const float* __restrict__ scale, const float* __restrict__ shift,
                                      const float* __restrict__ coef_xmu, const float* __restrict__ coef_const,
                                      int64_t numel, int64_t inner, int C, float slope) {
  auto one = [&](float gv, float xv, float rv, int c) {
    const float k = __ldg(scale + c);
    const float xmu = xv - __ldg(mean + c);
    const float d = bn_dz<Op>(gv, xmu, rv, k, __ldg(shift + c), slope);
    return d * k + __ldg(coef_xmu + c) * xmu + __ldg(coef_const + c);
  };
  walk_flat<VEC>(
      numel, inner, C,
      [&](int64_t i, ChannelPos p) {
        const Vec<T, VEC> gv = load_vec<T, VEC>(g + i), xv = load_vec<T, VEC>(x + i);
        Vec<T, VEC> rv{}, out;
        if (res) rv = load_vec<T, VEC>(res + i);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          out.val[j] = static_cast<T>(one(static_cast<float>(gv.val[j]), static_cast<float>(xv.val[j]),
                                          res ? static_cast<float>(rv.val[j]) : 0.f, p.c));
          p.next(inner, C);
        }
        store_vec<T, VEC>(dx + i, out);
      },
      [&](int64_t i, ChannelPos p) {
        dx[i] = static_cast<T>(one(static_cast<float>(g[i]), static_cast<float>(x[i]),
                                   res ? static_cast<float>(res[i]) : 0.f, p.c));
      });
}

// --- host side ------------------------------------------------------------------------------------
// Launches f(std::integral_constant<int, VEC>) with the widest vector that
// the pointers' alignment and `len % VEC == 0` allow.
template <typename T, typename F>
void with_vec(std::initializer_list<const void*> ptrs, int64_t len, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  bool ok = len % kVec == 0;
  for (const void* p : ptrs) ok = ok && (p == nullptr || is_aligned(p, 16));
  if (ok) {
    f(std::integral_constant<int, kVec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Grid and block of a two-level per-channel reduction (see the top comment).
struct ReduceLaunch {
  dim3 grid, block;
  int splits() const { return static_cast<int>(grid.y); }
};

ReduceLaunch reduce_launch(const BnShape& sh, bool cl, int vec, int device) {
  const int64_t target = int64_t(sm_count(device)) * 8;  // one wave of 256-thread blocks
  if (cl) {
    const int64_t cvecs = sh.c / vec;
    const int tx = static_cast<int>(std::min<int64_t>(32, next_pow2(cvecs)));
    const int ty = kThreads / tx;
    const int64_t gx = (cvecs + tx - 1) / tx;
    const int64_t gy = std::clamp<int64_t>(target / gx, 1, std::min<int64_t>((sh.rows() + ty - 1) / ty, 65535));
    return {dim3(gx, gy), dim3(tx, ty)};
  }
  const int64_t work = (sh.rows() / vec + kThreads - 1) / kThreads;  // blocks' worth per channel
  const int64_t gy = std::clamp<int64_t>(target / sh.c, 1, std::max<int64_t>(1, std::min<int64_t>(work, 65535)));
  return {dim3(sh.c, gy), dim3(1, kThreads)};
}

void check_cuda_input(const at::Tensor& input) {
  FASTDL_CHECK_DEVICE_TYPE(input, at::kCUDA);
  check_bn_input(input);
  FASTDL_CHECK_FLOAT(input);
  TORCH_CHECK(input.size(1) <= std::numeric_limits<int>::max(), "fastdl: input's channel count must be < 2^31");
}

void check_affine(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
                  const at::Tensor& shift, const c10::optional<at::Tensor>& residual) {
  check_cuda_input(input);
  check_bn_param(mean, "mean", input);
  check_bn_param(scale, "scale", input);
  check_bn_param(shift, "shift", input);
  if (residual) check_like_input(*residual, "residual", input);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input) {
  check_cuda_input(input);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool cl = is_channels_last_dense(input);
  const at::Tensor x = in_layout(input, cl);
  const BnShape sh = bn_shape(x);
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({sh.c}, opts), var = at::empty({sh.c}, opts);
  if (x.numel() == 0) {
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    var.fill_(std::numeric_limits<float>::quiet_NaN());
    return {mean, var};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int dev = input.get_device();
  const int C = static_cast<int>(sh.c);
  FASTDL_BN_DISPATCH(x.scalar_type(), "batch_norm_stats_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    with_vec<scalar_t>({xp}, cl ? sh.c : sh.s, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const ReduceLaunch l = reduce_launch(sh, cl, VEC, dev);
      at::Tensor part = at::empty({int64_t(l.splits()) * sh.c * 3}, opts);
      Welford* pp = reinterpret_cast<Welford*>(part.data_ptr<float>());
      if (cl) {
        batch_norm_stats_cl_kernel<scalar_t, VEC><<<l.grid, l.block, 0, stream>>>(xp, sh.rows(), C, pp);
      } else {
        batch_norm_stats_nchw_kernel<scalar_t, VEC><<<l.grid, l.block, 0, stream>>>(xp, sh.n, sh.s, C, pp);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merge_splits_kernel<Welford><<<C, dim3(1, kThreads), 0, stream>>>(pp, l.splits(), C, mean.data_ptr<float>(),
                                                                         var.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {mean, var};
}

at::Tensor batch_norm_fwd_cuda(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
                               const at::Tensor& shift, const c10::optional<at::Tensor>& residual,
                               c10::string_view act, double negative_slope) {
  check_affine(input, mean, scale, shift, residual);
  const std::string act_name(act);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool cl = is_channels_last_dense(input);
  const at::Tensor x = in_layout(input, cl);
  const at::Tensor res = residual ? in_layout(*residual, cl) : at::Tensor();
  const at::Tensor m = mean.contiguous(), k = scale.contiguous(), b = shift.contiguous();
  at::Tensor out = at::empty_like(x);
  const BnShape sh = bn_shape(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int dev = input.get_device();
  FASTDL_BN_DISPATCH(x.scalar_type(), "batch_norm_fwd_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = ptr_or_null<scalar_t>(res);
    scalar_t* yp = out.data_ptr<scalar_t>();
    dispatch_bn_act(act_name, [&](auto op) {
      with_vec<scalar_t>({xp, rp, yp}, 0, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        batch_norm_fwd_kernel<scalar_t, VEC, decltype(op)><<<grid_for(n / VEC, kThreads, dev), kThreads, 0, stream>>>(
            xp, rp, yp, m.data_ptr<float>(), k.data_ptr<float>(), b.data_ptr<float>(), n, cl ? 1 : sh.s,
            static_cast<int>(sh.c), static_cast<float>(negative_slope));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_reduce_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, const c10::optional<at::Tensor>& residual, c10::string_view act,
    double negative_slope, bool write_dz) {
  check_affine(input, mean, scale, shift, residual);
  check_like_input(grad_out, "grad_out", input);
  const std::string act_name(act);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool cl = is_channels_last_dense(input);
  const at::Tensor x = in_layout(input, cl);
  const at::Tensor g = in_layout(grad_out, cl);
  // act'(z) = 1 without an activation: the residual is not needed.
  const at::Tensor res = residual && act_name != "none" ? in_layout(*residual, cl) : at::Tensor();
  const at::Tensor m = mean.contiguous(), k = scale.contiguous(), b = shift.contiguous();
  at::Tensor dz = write_dz ? at::empty_like(x) : at::empty({0}, x.options());
  const BnShape sh = bn_shape(x);
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor sum_dz = at::zeros({sh.c}, opts), sum_dz_xmu = at::zeros({sh.c}, opts);
  if (x.numel() == 0) return {sum_dz, sum_dz_xmu, dz};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int dev = input.get_device();
  const int C = static_cast<int>(sh.c);
  FASTDL_BN_DISPATCH(x.scalar_type(), "batch_norm_bwd_reduce_cuda", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = ptr_or_null<scalar_t>(res);
    scalar_t* dzp = write_dz ? dz.data_ptr<scalar_t>() : nullptr;
    const float slope = static_cast<float>(negative_slope);
    dispatch_bn_act(act_name, [&](auto op) {
      using Op = decltype(op);
      with_vec<scalar_t>({gp, xp, rp, dzp}, cl ? sh.c : sh.s, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        const ReduceLaunch l = reduce_launch(sh, cl, VEC, dev);
        at::Tensor part = at::empty({int64_t(l.splits()) * sh.c * 2}, opts);
        Sums* pp = reinterpret_cast<Sums*>(part.data_ptr<float>());
        if (cl) {
          batch_norm_bwd_reduce_cl_kernel<scalar_t, VEC, Op><<<l.grid, l.block, 0, stream>>>(
              gp, xp, rp, dzp, m.data_ptr<float>(), k.data_ptr<float>(), b.data_ptr<float>(), sh.rows(), C,
              slope, pp);
        } else {
          batch_norm_bwd_reduce_nchw_kernel<scalar_t, VEC, Op><<<l.grid, l.block, 0, stream>>>(
              gp, xp, rp, dzp, m.data_ptr<float>(), k.data_ptr<float>(), b.data_ptr<float>(), sh.n, sh.s, C,
              slope, pp);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        merge_splits_kernel<Sums><<<C, dim3(1, kThreads), 0, stream>>>(pp, l.splits(), C, sum_dz.data_ptr<float>(),
                                                                        sum_dz_xmu.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {sum_dz, sum_dz_xmu, dz};
}

at::Tensor batch_norm_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                               const at::Tensor& scale, const at::Tensor& shift,
                               const c10::optional<at::Tensor>& residual, const at::Tensor& coef_xmu,
                               const at::Tensor& coef_const, c10::string_view act, double negative_slope) {
  check_affine(input, mean, scale, shift, residual);
  check_like_input(grad_out, "grad_out", input);
  check_bn_param(coef_xmu, "coef_xmu", input);
  check_bn_param(coef_const, "coef_const", input);
  const std::string act_name(act);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool cl = is_channels_last_dense(input);
  const at::Tensor x = in_layout(input, cl);
  const at::Tensor g = in_layout(grad_out, cl);
  const at::Tensor res = residual && act_name != "none" ? in_layout(*residual, cl) : at::Tensor();
  const at::Tensor m = mean.contiguous(), k = scale.contiguous(), b = shift.contiguous();
  const at::Tensor kx = coef_xmu.contiguous(), k0 = coef_const.contiguous();
  at::Tensor dx = at::empty_like(x);
  const BnShape sh = bn_shape(x);
  const int64_t n = x.numel();
  if (n == 0) return dx;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int dev = input.get_device();
  FASTDL_BN_DISPATCH(x.scalar_type(), "batch_norm_bwd_cuda", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = ptr_or_null<scalar_t>(res);
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    dispatch_bn_act(act_name, [&](auto op) {
      with_vec<scalar_t>({gp, xp, rp, dxp}, 0, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        batch_norm_bwd_kernel<scalar_t, VEC, decltype(op)><<<grid_for(n / VEC, kThreads, dev), kThreads, 0, stream>>>(
            gp, xp, rp, dxp, m.data_ptr<float>(), k.data_ptr<float>(), b.data_ptr<float>(), kx.data_ptr<float>(),
            k0.data_ptr<float>(), n, cl ? 1 : sh.s, static_cast<int>(sh.c), static_cast<float>(negative_slope));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("batch_norm_fwd", &batch_norm_fwd_cuda);
  m.impl("batch_norm_bwd_reduce", &batch_norm_bwd_reduce_cuda);
  m.impl("batch_norm_bwd", &batch_norm_bwd_cuda);
}

}  // namespace fastdl
