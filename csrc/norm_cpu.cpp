// CPU kernels for the LayerNorm / RMSNorm family (see norm.h for shapes).
//
// One row at a time, rows split across threads. Sums run over 16 interleaved
// lanes: the compiler vectorizes them, and each lane adds only cols/16 terms,
// so the fp32 rounding error of a 65536-wide row stays near that of a tree.
// dweight/dbias: a fixed number of row groups (independent of the thread
// count) each sum into their own fp32 row of a partial buffer, then the
// groups are added in order, so the result is bitwise the same every run.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>

#include "norm.h"

namespace fastdl {
namespace {

constexpr int kLanes = 16;
constexpr int64_t kGroups = 64;  // row groups of the dweight/dbias partial sums

// sum_{i < n} f(i), accumulated over kLanes interleaved lanes.
template <typename C, typename F>
C lane_sum(int64_t n, F&& f) {
  C acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += f(i + l);
  }
  for (int l = 0; i < n; ++i, ++l) acc[l] += f(i);
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0];
}

template <typename T, typename W>
void norm_fwd_kernel(const T* x, const T* res, const W* w, const W* b, T* y, T* res_out,
                     at::opmath_type<T>* mean, at::opmath_type<T>* rstd, int64_t rows,
                     int64_t cols, double eps, bool rms) {
  using C = at::opmath_type<T>;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t base = r * cols;
      const T* xr = x + base;
      if (res != nullptr) {
        // Normalize the rounded sum that is returned, so the backward (which
        // reads it back) differentiates exactly what the forward computed.
        for (int64_t i = 0; i < cols; ++i) {
          res_out[base + i] = static_cast<T>(static_cast<C>(xr[i]) + static_cast<C>(res[base + i]));
        }
        xr = res_out + base;
      }
      C mu = C(0);
      if (!rms) mu = lane_sum<C>(cols, [&](int64_t i) { return static_cast<C>(xr[i]); }) / C(cols);
      const C var = lane_sum<C>(cols, [&](int64_t i) {
                      const C d = static_cast<C>(xr[i]) - mu;
                      return d * d;
                    }) / C(cols);
      const C rs = C(1) / std::sqrt(var + static_cast<C>(eps));
      if (!rms) mean[r] = mu;
      rstd[r] = rs;
      T* yr = y + base;
      for (int64_t i = 0; i < cols; ++i) {
        C v = (static_cast<C>(xr[i]) - mu) * rs;
        if (w != nullptr) v *= static_cast<C>(w[i]);
        if (b != nullptr) v += static_cast<C>(b[i]);
        yr[i] = static_cast<T>(v);
      }
    }
  });
}

// With xhat = (x - mean) * rstd (mean = 0 for RMS), y = xhat * w + b and
// gw = g * w, the gradient of one row of n values is
//   dx = rstd * (gw - mean_i(gw) - xhat * mean_i(gw * xhat))
// (the mean_i(gw) term only for LayerNorm, whose xhat subtracts the mean), and
// dw = sum_rows g * xhat, db = sum_rows g.
template <typename T, typename W>
void norm_bwd_kernel(const T* g, const T* gres, const T* x, const W* w,
                     const at::opmath_type<T>* mean, const at::opmath_type<T>* rstd, T* dx,
                     at::opmath_type<T>* part_w, at::opmath_type<T>* part_b, int64_t rows,
                     int64_t cols, int64_t groups, bool rms) {
  using C = at::opmath_type<T>;
  at::parallel_for(0, groups, 1, [&](int64_t gbegin, int64_t gend) {
    for (int64_t grp = gbegin; grp < gend; ++grp) {
      C* pw = part_w ? part_w + grp * cols : nullptr;
      C* pb = part_b ? part_b + grp * cols : nullptr;
      for (int64_t r = grp * rows / groups; r < (grp + 1) * rows / groups; ++r) {
        const int64_t base = r * cols;
        const T *gr = g + base, *xr = x + base;
        const C mu = rms ? C(0) : mean[r], rs = rstd[r];
        auto xhat = [&](int64_t i) { return (static_cast<C>(xr[i]) - mu) * rs; };
        auto gw = [&](int64_t i) {
          return w ? static_cast<C>(gr[i]) * static_cast<C>(w[i]) : static_cast<C>(gr[i]);
        };
        const C c1 = rms ? C(0) : lane_sum<C>(cols, gw) / C(cols);
        const C c2 = lane_sum<C>(cols, [&](int64_t i) { return gw(i) * xhat(i); }) / C(cols);
        for (int64_t i = 0; i < cols; ++i) {
          const C xh = xhat(i);
          C d = rs * (gw(i) - c1 - xh * c2);
          if (gres != nullptr) d += static_cast<C>(gres[base + i]);
          dx[base + i] = static_cast<T>(d);
          if (pw) pw[i] += static_cast<C>(gr[i]) * xh;
          if (pb) pb[i] += static_cast<C>(gr[i]);
        }
      }
    }
  });
}

// out[i] = sum over groups of part[grp, i], groups in order.
template <typename C>
at::Tensor sum_groups(const at::Tensor& part, const at::Tensor& like) {
  const int64_t groups = part.size(0), cols = part.size(1);
  at::Tensor acc = at::empty({cols}, part.options());
  const C* p = part.data_ptr<C>();
  C* a = acc.data_ptr<C>();
  at::parallel_for(0, cols, 1 << 12, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      C s = C(0);
      for (int64_t grp = 0; grp < groups; ++grp) s += p[grp * cols + i];
      a[i] = s;
    }
  });
  return acc.to(like.scalar_type()).view(like.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef normalized_shape, double eps, bool rms) {
  FASTDL_CHECK_DEVICE_TYPE(input, at::kCPU);
  FASTDL_CHECK_FLOATING(input);
  const NormDims d = check_norm_fwd_args(input, residual, weight, bias, normalized_shape);
  const at::Tensor x = input.contiguous();
  const auto stat_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto stat_opts = x.options().dtype(stat_type);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor res_out = residual ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor mean = rms ? at::empty({0}, stat_opts) : at::zeros(d.stat_shape, stat_opts);
  at::Tensor rstd = at::zeros(d.stat_shape, stat_opts);
  if (x.numel() == 0) return {out, res_out, mean, rstd};
  const at::Tensor r = residual ? residual->contiguous() : at::Tensor();
  const at::Tensor w = weight ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const auto wtype = norm_param_dtype(x, weight, bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    using C = at::opmath_type<scalar_t>;
    auto run = [&](auto wtag) {
      using W = decltype(wtag);
      norm_fwd_kernel<scalar_t, W>(
          x.data_ptr<scalar_t>(), r.defined() ? r.data_ptr<scalar_t>() : nullptr,
          w.defined() ? w.data_ptr<W>() : nullptr, b.defined() ? b.data_ptr<W>() : nullptr,
          out.data_ptr<scalar_t>(), r.defined() ? res_out.data_ptr<scalar_t>() : nullptr,
          rms ? nullptr : mean.data_ptr<C>(), rstd.data_ptr<C>(), d.rows, d.cols, eps, rms);
    };
    if (wtype == x.scalar_type()) {
      run(scalar_t{});
    } else {
      run(float{});
    }
  });
  return {out, res_out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_residual,
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
    bool rms, std::array<bool, 2> grad_mask) {
  FASTDL_CHECK_DEVICE_TYPE(x, at::kCPU);
  FASTDL_CHECK_FLOATING(x);
  const NormDims d = check_norm_bwd_args(grad_out, grad_residual, x, weight, bias, mean, rstd, rms);
  const at::Tensor xc = x.contiguous();
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor gres = grad_residual ? grad_residual->contiguous() : at::Tensor();
  const at::Tensor w = weight ? weight->contiguous() : at::Tensor();
  const at::Tensor mu = rms ? at::Tensor() : mean.contiguous();
  const at::Tensor rs = rstd.contiguous();
  const bool need_dw = grad_mask[0] && weight.has_value();
  const bool need_db = grad_mask[1] && bias.has_value();
  const auto stat_type = xc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t groups = std::max<int64_t>(1, std::min(d.rows, kGroups));
  at::Tensor dx = at::empty(xc.sizes(), xc.options());
  at::Tensor part_w = need_dw ? at::zeros({groups, d.cols}, xc.options().dtype(stat_type)) : at::Tensor();
  at::Tensor part_b = need_db ? at::zeros({groups, d.cols}, xc.options().dtype(stat_type)) : at::Tensor();
  const auto wtype = norm_param_dtype(xc, weight, bias);
  if (xc.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "layer_norm_bwd_cpu", [&] {
      using C = at::opmath_type<scalar_t>;
      auto run = [&](auto wtag) {
        using W = decltype(wtag);
        norm_bwd_kernel<scalar_t, W>(
            g.data_ptr<scalar_t>(), gres.defined() ? gres.data_ptr<scalar_t>() : nullptr,
            xc.data_ptr<scalar_t>(), w.defined() ? w.data_ptr<W>() : nullptr,
            rms ? nullptr : mu.data_ptr<C>(), rs.data_ptr<C>(), dx.data_ptr<scalar_t>(),
            need_dw ? part_w.data_ptr<C>() : nullptr, need_db ? part_b.data_ptr<C>() : nullptr,
            d.rows, d.cols, groups, rms);
      };
      if (wtype == xc.scalar_type()) {
        run(scalar_t{});
      } else {
        run(float{});
      }
    });
  }
  at::Tensor dw = at::empty({0}, xc.options().dtype(wtype));
  at::Tensor db = at::empty({0}, xc.options().dtype(wtype));
  if (need_dw || need_db) {
    AT_DISPATCH_FLOATING_TYPES(stat_type, "layer_norm_bwd_cpu_sum", [&] {
      if (need_dw) dw = sum_groups<scalar_t>(part_w, *weight);
      if (need_db) db = sum_groups<scalar_t>(part_b, *bias);
    });
  }
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace fastdl
