// LayerNorm / RMSNorm family: argument checks and shapes shared by the CPU
// (norm_cpu.cpp) and CUDA (norm.cu) kernels.
//
// The input is viewed as (rows, cols) with cols = prod(normalized_shape).
// Statistics (mean, rstd) are kept in the compute type: fp32 for
// fp32/fp16/bf16 input, fp64 for fp64 (CPU only, for gradcheck).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "common/checks.h"

namespace fastdl {

struct NormDims {
  int64_t rows;
  int64_t cols;
  std::vector<int64_t> stat_shape;  // input.shape[:-len(normalized_shape)]
};

// Weight and bias share one dtype (the kernels' W): the input's, or fp32
// under a fp16/bf16 input (mixed precision keeps norm weights in fp32).
inline void check_norm_param(const at::Tensor& p, const char* name, const at::Tensor& input,
                             at::IntArrayRef normalized_shape) {
  TORCH_CHECK(p.device() == input.device(), "fastdl: ", name, " must be on input's device (",
              input.device(), "), got ", p.device());
  TORCH_CHECK(p.sizes() == normalized_shape, "fastdl: ", name, " must have shape ",
              normalized_shape, " (normalized_shape), got ", p.sizes());
  const auto t = input.scalar_type();
  TORCH_CHECK(p.scalar_type() == t || (p.scalar_type() == at::kFloat && t != at::kDouble),
              "fastdl: ", name, " must be float32 or input's dtype (", t, "), got ",
              p.scalar_type());
}

// t must match ref in device, shape and dtype (an optional argument cannot
// go through the FASTDL_CHECK_SAME_* macros, which print the variable name).
inline void check_same_as(const at::Tensor& t, const char* name, const at::Tensor& ref,
                          const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "fastdl: ", name, " and ", ref_name,
              " must be on the same device, got ", t.device(), " and ", ref.device());
  TORCH_CHECK(t.sizes() == ref.sizes(), "fastdl: ", name, " must have the shape of ", ref_name,
              " ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastdl: ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline NormDims check_norm_fwd_args(const at::Tensor& input,
                                    const c10::optional<at::Tensor>& residual,
                                    const c10::optional<at::Tensor>& weight,
                                    const c10::optional<at::Tensor>& bias,
                                    at::IntArrayRef normalized_shape) {
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(k >= 1, "fastdl: normalized_shape must have at least one dim");
  TORCH_CHECK(input.dim() >= k && input.sizes().slice(input.dim() - k) == normalized_shape,
              "fastdl: normalized_shape ", normalized_shape,
              " must match the trailing dims of input, got input of shape ", input.sizes());
  if (residual.has_value()) check_same_as(*residual, "residual", input, "input");
  if (weight.has_value()) check_norm_param(*weight, "weight", input, normalized_shape);
  if (bias.has_value()) check_norm_param(*bias, "bias", input, normalized_shape);
  if (weight.has_value() && bias.has_value()) {
    TORCH_CHECK(weight->scalar_type() == bias->scalar_type(),
                "fastdl: weight and bias must have one dtype, got ", weight->scalar_type(),
                " and ", bias->scalar_type());
  }
  NormDims d;
  d.stat_shape.assign(input.sizes().begin(), input.sizes().end() - k);
  d.cols = c10::multiply_integers(normalized_shape);
  // Column indices inside a row are 32-bit and step past the row end by up
  // to a block's worth: 2^30 keeps them clear of overflow.
  TORCH_CHECK(d.cols <= (int64_t(1) << 30),
              "fastdl: prod(normalized_shape) must be at most 2^30, got ", d.cols);
  d.rows = d.cols == 0 ? c10::multiply_integers(d.stat_shape) : input.numel() / d.cols;
  return d;
}

// The backward takes the leading shape from rstd: normalized dims are the
// input's dims past rstd.dim(). mean is read only when rms is false.
inline NormDims check_norm_bwd_args(const at::Tensor& grad_out,
                                    const c10::optional<at::Tensor>& grad_residual,
                                    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                    const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
                                    const at::Tensor& rstd, bool rms) {
  check_same_as(grad_out, "grad_out", x, "x");
  if (grad_residual.has_value()) check_same_as(*grad_residual, "grad_residual", x, "x");
  const auto stat_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(rstd.dim() < x.dim() && rstd.sizes() == x.sizes().slice(0, rstd.dim()),
              "fastdl: rstd must have the leading shape of x (x.shape[:-len(normalized_shape)]), "
              "got rstd ", rstd.sizes(), " for x ", x.sizes());
  TORCH_CHECK(rstd.scalar_type() == stat_type, "fastdl: rstd must be ", stat_type, ", got ",
              rstd.scalar_type());
  FASTDL_CHECK_SAME_DEVICE(rstd, x);
  if (!rms) {
    FASTDL_CHECK_SAME_SHAPE(mean, rstd);
    FASTDL_CHECK_SAME_DTYPE(mean, rstd);
    FASTDL_CHECK_SAME_DEVICE(mean, x);
  }
  const at::IntArrayRef normalized_shape = x.sizes().slice(rstd.dim());
  if (weight.has_value()) check_norm_param(*weight, "weight", x, normalized_shape);
  if (bias.has_value()) check_norm_param(*bias, "bias", x, normalized_shape);
  if (weight.has_value() && bias.has_value()) {
    TORCH_CHECK(weight->scalar_type() == bias->scalar_type(),
                "fastdl: weight and bias must have one dtype, got ", weight->scalar_type(),
                " and ", bias->scalar_type());
  }
  NormDims d;
  d.stat_shape.assign(rstd.sizes().begin(), rstd.sizes().end());
  d.cols = c10::multiply_integers(normalized_shape);
  // Column indices inside a row are 32-bit and step past the row end by up
  // to a block's worth: 2^30 keeps them clear of overflow.
  TORCH_CHECK(d.cols <= (int64_t(1) << 30),
              "fastdl: prod(normalized_shape) must be at most 2^30, got ", d.cols);
  d.rows = rstd.numel();
  return d;
}

// dtype of the kernels' weight/bias pointer W: the parameters' dtype, or the
// input's when there are none.
inline at::ScalarType norm_param_dtype(const at::Tensor& input,
                                       const c10::optional<at::Tensor>& weight,
                                       const c10::optional<at::Tensor>& bias) {
  if (weight.has_value()) return weight->scalar_type();
  if (bias.has_value()) return bias->scalar_type();
  return input.scalar_type();
}

}  // namespace fastdl
