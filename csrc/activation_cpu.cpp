// CPU kernels for the activation family: the same functors as the CUDA
// kernels, in plain loops split across threads by at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "activation.h"

namespace fastdl {
namespace {

constexpr int64_t kGrain = 1 << 15;

// The bias is tiny (one row): convert it once to the compute type so the
// kernels need no template parameter for its dtype.
c10::optional<at::Tensor> bias_as_opmath(const c10::optional<at::Tensor>& bias,
                                         at::ScalarType input_dtype) {
  if (!bias.has_value()) return c10::nullopt;
  return bias->to(input_dtype == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

at::Tensor bias_act_fwd_cpu(const at::Tensor& input, const c10::optional<at::Tensor>& bias,
                            c10::string_view act, double negative_slope) {
  FASTDL_CHECK_DEVICE_TYPE(input, at::kCPU);
  check_bias_act_args(input, bias);
  const Act a = parse_act(std::string(act.data(), act.size()));
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return out;
  const auto b = bias_as_opmath(bias, x.scalar_type());
  const int64_t cols = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_fwd_cpu", [&] {
    using C = at::opmath_type<scalar_t>;
    const C slope = static_cast<C>(negative_slope);
    const C* bp = b ? b->data_ptr<C>() : nullptr;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    dispatch_act(a, [&](auto tag) {
      using Op = ActOp<decltype(tag)::value>;
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const C v = static_cast<C>(xp[i]) + (bp ? bp[i % cols] : C(0));
          yp[i] = static_cast<scalar_t>(Op::fwd(v, slope));
        }
      });
    });
  });
  return out;
}

at::Tensor bias_act_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                            const c10::optional<at::Tensor>& bias, c10::string_view act,
                            double negative_slope) {
  FASTDL_CHECK_DEVICE_TYPE(input, at::kCPU);
  check_bias_act_args(input, bias);
  FASTDL_CHECK_SAME_SHAPE(grad_out, input);
  FASTDL_CHECK_SAME_DTYPE(grad_out, input);
  const Act a = parse_act(std::string(act.data(), act.size()));
  const at::Tensor x = input.contiguous();
  const at::Tensor g = grad_out.contiguous();
  at::Tensor grad_in = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return grad_in;
  const auto b = bias_as_opmath(bias, x.scalar_type());
  const int64_t cols = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_bwd_cpu", [&] {
    using C = at::opmath_type<scalar_t>;
    const C slope = static_cast<C>(negative_slope);
    const C* bp = b ? b->data_ptr<C>() : nullptr;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* dp = grad_in.data_ptr<scalar_t>();
    dispatch_act(a, [&](auto tag) {
      using Op = ActOp<decltype(tag)::value>;
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const C v = static_cast<C>(xp[i]) + (bp ? bp[i % cols] : C(0));
          dp[i] = static_cast<scalar_t>(static_cast<C>(gp[i]) * Op::grad(v, slope));
        }
      });
    });
  });
  return grad_in;
}

at::Tensor glu_fwd_cpu(const at::Tensor& input, c10::string_view act, double negative_slope) {
  FASTDL_CHECK_DEVICE_TYPE(input, at::kCPU);
  const int64_t h = check_glu_args(input);
  const Act a = parse_act(std::string(act.data(), act.size()));
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty(glu_out_shape(x), x.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "glu_fwd_cpu", [&] {
    using C = at::opmath_type<scalar_t>;
    const C slope = static_cast<C>(negative_slope);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    dispatch_act(a, [&](auto tag) {
      using Op = ActOp<decltype(tag)::value>;
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t row = i / h, col = i - row * h;
          const scalar_t* xr = xp + row * 2 * h;
          yp[i] = static_cast<scalar_t>(Op::fwd(static_cast<C>(xr[col]), slope) *
                                        static_cast<C>(xr[h + col]));
        }
      });
    });
  });
  return out;
}

at::Tensor glu_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input, c10::string_view act,
                       double negative_slope) {
  FASTDL_CHECK_DEVICE_TYPE(input, at::kCPU);
  const int64_t h = check_glu_args(input);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(glu_out_shape(input)),
              "fastdl: grad_out must have shape ", at::IntArrayRef(glu_out_shape(input)), ", got ",
              grad_out.sizes());
  FASTDL_CHECK_SAME_DTYPE(grad_out, input);
  const Act a = parse_act(std::string(act.data(), act.size()));
  const at::Tensor x = input.contiguous();
  const at::Tensor g = grad_out.contiguous();
  at::Tensor grad_in = at::empty(x.sizes(), x.options());
  const int64_t n = g.numel();
  if (n == 0) return grad_in;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "glu_bwd_cpu", [&] {
    using C = at::opmath_type<scalar_t>;
    const C slope = static_cast<C>(negative_slope);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* dp = grad_in.data_ptr<scalar_t>();
    dispatch_act(a, [&](auto tag) {
      using Op = ActOp<decltype(tag)::value>;
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t row = i / h, col = i - row * h;
          const C av = static_cast<C>(xp[row * 2 * h + col]);
          const C bv = static_cast<C>(xp[row * 2 * h + h + col]);
          const C gv = static_cast<C>(gp[i]);
          dp[row * 2 * h + col] = static_cast<scalar_t>(gv * bv * Op::grad(av, slope));
          dp[row * 2 * h + h + col] = static_cast<scalar_t>(gv * Op::fwd(av, slope));
        }
      });
    });
  });
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("bias_act_fwd", &bias_act_fwd_cpu);
  m.impl("bias_act_bwd", &bias_act_bwd_cpu);
  m.impl("glu_fwd", &glu_fwd_cpu);
  m.impl("glu_bwd", &glu_bwd_cpu);
}

}  // namespace fastdl
