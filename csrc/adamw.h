// Adam / AdamW math shared by the CPU (adamw_cpu.cpp) and CUDA (adamw.cu)
// kernels, the stochastic-rounding hash, and the argument checks both run.
//
// One step for one element, in fp32 whatever the storage dtypes:
//   g  = grad * grad_mult                      grad_mult = clip_coef / grad_scale (negated: maximize)
//   p  = p * decay                             AdamW: decay = 1 - lr * weight_decay
//   g  = g + l2 * p                            Adam:  l2 = weight_decay
//   m  = m + (1 - beta1) (g - m)               (torch's lerp form, so fp32 results match it)
//   v  = v beta2 + (1 - beta2) g g
//   v^ = max(v_max, v)  with amsgrad, else v
//   p  = p - step_size m / (sqrt(v^) / sqrt(1 - beta2^t) + eps),   step_size = lr / (1 - beta1^t)
// The per-tensor scalars (bias corrections of its step count t) are computed
// in double, as torch does, then used in fp32.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/checks.h"
#include "common/hd.h"

namespace fastdl {

// Scalars of one call. Pointers are device (or CPU) scalars, nullptr when absent.
struct AdamwArgs {
  double lr;
  const float* lr_ptr;  // overrides lr: a tensor lr (capturable, LR schedulers under graphs)
  double beta1, beta2;
  float eps, weight_decay;
  bool decoupled, maximize, stochastic_rounding;
  const float* grad_scale;  // GradScaler: grads arrive multiplied by it
  const float* found_inf;   // nonzero: skip the whole step
  const float* grad_norm;   // global L2 norm of the (scaled) grads, for clipping
  float max_grad_norm;
  uint32_t seed;
};

// Per tensor and step.
struct AdamwCoeffs {
  float grad_mult, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, l2, decay, step_size,
      bc2_sqrt;
};

// The multiplier of the raw grad: unscale, clip, maximize. clip_coef is
// min(1, max_norm / (norm + 1e-6)) of the unscaled grads, as in
// torch.nn.utils.clip_grad_norm_.
FASTDL_HD float adamw_grad_mult(const AdamwArgs& a) {
  const float scale = a.grad_scale ? *a.grad_scale : 1.f;
  float mult = 1.f / scale;
  if (a.grad_norm) {
    const float coef = a.max_grad_norm / (*a.grad_norm / scale + 1e-6f);
    mult = coef < 1.f ? coef / scale : mult;
  }
  return a.maximize ? -mult : mult;
}

FASTDL_HD AdamwCoeffs adamw_coeffs(const AdamwArgs& a, double lr, float grad_mult, float step) {
  AdamwCoeffs k;
  const double bc1 = 1.0 - ::pow(a.beta1, double(step));
  const double bc2 = 1.0 - ::pow(a.beta2, double(step));
  k.grad_mult = grad_mult;
  k.beta1 = float(a.beta1);
  k.one_minus_beta1 = float(1.0 - a.beta1);
  k.beta2 = float(a.beta2);
  k.one_minus_beta2 = float(1.0 - a.beta2);
  k.eps = a.eps;
  k.l2 = a.decoupled ? 0.f : a.weight_decay;
  k.decay = a.decoupled ? float(1.0 - lr * double(a.weight_decay)) : 1.f;
  k.step_size = float(lr / bc1);
  k.bc2_sqrt = float(::sqrt(bc2));
  return k;
}

// One element: updates m, v (and vmax when non-null) and returns the new param.
FASTDL_HD float adamw_update(float p, float g, float& m, float& v, float* vmax, const AdamwCoeffs& k) {
  g = g * k.grad_mult;
  p = p * k.decay;
  g = g + k.l2 * p;
  m = m + k.one_minus_beta1 * (g - m);
  v = v * k.beta2 + k.one_minus_beta2 * g * g;
  float vhat = v;
  if (vmax) {
    *vmax = *vmax > v ? *vmax : v;
    vhat = *vmax;
  }
  const float denom = ::sqrtf(vhat) / k.bc2_sqrt + k.eps;
  return p - k.step_size * (m / denom);
}

// --- stochastic rounding ------------------------------------------------------
// A counter-based hash: the random bits of element i of tensor j at step t are
// a pure function of (seed, j, t, i), so every backend draws the same bits,
// results are reproducible, and no RNG state is carried (capturable).
// mix is a 32-bit integer finalizer (xorshift-multiply rounds).
FASTDL_HD uint32_t sr_mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

FASTDL_HD uint32_t sr_key(uint32_t seed, uint32_t tensor_index, float step) {
  return sr_mix(seed ^ sr_mix(tensor_index ^ sr_mix(uint32_t(step))));
}

FASTDL_HD uint32_t sr_bits(uint32_t key, int64_t i) {
  const uint64_t u = uint64_t(i);
  return sr_mix(uint32_t(u) ^ sr_mix(uint32_t(u >> 32) ^ key));
}

// fp32 -> bf16 rounding up with probability equal to the dropped fraction:
// add 16 random bits below the kept mantissa, then truncate. Unbiased:
// E[result] = x. NaN stays NaN (plain conversion).
FASTDL_HD c10::BFloat16 round_bf16_stochastic(float x, uint32_t bits) {
  if (x != x) return c10::BFloat16(x);
  uint32_t u;
  ::memcpy(&u, &x, sizeof(u));
  u = (u + (bits & 0xffffu)) >> 16;
  return c10::BFloat16(uint16_t(u), c10::BFloat16::from_bits());
}

template <typename T>
FASTDL_HD T round_param(float x, bool stochastic, uint32_t key, int64_t i) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (stochastic) return round_bf16_stochastic(x, sr_bits(key, i));
  }
  return static_cast<T>(x);
}

// Calls f(T{}) for the storage type of a float32/float16/bfloat16 tensor.
template <typename F>
void dispatch_adamw_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float());
    case at::kHalf: return f(c10::Half());
    case at::kBFloat16: return f(c10::BFloat16());
    default: TORCH_CHECK(false, "fastdl: adamw takes float32, float16 or bfloat16 tensors, got ", t);
  }
}

// Calls f(T{}, S{}) for param storage T and state storage S (float32,
// bfloat16, or T itself).
template <typename F>
void dispatch_param_state(at::ScalarType param_type, at::ScalarType state_type, F&& f) {
  dispatch_adamw_dtype(param_type, [&](auto t) {
    using T = decltype(t);
    if (state_type == at::kFloat) {
      f(T(), float());
    } else if (state_type == at::kBFloat16) {
      f(T(), c10::BFloat16());
    } else {
      f(T(), T());
    }
  });
}

// --- argument checks (both devices) ---------------------------------------------
inline bool adamw_param_dtype_ok(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_adamw_scalar(const c10::optional<at::Tensor>& t, const char* name,
                               const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == 1, "fastdl: ", name,
              " must be a one-element float32 tensor, got ", t->scalar_type(), " of shape ",
              t->sizes());
  TORCH_CHECK(t->device() == device, "fastdl: ", name, " must be on the params' device (", device,
              "), got ", t->device());
}

// Lists: grads, exp_avgs, exp_avg_sqs and steps have one entry per param;
// max_exp_avg_sqs (amsgrad) and master_params are empty or one per param.
// Every companion tensor has its param's shape and strides, so the kernels walk
// all of them by one flat index.
inline void check_adamw_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                             at::TensorList master_params, at::TensorList steps,
                             const c10::optional<at::Tensor>& lr_tensor,
                             const c10::optional<at::Tensor>& grad_scale,
                             const c10::optional<at::Tensor>& found_inf,
                             const c10::optional<at::Tensor>& grad_norm, at::DeviceType device_type) {
  const size_t n = params.size();
  const auto same_len = [n](at::TensorList l, const char* name, bool optional) {
    TORCH_CHECK(l.size() == n || (optional && l.empty()), "fastdl: ", name, " must have ",
                optional ? "0 or " : "", n, " tensors (one per param), got ", l.size());
  };
  same_len(grads, "grads", false);
  same_len(exp_avgs, "exp_avgs", false);
  same_len(exp_avg_sqs, "exp_avg_sqs", false);
  same_len(steps, "steps", false);
  same_len(max_exp_avg_sqs, "max_exp_avg_sqs", true);
  same_len(master_params, "master_params", true);
  if (n == 0) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.type() == device_type, "fastdl: params must be ", device_type,
              " tensors, got ", device);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device() == device, "fastdl: params[", i, "] is on ", p.device(),
                " but params[0] is on ", device, "; one call takes tensors of one device");
    TORCH_CHECK(adamw_param_dtype_ok(p.scalar_type()), "fastdl: params[", i,
                "] must be float32, float16 or bfloat16, got ", p.scalar_type());
    TORCH_CHECK(p.layout() == at::kStrided && p.is_non_overlapping_and_dense(), "fastdl: params[",
                i, "] must be a dense tensor without gaps or overlaps");
    const auto companion = [&](const at::Tensor& t, const char* name) {
      TORCH_CHECK(t.layout() == at::kStrided, "fastdl: ", name, "[", i,
                  "] must be a dense (strided) tensor, got layout ", t.layout(),
                  " (sparse gradients are not supported)");
      TORCH_CHECK(t.device() == device, "fastdl: ", name, "[", i, "] must be on ", device,
                  ", got ", t.device());
      TORCH_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides(), "fastdl: ", name, "[", i,
                  "] must have the shape ", p.sizes(), " and strides ", p.strides(), " of params[",
                  i, "], got ", t.sizes(), " and ", t.strides());
    };
    companion(grads[i], "grads");
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(), "fastdl: grads[", i,
                "] must have the dtype of params[", i, "] (", p.scalar_type(), "), got ",
                grads[i].scalar_type());
    companion(exp_avgs[i], "exp_avgs");
    companion(exp_avg_sqs[i], "exp_avg_sqs");
    const at::ScalarType s = exp_avgs[i].scalar_type();
    TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == p.scalar_type(), "fastdl: exp_avgs[",
                i, "] must be float32, bfloat16 or the dtype of params[", i, "], got ", s);
    TORCH_CHECK(exp_avg_sqs[i].scalar_type() == s, "fastdl: exp_avg_sqs[", i,
                "] must have the dtype of exp_avgs[", i, "] (", s, "), got ",
                exp_avg_sqs[i].scalar_type());
    if (!max_exp_avg_sqs.empty()) {
      companion(max_exp_avg_sqs[i], "max_exp_avg_sqs");
      TORCH_CHECK(max_exp_avg_sqs[i].scalar_type() == s, "fastdl: max_exp_avg_sqs[", i,
                  "] must have the dtype of exp_avgs[", i, "] (", s, "), got ",
                  max_exp_avg_sqs[i].scalar_type());
    }
    if (!master_params.empty()) {
      companion(master_params[i], "master_params");
      TORCH_CHECK(master_params[i].scalar_type() == at::kFloat, "fastdl: master_params[", i,
                  "] must be float32, got ", master_params[i].scalar_type());
    }
    TORCH_CHECK(steps[i].scalar_type() == at::kFloat && steps[i].numel() == 1, "fastdl: steps[",
                i, "] must be a one-element float32 tensor, got ", steps[i].scalar_type(),
                " of shape ", steps[i].sizes());
    TORCH_CHECK(steps[i].device() == device, "fastdl: steps[", i, "] must be on ", device,
                ", got ", steps[i].device());
  }
  check_adamw_scalar(lr_tensor, "lr_tensor", device);
  check_adamw_scalar(grad_scale, "grad_scale", device);
  check_adamw_scalar(found_inf, "found_inf", device);
  check_adamw_scalar(grad_norm, "grad_norm", device);
}

inline void check_grad_norm_args(at::TensorList grads, at::DeviceType device_type) {
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.layout() == at::kStrided && g.is_non_overlapping_and_dense(), "fastdl: grads[",
                i, "] must be a dense tensor without gaps or overlaps");
    TORCH_CHECK(adamw_param_dtype_ok(g.scalar_type()), "fastdl: grads[", i,
                "] must be float32, float16 or bfloat16, got ", g.scalar_type());
    TORCH_CHECK(g.device() == grads[0].device() && g.device().type() == device_type,
                "fastdl: grads[", i, "] must be a ", device_type, " tensor on ", grads[0].device(),
                ", got ", g.device());
  }
}

}  // namespace fastdl
