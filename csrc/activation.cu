// CUDA kernels for the activation family.
//
// Memory-bound: each element is read once and written once, so the kernels are
// built around 16-byte vector accesses (8 fp16/bf16 or 4 fp32 values per
// thread per iteration) and fp32 math (fp64 for fp64). The vector path needs
// 16-byte aligned pointers and, with a bias, a last dim divisible by the
// vector width (so a vector never straddles two rows); anything else takes the
// scalar path (VEC = 1) of the same template. Forward and backward share one
// kernel template: BWD reads grad_out and writes grad_out * act'(x + b).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "activation.h"
#include "common/launch.cuh"
#include "common/vec.cuh"

namespace fastdl {
namespace {

constexpr int kThreads = 256;

template <Act A, bool BWD, typename C>
__device__ __forceinline__ C bias_act_value(C x, C g, C slope) {
  return BWD ? g * ActOp<A>::grad(x, slope) : ActOp<A>::fwd(x, slope);
}

// x, g, out: (numel,) contiguous; bias: (cols,) in the compute type or null.
template <typename T, int VEC, Act A, bool BWD>
__global__ void bias_act_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                const at::opmath_type<T>* __restrict__ bias, T* __restrict__ out,
                                int64_t numel, int64_t cols, at::opmath_type<T> slope) {
  using C = at::opmath_type<T>;
  const int64_t nvec = numel / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    const Vec<T, VEC> xv = load_vec<T, VEC>(x + v * VEC);
    Vec<T, VEC> gv;
    if (BWD) gv = load_vec<T, VEC>(g + v * VEC);
    const C* b = bias ? bias + (v * VEC) % cols : nullptr;
    Vec<T, VEC> ov;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const C xi = static_cast<C>(xv.val[i]) + (b ? b[i] : C(0));
      ov.val[i] = static_cast<T>(bias_act_value<A, BWD>(xi, BWD ? static_cast<C>(gv.val[i]) : C(0), slope));
    }
    store_vec<T, VEC>(out + v * VEC, ov);
  }
  // numel % VEC leftovers (only without a bias), one per thread of block 0.
  const int64_t i = nvec * VEC + threadIdx.x;
  if (blockIdx.x == 0 && i < numel) {
    const C xi = static_cast<C>(x[i]) + (bias ? bias[i % cols] : C(0));
    out[i] = static_cast<T>(bias_act_value<A, BWD>(xi, BWD ? static_cast<C>(g[i]) : C(0), slope));
  }
}

// Gated, x is (rows, 2h), y = act(a) * b with a = x[:, :h], b = x[:, h:].
// Forward writes y (rows, h); backward reads g (rows, h) and writes
// da = g b act'(a), db = g act(a) into out (rows, 2h). Vector v covers
// outputs [v*VEC, v*VEC + VEC) of one row (h % VEC == 0).
template <typename T, int VEC, Act A, bool BWD>
__global__ void glu_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ out,
                           int64_t numel_out, int64_t h, at::opmath_type<T> slope) {
  using C = at::opmath_type<T>;
  const int64_t nvec = numel_out / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    const int64_t o = v * VEC, row = o / h;
    const int64_t ia = o + row * h;  // row * 2h + col
    const Vec<T, VEC> av = load_vec<T, VEC>(x + ia);
    const Vec<T, VEC> bv = load_vec<T, VEC>(x + ia + h);
    if (BWD) {
      const Vec<T, VEC> gv = load_vec<T, VEC>(g + o);
      Vec<T, VEC> da, db;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const C a = static_cast<C>(av.val[i]), gi = static_cast<C>(gv.val[i]);
        da.val[i] = static_cast<T>(gi * static_cast<C>(bv.val[i]) * ActOp<A>::grad(a, slope));
        db.val[i] = static_cast<T>(gi * ActOp<A>::fwd(a, slope));
      }
      store_vec<T, VEC>(out + ia, da);
      store_vec<T, VEC>(out + ia + h, db);
    } else {
      Vec<T, VEC> y;
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        y.val[i] = static_cast<T>(ActOp<A>::fwd(static_cast<C>(av.val[i]), slope) *
                                  static_cast<C>(bv.val[i]));
      store_vec<T, VEC>(out + o, y);
    }
  }
}

// Picks the widest vector the pointers and row length allow, and calls
// `launch(std::integral_constant<int, VEC>)`.
template <typename T, typename F>
void with_vec(std::initializer_list<const void*> ptrs, int64_t row_len, F&& launch) {
  constexpr int kVec = 16 / sizeof(T);
  bool ok = row_len % kVec == 0;
  for (const void* p : ptrs) ok = ok && (p == nullptr || is_aligned(p, 16));
  if (ok) {
    launch(std::integral_constant<int, kVec>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

at::Tensor bias_act_cuda(const c10::optional<at::Tensor>& grad_out, const at::Tensor& input,
                         const c10::optional<at::Tensor>& bias, c10::string_view act,
                         double negative_slope) {
  FASTDL_CHECK_DEVICE_TYPE(input, at::kCUDA);
  check_bias_act_args(grad_out, input, bias);
  const Act a = parse_act(act);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = bias.has_value() ? at::empty(input.sizes(), input.options()) : at::empty_like(input);
  const at::Tensor x = as_layout_of(input, out);
  const at::Tensor g = grad_out.has_value() ? as_layout_of(*grad_out, out) : at::Tensor();
  const int64_t n = x.numel();
  if (n == 0) return out;
  const auto b = bias_as_opmath(bias, x.scalar_type());
  // Without a bias any vector is fine: treat the tensor as one row.
  const int64_t cols = b ? x.size(-1) : n;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int dev = input.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_cuda", [&] {
    using C = at::opmath_type<scalar_t>;
    const C slope = static_cast<C>(negative_slope);
    const C* bp = b ? b->data_ptr<C>() : nullptr;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.defined() ? g.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    dispatch_act(a, [&](auto act_tag) {
      with_vec<scalar_t>({xp, gp, op}, bp ? cols : 0, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        constexpr Act A = decltype(act_tag)::value;
        const unsigned grid = grid_for(n / VEC, kThreads, dev);
        if (gp) {
          bias_act_kernel<scalar_t, VEC, A, true><<<grid, kThreads, 0, stream>>>(gp, xp, bp, op, n, cols, slope);
        } else {
          bias_act_kernel<scalar_t, VEC, A, false><<<grid, kThreads, 0, stream>>>(gp, xp, bp, op, n, cols, slope);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

at::Tensor glu_cuda(const c10::optional<at::Tensor>& grad_out, const at::Tensor& input,
                    c10::string_view act, double negative_slope) {
  FASTDL_CHECK_DEVICE_TYPE(input, at::kCUDA);
  const int64_t h = check_glu_args(grad_out, input);
  const Act a = parse_act(act);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const at::Tensor g = grad_out.has_value() ? grad_out->contiguous() : at::Tensor();
  at::Tensor out = g.defined() ? at::empty(x.sizes(), x.options())
                               : at::empty(glu_out_shape(x), x.options());
  const int64_t n = x.numel() / 2;  // one (a, b) pair per output element
  if (n == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int dev = input.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "glu_cuda", [&] {
    using C = at::opmath_type<scalar_t>;
    const C slope = static_cast<C>(negative_slope);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.defined() ? g.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    dispatch_act(a, [&](auto act_tag) {
      with_vec<scalar_t>({xp, gp, op}, h, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        constexpr Act A = decltype(act_tag)::value;
        const unsigned grid = grid_for(n / VEC, kThreads, dev);
        if (gp) {
          glu_kernel<scalar_t, VEC, A, true><<<grid, kThreads, 0, stream>>>(gp, xp, op, n, h, slope);
        } else {
          glu_kernel<scalar_t, VEC, A, false><<<grid, kThreads, 0, stream>>>(gp, xp, op, n, h, slope);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

at::Tensor bias_act_fwd_cuda(const at::Tensor& input, const c10::optional<at::Tensor>& bias,
                             c10::string_view act, double negative_slope) {
  return bias_act_cuda(c10::nullopt, input, bias, act, negative_slope);
}

at::Tensor bias_act_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                             const c10::optional<at::Tensor>& bias, c10::string_view act,
                             double negative_slope) {
  return bias_act_cuda(grad_out, input, bias, act, negative_slope);
}

at::Tensor glu_fwd_cuda(const at::Tensor& input, c10::string_view act, double negative_slope) {
  return glu_cuda(c10::nullopt, input, act, negative_slope);
}

at::Tensor glu_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& input, c10::string_view act,
                        double negative_slope) {
  return glu_cuda(grad_out, input, act, negative_slope);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("bias_act_fwd", &bias_act_fwd_cuda);
  m.impl("bias_act_bwd", &bias_act_bwd_cuda);
  m.impl("glu_fwd", &glu_fwd_cuda);
  m.impl("glu_bwd", &glu_bwd_cuda);
}

}  // namespace fastdl
