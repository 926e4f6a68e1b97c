// BatchNorm family: pieces shared by the CPU (batchnorm_cpu.cpp) and CUDA
// (batchnorm.cu) kernels: argument checks, the memory layout rule, and the
// activation dispatch that adds "none" to activation.h's functors.
//
// Layout rule (the fake kernels in fastdl/_ops/batchnorm.py apply the same
// one): the channel is dim 1. An input that is dense with the channel as its
// fastest dim (channels_last, and every contiguous (N, C)) is used as a
// row-major (rows, C) matrix; anything else is made contiguous and used as
// (N, C, S), S = the product of the trailing dims. Outputs take the layout the
// kernel used (empty_like of the laid-out input: its exact strides), so a
// channels_last input gives a channels_last output.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <string>
#include <vector>

#include "activation.h"

namespace fastdl {

// y = x, y' = 1: batch_norm with act "none".
struct Identity {
  template <typename C>
  static FASTDL_HD C fwd(C x, C) { return x; }
  template <typename C>
  static FASTDL_HD C grad(C, C) { return C(1); }
};

// Calls f(Op{}) with Op = Identity for "none", else ActOp<parsed act>.
template <typename F>
void dispatch_bn_act(const std::string& name, F&& f) {
  if (name == "none") return f(Identity{});
  dispatch_act(parse_act(name), [&](auto tag) { f(ActOp<decltype(tag)::value>{}); });
}

inline bool is_channels_last_dense(const at::Tensor& x) {
  return x.movedim(1, -1).is_contiguous();
}

// `t` in the layout chosen for the input (channels_last or contiguous).
inline at::Tensor in_layout(const at::Tensor& t, bool channels_last) {
  return channels_last ? t.movedim(1, -1).contiguous().movedim(-1, 1) : t.contiguous();
}

// (N, C, S) of an input with at least 2 dims.
struct BnShape {
  int64_t n, c, s;
  int64_t rows() const { return n * s; }
  int64_t numel() const { return n * c * s; }
};

inline BnShape bn_shape(const at::Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1);
  const int64_t s = (n == 0 || c == 0) ? 1 : x.numel() / (n * c);
  return {n, c, s};
}

inline void check_bn_input(const at::Tensor& input) {
  FASTDL_CHECK_FLOATING(input);
  TORCH_CHECK(input.dim() >= 2, "fastdl: input must have at least 2 dims (N, C, ...), got shape ",
              input.sizes());
}

// Per-channel parameters: 1-D, one value per channel, float32 (float64 for a
// float64 input), on input's device.
inline void check_bn_param(const at::Tensor& p, const char* name, const at::Tensor& input) {
  const auto want = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(p.device() == input.device(), "fastdl: ", name, " must be on input's device (",
              input.device(), "), got ", p.device());
  TORCH_CHECK(p.dim() == 1 && p.size(0) == input.size(1), "fastdl: ", name, " must have shape [",
              input.size(1), "] (the channels of input), got ", p.sizes());
  TORCH_CHECK(p.scalar_type() == want, "fastdl: ", name, " must be ", want, " for a ",
              input.scalar_type(), " input, got ", p.scalar_type());
}

// A tensor that must match input in shape, dtype and device (residual, grad_out).
inline void check_like_input(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), "fastdl: ", name, " must be on input's device (",
              input.device(), "), got ", t.device());
  TORCH_CHECK(t.sizes() == input.sizes(), "fastdl: ", name, " must have the shape of input ",
              input.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "fastdl: ", name,
              " must have the dtype of input (", input.scalar_type(), "), got ", t.scalar_type());
}

inline at::ScalarType bn_stat_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace fastdl
