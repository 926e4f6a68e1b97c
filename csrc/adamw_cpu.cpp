// CPU kernels of the fused Adam/AdamW step and the grad-norm pass: the same
// per-element math as the CUDA kernels (adamw.h), one tensor at a time, each
// split across threads by at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "adamw.h"

namespace fastdl {
namespace {

constexpr int64_t kGrain = 1 << 14;

const float* scalar_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

template <typename T, typename S>
void adamw_tensor_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                      const at::Tensor& exp_avg_sq, const at::Tensor* max_exp_avg_sq,
                      const at::Tensor* master, const AdamwCoeffs& k, bool stochastic, uint32_t key) {
  T* p = param.data_ptr<T>();
  const T* g = grad.data_ptr<T>();
  S* m = exp_avg.data_ptr<S>();
  S* v = exp_avg_sq.data_ptr<S>();
  S* vmax = max_exp_avg_sq ? max_exp_avg_sq->data_ptr<S>() : nullptr;
  float* pm = master ? master->data_ptr<float>() : nullptr;
  at::parallel_for(0, param.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float mi = static_cast<float>(m[i]), vi = static_cast<float>(v[i]);
      float vmaxi = vmax ? static_cast<float>(vmax[i]) : 0.f;
      const float p0 = pm ? pm[i] : static_cast<float>(p[i]);
      const float p1 = adamw_update(p0, static_cast<float>(g[i]), mi, vi, vmax ? &vmaxi : nullptr, k);
      m[i] = static_cast<S>(mi);
      v[i] = static_cast<S>(vi);
      if (vmax) vmax[i] = static_cast<S>(vmaxi);
      if (pm) pm[i] = p1;
      p[i] = round_param<T>(p1, stochastic, key, i);
    }
  });
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList master_params, at::TensorList steps, double lr,
                    const c10::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                    double eps, double weight_decay, bool decoupled, bool maximize,
                    const c10::optional<at::Tensor>& grad_scale,
                    const c10::optional<at::Tensor>& found_inf,
                    const c10::optional<at::Tensor>& grad_norm, double max_grad_norm,
                    bool stochastic_rounding, int64_t seed) {
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps,
                   lr_tensor, grad_scale, found_inf, grad_norm, at::kCPU);
  const AdamwArgs a{lr, scalar_ptr(lr_tensor), beta1, beta2, float(eps), float(weight_decay),
                    decoupled, maximize, stochastic_rounding, scalar_ptr(grad_scale),
                    scalar_ptr(found_inf), scalar_ptr(grad_norm), float(max_grad_norm),
                    uint32_t(seed)};
  // GradScaler found inf/NaN in the grads: no param, state or step changes.
  if (a.found_inf && *a.found_inf != 0.f) return;
  const double step_lr = a.lr_ptr ? *a.lr_ptr : a.lr;
  const float grad_mult = adamw_grad_mult(a);
  for (size_t i = 0; i < params.size(); ++i) {
    float* step = steps[i].data_ptr<float>();
    *step += 1.f;
    if (params[i].numel() == 0) continue;
    const AdamwCoeffs k = adamw_coeffs(a, step_lr, grad_mult, *step);
    const uint32_t key = sr_key(a.seed, uint32_t(i), *step);
    const at::Tensor* vmax = max_exp_avg_sqs.empty() ? nullptr : &max_exp_avg_sqs[i];
    const at::Tensor* master = master_params.empty() ? nullptr : &master_params[i];
    dispatch_param_state(params[i].scalar_type(), exp_avgs[i].scalar_type(), [&](auto t, auto s) {
      adamw_tensor_cpu<decltype(t), decltype(s)>(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
                                                 vmax, master, k, stochastic_rounding, key);
    });
  }
}

// Deterministic whatever the thread count: fixed chunks, each summed in
// double (a long sequential fp32 sum would lose ~1e-6 of the norm), chunk sums
// added in order.
at::Tensor adamw_grad_norm_cpu(at::TensorList grads) {
  TORCH_CHECK(!grads.empty(), "fastdl: grads must not be empty");
  check_grad_norm_args(grads, at::kCPU);
  constexpr int64_t kChunk = 1 << 14;
  double total = 0.0;
  for (const at::Tensor& g : grads) {
    const int64_t n = g.numel();
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<double> sums(chunks, 0.0);
    dispatch_adamw_dtype(g.scalar_type(), [&](auto t) {
      using T = decltype(t);
      const T* gp = g.data_ptr<T>();
      at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
        for (int64_t c = cb; c < ce; ++c) {
          double s = 0.0;
          for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) {
            const double x = static_cast<float>(gp[i]);
            s += x * x;
          }
          sums[c] = s;
        }
      });
    });
    for (double s : sums) total += s;
  }
  at::Tensor out = at::empty({}, grads[0].options().dtype(at::kFloat));
  out.fill_(std::sqrt(total));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("adamw_step", &adamw_step_cpu);
  m.impl("adamw_grad_norm", &adamw_grad_norm_cpu);
}

}  // namespace fastdl
