// CUDA kernels for the activation family.
//
// Memory-bound: each element is read once and written once, so the kernels are
// built around 16-byte vector accesses (8 fp16/bf16 or 4 fp32 values per
// thread per iteration) and fp32 math. The vector path needs 16-byte aligned
// pointers and, with a bias, a last dim divisible by the vector width (so a
// vector never straddles two rows); anything else takes the scalar path
// (VEC = 1) of the same template.
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

template <typename T, int VEC, Act A>
__global__ void bias_act_fwd_kernel(const T* __restrict__ x, const at::opmath_type<T>* __restrict__ bias,
                                    T* __restrict__ y, int64_t numel, int64_t cols, at::opmath_type<T> slope) {
  using C = at::opmath_type<T>;
  const int64_t nvec = numel / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    const Vec<T, VEC> in = load_vec<T, VEC>(x + v * VEC);
    const C* b = bias ? bias + (v * VEC) % cols : nullptr;
    Vec<T, VEC> out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const C xi = static_cast<C>(in.val[i]) + (b ? b[i] : C(0));
      out.val[i] = static_cast<T>(ActOp<A>::fwd(xi, slope));
    }
    store_vec<T, VEC>(y + v * VEC, out);
  }
  // numel % VEC leftovers, one per thread of block 0.
  const int64_t i = nvec * VEC + threadIdx.x;
  if (blockIdx.x == 0 && i < numel) {
    const C xi = static_cast<C>(x[i]) + (bias ? bias[i % cols] : C(0));
    y[i] = static_cast<T>(ActOp<A>::fwd(xi, slope));
  }
}

template <typename T, int VEC, Act A>
__global__ void bias_act_bwd_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                    const at::opmath_type<T>* __restrict__ bias, T* __restrict__ dx,
                                    int64_t numel, int64_t cols, at::opmath_type<T> slope) {
  using C = at::opmath_type<T>;
  const int64_t nvec = numel / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    const Vec<T, VEC> xin = load_vec<T, VEC>(x + v * VEC);
    const Vec<T, VEC> gin = load_vec<T, VEC>(g + v * VEC);
    const C* b = bias ? bias + (v * VEC) % cols : nullptr;
    Vec<T, VEC> out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const C xi = static_cast<C>(xin.val[i]) + (b ? b[i] : C(0));
      out.val[i] = static_cast<T>(static_cast<C>(gin.val[i]) * ActOp<A>::grad(xi, slope));
    }
    store_vec<T, VEC>(dx + v * VEC, out);
  }
  const int64_t i = nvec * VEC + threadIdx.x;
  if (blockIdx.x == 0 && i < numel) {
    const C xi = static_cast<C>(x[i]) + (bias ? bias[i % cols] : C(0));
    dx[i] = static_cast<T>(static_cast<C>(g[i]) * ActOp<A>::grad(xi, slope));
  }
}

// Gated forward: x is (rows, 2h), y is (rows, h); y = act(x[:, :h]) * x[:, h:].
// Vector v covers outputs [v*VEC, v*VEC + VEC) of one row (h % VEC == 0).
template <typename T, int VEC, Act A>
__global__ void glu_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t numel_out,
                               int64_t h, at::opmath_type<T> slope) {
  using C = at::opmath_type<T>;
  const int64_t nvec = numel_out / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    const int64_t o = v * VEC, row = o / h, col = o - row * h;
    const T* xr = x + row * 2 * h + col;
    const Vec<T, VEC> a = load_vec<T, VEC>(xr);
    const Vec<T, VEC> b = load_vec<T, VEC>(xr + h);
    Vec<T, VEC> out;
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      out.val[i] = static_cast<T>(ActOp<A>::fwd(static_cast<C>(a.val[i]), slope) *
                                  static_cast<C>(b.val[i]));
    store_vec<T, VEC>(y + o, out);
  }
}

template <typename T, int VEC, Act A>
__global__ void glu_bwd_kernel(const T* __restrict__ g, const T* __restrict__ x,
                               T* __restrict__ dx, int64_t numel_out, int64_t h, at::opmath_type<T> slope) {
  using C = at::opmath_type<T>;
  const int64_t nvec = numel_out / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    const int64_t o = v * VEC, row = o / h, col = o - row * h;
    const int64_t base = row * 2 * h + col;
    const Vec<T, VEC> a = load_vec<T, VEC>(x + base);
    const Vec<T, VEC> b = load_vec<T, VEC>(x + base + h);
    const Vec<T, VEC> gv = load_vec<T, VEC>(g + o);
    Vec<T, VEC> da, db;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const C av = static_cast<C>(a.val[i]), gi = static_cast<C>(gv.val[i]);
      da.val[i] = static_cast<T>(gi * static_cast<C>(b.val[i]) * ActOp<A>::grad(av, slope));
      db.val[i] = static_cast<T>(gi * ActOp<A>::fwd(av, slope));
    }
    store_vec<T, VEC>(dx + base, da);
    store_vec<T, VEC>(dx + base + h, db);
  }
}

// The bias is tiny (one row): convert it once to the compute type so the
// kernels need no template parameter for its dtype.
c10::optional<at::Tensor> bias_as_opmath(const c10::optional<at::Tensor>& bias,
                                         at::ScalarType input_dtype) {
  if (!bias.has_value()) return c10::nullopt;
  return bias->to(input_dtype == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

// Picks the widest vector the pointers and row length allow, and launches
// `launch(std::integral_constant<int, VEC>)`.
template <typename T, typename F>
void with_vec(std::initializer_list<const void*> ptrs, int64_t row_len, F&& launch) {
  constexpr int kVec = 16 / sizeof(T);
  bool ok = row_len % kVec == 0;
  for (const void* p : ptrs) ok = ok && is_aligned(p, 16);
  if (ok) {
    launch(std::integral_constant<int, kVec>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

at::Tensor bias_act_fwd_cuda(const at::Tensor& input, const c10::optional<at::Tensor>& bias,
                             c10::string_view act, double negative_slope) {
  FASTDL_CHECK_DEVICE_TYPE(input, at::kCUDA);
  check_bias_act_args(input, bias);
  const Act a = parse_act(std::string(act.data(), act.size()));
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return out;
  const auto b = bias_as_opmath(bias, x.scalar_type());
  // Without a bias any vector is fine: treat the tensor as one row.
  const int64_t cols = b ? x.size(-1) : n;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int dev = input.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_fwd_cuda", [&] {
    using C = at::opmath_type<scalar_t>;
    const C slope = static_cast<C>(negative_slope);
    const C* bp = b ? b->data_ptr<C>() : nullptr;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    dispatch_act(a, [&](auto act_tag) {
      with_vec<scalar_t>({xp, yp}, bp ? cols : 0, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        bias_act_fwd_kernel<scalar_t, VEC, decltype(act_tag)::value>
            <<<grid_for(n / VEC, kThreads, dev), kThreads, 0, stream>>>(xp, bp, yp, n, cols, slope);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

at::Tensor bias_act_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                             const c10::optional<at::Tensor>& bias, c10::string_view act,
                             double negative_slope) {
  FASTDL_CHECK_DEVICE_TYPE(input, at::kCUDA);
  check_bias_act_args(input, bias);
  FASTDL_CHECK_SAME_DEVICE(grad_out, input);
  FASTDL_CHECK_SAME_SHAPE(grad_out, input);
  FASTDL_CHECK_SAME_DTYPE(grad_out, input);
  const Act a = parse_act(std::string(act.data(), act.size()));
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const at::Tensor g = grad_out.contiguous();
  at::Tensor grad_in = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return grad_in;
  const auto b = bias_as_opmath(bias, x.scalar_type());
  const int64_t cols = b ? x.size(-1) : n;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int dev = input.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_bwd_cuda", [&] {
    using C = at::opmath_type<scalar_t>;
    const C slope = static_cast<C>(negative_slope);
    const C* bp = b ? b->data_ptr<C>() : nullptr;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* dp = grad_in.data_ptr<scalar_t>();
    dispatch_act(a, [&](auto act_tag) {
      with_vec<scalar_t>({xp, gp, dp}, bp ? cols : 0, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        bias_act_bwd_kernel<scalar_t, VEC, decltype(act_tag)::value>
            <<<grid_for(n / VEC, kThreads, dev), kThreads, 0, stream>>>(gp, xp, bp, dp, n, cols, slope);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return grad_in;
}

at::Tensor glu_fwd_cuda(const at::Tensor& input, c10::string_view act, double negative_slope) {
  FASTDL_CHECK_DEVICE_TYPE(input, at::kCUDA);
  const int64_t h = check_glu_args(input);
  const Act a = parse_act(std::string(act.data(), act.size()));
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty(glu_out_shape(x), x.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int dev = input.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "glu_fwd_cuda", [&] {
    using C = at::opmath_type<scalar_t>;
    const C slope = static_cast<C>(negative_slope);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    dispatch_act(a, [&](auto act_tag) {
      with_vec<scalar_t>({xp, yp}, h, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        glu_fwd_kernel<scalar_t, VEC, decltype(act_tag)::value>
            <<<grid_for(n / VEC, kThreads, dev), kThreads, 0, stream>>>(xp, yp, n, h, slope);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

at::Tensor glu_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& input, c10::string_view act,
                        double negative_slope) {
  FASTDL_CHECK_DEVICE_TYPE(input, at::kCUDA);
  const int64_t h = check_glu_args(input);
  FASTDL_CHECK_SAME_DEVICE(grad_out, input);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(glu_out_shape(input)),
              "fastdl: grad_out must have shape ", at::IntArrayRef(glu_out_shape(input)), ", got ",
              grad_out.sizes());
  FASTDL_CHECK_SAME_DTYPE(grad_out, input);
  const Act a = parse_act(std::string(act.data(), act.size()));
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const at::Tensor g = grad_out.contiguous();
  at::Tensor grad_in = at::empty(x.sizes(), x.options());
  const int64_t n = g.numel();
  if (n == 0) return grad_in;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int dev = input.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "glu_bwd_cuda", [&] {
    using C = at::opmath_type<scalar_t>;
    const C slope = static_cast<C>(negative_slope);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* dp = grad_in.data_ptr<scalar_t>();
    dispatch_act(a, [&](auto act_tag) {
      with_vec<scalar_t>({xp, gp, dp}, h, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        glu_bwd_kernel<scalar_t, VEC, decltype(act_tag)::value>
            <<<grid_for(n / VEC, kThreads, dev), kThreads, 0, stream>>>(gp, xp, dp, n, h, slope);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("bias_act_fwd", &bias_act_fwd_cuda);
  m.impl("bias_act_bwd", &bias_act_bwd_cuda);
  m.impl("glu_fwd", &glu_fwd_cuda);
  m.impl("glu_bwd", &glu_bwd_cuda);
}

}  // namespace fastdl
