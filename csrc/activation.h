// Activation functors shared by the CPU (activation_cpu.cpp) and CUDA
// (activation.cu) kernels, plus the argument checks both run.
//
// Every functor computes in fp32 for fp32/fp16/bf16 storage (fp64 for fp64),
// so fp16/bf16 results are rounded once, as torch's own kernels do (opmath).
#pragma once
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/ops/empty_like.h>

#include "common/checks.h"
#include "common/hd.h"

namespace fastdl {

enum class Act : int { kGelu, kGeluTanh, kRelu, kLeakyRelu, kSilu, kSigmoid, kTanh };

inline Act parse_act(const std::string& name) {
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  if (name == "relu") return Act::kRelu;
  if (name == "leaky_relu") return Act::kLeakyRelu;
  if (name == "silu") return Act::kSilu;
  if (name == "sigmoid") return Act::kSigmoid;
  if (name == "tanh") return Act::kTanh;
  TORCH_CHECK(false, "fastdl: act must be one of gelu, gelu_tanh, relu, leaky_relu, silu, ",
              "sigmoid, tanh; got '", name, "'");
}

// Calls f(std::integral_constant<Act, A>{}) so the activation is a template
// parameter of the kernel: no per-element switch.
template <typename F>
void dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::kGelu: return f(std::integral_constant<Act, Act::kGelu>{});
    case Act::kGeluTanh: return f(std::integral_constant<Act, Act::kGeluTanh>{});
    case Act::kRelu: return f(std::integral_constant<Act, Act::kRelu>{});
    case Act::kLeakyRelu: return f(std::integral_constant<Act, Act::kLeakyRelu>{});
    case Act::kSilu: return f(std::integral_constant<Act, Act::kSilu>{});
    case Act::kSigmoid: return f(std::integral_constant<Act, Act::kSigmoid>{});
    case Act::kTanh: return f(std::integral_constant<Act, Act::kTanh>{});
  }
}

// ActOp<A>::fwd(x) = f(x); ActOp<A>::grad(x) = f'(x), in the compute type C
// (float for fp32/fp16/bf16 storage, double for fp64). `slope` is
// leaky_relu's negative slope and ignored by the others.
template <Act A>
struct ActOp;

template <>
struct ActOp<Act::kGelu> {
  // f = x Phi(x); f' = Phi(x) + x phi(x). The exact erf, not an approximation:
  // this must match F.gelu(approximate="none").
  template <typename C>
  static FASTDL_HD C fwd(C x, C) {
    return C(0.5) * x * (C(1) + std::erf(x * C(0.70710678118654752440)));
  }
  template <typename C>
  static FASTDL_HD C grad(C x, C) {
    const C cdf = C(0.5) * (C(1) + std::erf(x * C(0.70710678118654752440)));
    const C pdf = std::exp(C(-0.5) * x * x) * C(0.39894228040143267794);
    return cdf + x * pdf;
  }
};

template <>
struct ActOp<Act::kGeluTanh> {
  // f = x/2 (1 + t), t = tanh(k0 (x + k1 x^3));
  // f' = (1 + t)/2 + x/2 (1 - t^2) k0 (1 + 3 k1 x^2).
  template <typename C>
  static FASTDL_HD C inner(C x) {
    return C(0.79788456080286535588) * (x + C(0.044715) * x * x * x);
  }
  template <typename C>
  static FASTDL_HD C fwd(C x, C) { return C(0.5) * x * (C(1) + std::tanh(inner(x))); }
  template <typename C>
  static FASTDL_HD C grad(C x, C) {
    const C t = std::tanh(inner(x));
    return C(0.5) * (C(1) + t) + C(0.5) * x * (C(1) - t * t) * C(0.79788456080286535588) *
                                     (C(1) + C(3 * 0.044715) * x * x);
  }
};

template <>
struct ActOp<Act::kRelu> {
  // `x < 0 ? 0 : x` keeps NaN as NaN, like torch.relu.
  template <typename C>
  static FASTDL_HD C fwd(C x, C) { return x < C(0) ? C(0) : x; }
  template <typename C>
  static FASTDL_HD C grad(C x, C) { return x > C(0) ? C(1) : C(0); }
};

template <>
struct ActOp<Act::kLeakyRelu> {
  template <typename C>
  static FASTDL_HD C fwd(C x, C slope) { return x > C(0) ? x : x * slope; }
  template <typename C>
  static FASTDL_HD C grad(C x, C slope) { return x > C(0) ? C(1) : slope; }
};

template <>
struct ActOp<Act::kSigmoid> {
  template <typename C>
  static FASTDL_HD C fwd(C x, C) { return C(1) / (C(1) + std::exp(-x)); }
  template <typename C>
  static FASTDL_HD C grad(C x, C) {
    const C s = fwd(x, C(0));
    return s * (C(1) - s);
  }
};

template <>
struct ActOp<Act::kSilu> {
  // f = x s, s = sigmoid(x); f' = s (1 + x (1 - s)).
  template <typename C>
  static FASTDL_HD C fwd(C x, C) { return x / (C(1) + std::exp(-x)); }
  template <typename C>
  static FASTDL_HD C grad(C x, C) {
    const C s = ActOp<Act::kSigmoid>::fwd(x, C(0));
    return s * (C(1) + x * (C(1) - s));
  }
};

template <>
struct ActOp<Act::kTanh> {
  template <typename C>
  static FASTDL_HD C fwd(C x, C) { return std::tanh(x); }
  template <typename C>
  static FASTDL_HD C grad(C x, C) {
    const C t = std::tanh(x);
    return C(1) - t * t;
  }
};

// Checks common to both devices. bias broadcasts over the last dim and may be
// fp32 under a low-precision input (autocast keeps Linear biases in fp32).
// grad_out, when given, is the backward's incoming gradient.
// (The locals are named as the arguments: the check macros print their names.)
inline void check_bias_act_args(const c10::optional<at::Tensor>& maybe_grad_out,
                                const at::Tensor& input, const c10::optional<at::Tensor>& maybe_bias) {
  FASTDL_CHECK_FLOATING(input);
  if (maybe_grad_out.has_value()) {
    const at::Tensor& grad_out = *maybe_grad_out;
    FASTDL_CHECK_SAME_DEVICE(grad_out, input);
    FASTDL_CHECK_SAME_SHAPE(grad_out, input);
    FASTDL_CHECK_SAME_DTYPE(grad_out, input);
  }
  if (!maybe_bias.has_value()) return;
  const at::Tensor& bias = *maybe_bias;
  FASTDL_CHECK_SAME_DEVICE(bias, input);
  TORCH_CHECK(input.dim() >= 1, "fastdl: input must have at least one dim when bias is given");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == input.size(-1), "fastdl: bias must have shape [",
              input.size(-1), "] (the last dim of input), got ", bias.sizes());
  TORCH_CHECK(bias.scalar_type() == input.scalar_type() || bias.scalar_type() == at::kFloat,
              "fastdl: bias must be float32 or input's dtype (", input.scalar_type(), "), got ",
              bias.scalar_type());
  TORCH_CHECK(input.scalar_type() != at::kDouble || bias.scalar_type() == at::kDouble,
              "fastdl: bias must be float64 when input is float64, got ", bias.scalar_type());
}

// The bias is tiny (one row): convert it once to the compute type so the
// kernels need no template parameter for its dtype.
inline c10::optional<at::Tensor> bias_as_opmath(const c10::optional<at::Tensor>& bias,
                                                at::ScalarType input_dtype) {
  if (!bias.has_value()) return c10::nullopt;
  return bias->to(input_dtype == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

// Without a bias the op is purely elementwise, so any dense layout (channels_last,
// a transposed matrix, ...) is processed in storage order and the output keeps
// input's layout: out = empty_like(input). `as_layout_of(t, out)` returns t when
// it already has out's strides, else a copy in out's layout, so x, grad_out and
// out line up element for element in memory. With a bias (broadcast over the
// last logical dim) everything is made contiguous instead. The fake kernels in
// fastdl/_ops/activation.py follow the same rule.
inline at::Tensor as_layout_of(const at::Tensor& t, const at::Tensor& out) {
  // Same sizes and strides as the dense `out` means the same memory layout.
  if (t.strides() == out.strides()) return t;
  return at::empty_like(out).copy_(t);
}

inline std::vector<int64_t> glu_out_shape(const at::Tensor& input) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() /= 2;
  return shape;
}

// Gated: input (..., 2H) -> output (..., H). Returns H.
inline int64_t check_glu_args(const c10::optional<at::Tensor>& maybe_grad_out, const at::Tensor& input) {
  FASTDL_CHECK_FLOATING(input);
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) % 2 == 0,
              "fastdl: input's last dim must be even (it is split into two halves), got shape ",
              input.sizes());
  if (maybe_grad_out.has_value()) {
    const at::Tensor& grad_out = *maybe_grad_out;
    const auto shape = glu_out_shape(input);
    FASTDL_CHECK_SAME_DEVICE(grad_out, input);
    TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(shape), "fastdl: grad_out must have shape ",
                at::IntArrayRef(shape), ", got ", grad_out.sizes());
    FASTDL_CHECK_SAME_DTYPE(grad_out, input);
  }
  return input.size(-1) / 2;
}

inline Act parse_act(c10::string_view name) { return parse_act(std::string(name.data(), name.size())); }

}  // namespace fastdl
