// CPU kernels for the activation family: the same functors as the CUDA
// kernels, in plain loops split across threads by at::parallel_for.
// Forward and backward share one loop: with grad_out given it writes
// grad_out * act'(x + b), else act(x + b).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "activation.h"

namespace fastdl {
namespace {

constexpr int64_t kGrain = 1 << 15;

at::Tensor bias_act_cpu(const c10::optional<at::Tensor>& grad_out, const at::Tensor& input,
                        const c10::optional<at::Tensor>& bias, c10::string_view act,
                        double negative_slope) {
  FASTDL_CHECK_DEVICE_TYPE(input, at::kCPU);
  check_bias_act_args(grad_out, input, bias);
  const Act a = parse_act(act);
  at::Tensor out = bias.has_value() ? at::empty(input.sizes(), input.options()) : at::empty_like(input);
  const at::Tensor x = as_layout_of(input, out);
  const at::Tensor g = grad_out.has_value() ? as_layout_of(*grad_out, out) : at::Tensor();
  const int64_t n = x.numel();
  if (n == 0) return out;
  const auto b = bias_as_opmath(bias, x.scalar_type());
  const int64_t cols = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_cpu", [&] {
    using C = at::opmath_type<scalar_t>;
    const C slope = static_cast<C>(negative_slope);
    const C* bp = b ? b->data_ptr<C>() : nullptr;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.defined() ? g.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    dispatch_act(a, [&](auto tag) {
      using Op = ActOp<decltype(tag)::value>;
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const C v = static_cast<C>(xp[i]) + (bp ? bp[i % cols] : C(0));
          op[i] = static_cast<scalar_t>(gp ? static_cast<C>(gp[i]) * Op::grad(v, slope)
                                           : Op::fwd(v, slope));
        }
      });
    });
  });
  return out;
}

at::Tensor bias_act_fwd_cpu(const at::Tensor& input, const c10::optional<at::Tensor>& bias,
                            c10::string_view act, double negative_slope) {
  return bias_act_cpu(c10::nullopt, input, bias, act, negative_slope);
}

at::Tensor bias_act_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                            const c10::optional<at::Tensor>& bias, c10::string_view act,
                            double negative_slope) {
  return bias_act_cpu(grad_out, input, bias, act, negative_slope);
}

// Gated, y = act(a) * b: forward writes y; backward writes
// da = g b act'(a) and db = g act(a) into the two halves of grad_input.
at::Tensor glu_cpu(const c10::optional<at::Tensor>& grad_out, const at::Tensor& input,
                   c10::string_view act, double negative_slope) {
  FASTDL_CHECK_DEVICE_TYPE(input, at::kCPU);
  const int64_t h = check_glu_args(grad_out, input);
  const Act a = parse_act(act);
  const at::Tensor x = input.contiguous();
  const at::Tensor g = grad_out.has_value() ? grad_out->contiguous() : at::Tensor();
  at::Tensor out = g.defined() ? at::empty(x.sizes(), x.options())
                               : at::empty(glu_out_shape(x), x.options());
  const int64_t n = x.numel() / 2;  // one (a, b) pair per output element
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "glu_cpu", [&] {
    using C = at::opmath_type<scalar_t>;
    const C slope = static_cast<C>(negative_slope);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.defined() ? g.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    dispatch_act(a, [&](auto tag) {
      using Op = ActOp<decltype(tag)::value>;
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t row = i / h, ia = i + row * h;  // row * 2h + col
          const C av = static_cast<C>(xp[ia]), bv = static_cast<C>(xp[ia + h]);
          if (gp) {
            const C gv = static_cast<C>(gp[i]);
            op[ia] = static_cast<scalar_t>(gv * bv * Op::grad(av, slope));
            op[ia + h] = static_cast<scalar_t>(gv * Op::fwd(av, slope));
          } else {
            op[i] = static_cast<scalar_t>(Op::fwd(av, slope) * bv);
          }
        }
      });
    });
  });
  return out;
}

at::Tensor glu_fwd_cpu(const at::Tensor& input, c10::string_view act, double negative_slope) {
  return glu_cpu(c10::nullopt, input, act, negative_slope);
}

at::Tensor glu_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input, c10::string_view act,
                       double negative_slope) {
  return glu_cpu(grad_out, input, act, negative_slope);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("bias_act_fwd", &bias_act_fwd_cpu);
  m.impl("bias_act_bwd", &bias_act_bwd_cpu);
  m.impl("glu_fwd", &glu_fwd_cpu);
  m.impl("glu_bwd", &glu_bwd_cpu);
}

}  // namespace fastdl
