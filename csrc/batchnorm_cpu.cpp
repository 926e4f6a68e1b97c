// CPU kernels for the BatchNorm family: plain loops over (N, C, S), channels
// split across threads by at::parallel_for, per-channel sums in double. They
// are the reference-speed path for CPU tensors and the float64 path gradcheck
// uses; the same math as batchnorm.cu.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "batchnorm.h"

namespace fastdl {
namespace {

// Element (n, c, s) lives at n * sn + c * sc + s * ss.
struct Strides {
  int64_t sn, sc, ss;
};

Strides bn_strides(const BnShape& sh, bool channels_last) {
  return channels_last ? Strides{sh.s * sh.c, 1, sh.c} : Strides{sh.c * sh.s, sh.s, 1};
}

template <typename F>
void parallel_over_channels(const BnShape& sh, F&& f) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, sh.rows()));
  at::parallel_for(0, sh.c, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) f(c);
  });
}

// Calls f(offset) for every element of channel c.
template <typename F>
void for_channel(const BnShape& sh, const Strides& st, int64_t c, F&& f) {
  for (int64_t n = 0; n < sh.n; ++n)
    for (int64_t s = 0; s < sh.s; ++s) f(n * st.sn + c * st.sc + s * st.ss);
}

// Checks of the per-channel affine (mean, scale, shift) and the optional
// residual shared by the elementwise ops; returns them ready to index.
struct Affine {
  at::Tensor mean, scale, shift;
};

Affine check_affine(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
                    const at::Tensor& shift, const c10::optional<at::Tensor>& residual) {
  FASTDL_CHECK_DEVICE_TYPE(input, at::kCPU);
  check_bn_input(input);
  check_bn_param(mean, "mean", input);
  check_bn_param(scale, "scale", input);
  check_bn_param(shift, "shift", input);
  if (residual) check_like_input(*residual, "residual", input);
  return {mean.contiguous(), scale.contiguous(), shift.contiguous()};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& input) {
  FASTDL_CHECK_DEVICE_TYPE(input, at::kCPU);
  check_bn_input(input);
  const bool cl = is_channels_last_dense(input);
  const at::Tensor x = in_layout(input, cl);
  const BnShape sh = bn_shape(x);
  const Strides st = bn_strides(sh, cl);
  const auto opts = x.options().dtype(bn_stat_dtype(x));
  at::Tensor mean = at::empty({sh.c}, opts), var = at::empty({sh.c}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_stats_cpu", [&] {
    using C = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    C* mp = mean.data_ptr<C>();
    C* vp = var.data_ptr<C>();
    parallel_over_channels(sh, [&](int64_t c) {
      // Welford: no cancellation however large the mean is against the spread.
      double m = 0, m2 = 0;
      int64_t k = 0;
      for_channel(sh, st, c, [&](int64_t off) {
        const double v = static_cast<double>(xp[off]);
        const double d = v - m;
        m += d / double(++k);
        m2 += d * (v - m);
      });
      mp[c] = static_cast<C>(k ? m : std::numeric_limits<double>::quiet_NaN());
      vp[c] = static_cast<C>(k ? m2 / double(k) : std::numeric_limits<double>::quiet_NaN());
    });
  });
  return {mean, var};
}

at::Tensor batch_norm_fwd_cpu(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
                              const at::Tensor& shift, const c10::optional<at::Tensor>& residual,
                              c10::string_view act, double negative_slope) {
  const Affine p = check_affine(input, mean, scale, shift, residual);
  const bool cl = is_channels_last_dense(input);
  const at::Tensor x = in_layout(input, cl);
  const at::Tensor res = residual ? in_layout(*residual, cl) : at::Tensor();
  at::Tensor out = at::empty_like(x);
  const BnShape sh = bn_shape(x);
  const Strides st = bn_strides(sh, cl);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_fwd_cpu", [&] {
    using C = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = out.data_ptr<scalar_t>();
    const C *mp = p.mean.data_ptr<C>(), *kp = p.scale.data_ptr<C>(), *bp = p.shift.data_ptr<C>();
    const C slope = static_cast<C>(negative_slope);
    dispatch_bn_act(std::string(act), [&](auto op) {
      using Op = decltype(op);
      parallel_over_channels(sh, [&](int64_t c) {
        for_channel(sh, st, c, [&](int64_t off) {
          C z = (static_cast<C>(xp[off]) - mp[c]) * kp[c] + bp[c];
          if (rp) z += static_cast<C>(rp[off]);
          yp[off] = static_cast<scalar_t>(Op::fwd(z, slope));
        });
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_reduce_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, const c10::optional<at::Tensor>& residual, c10::string_view act,
    double negative_slope, bool write_dz) {
  const Affine p = check_affine(input, mean, scale, shift, residual);
  check_like_input(grad_out, "grad_out", input);
  const bool cl = is_channels_last_dense(input);
  const at::Tensor x = in_layout(input, cl);
  const at::Tensor g = in_layout(grad_out, cl);
  const at::Tensor res = residual ? in_layout(*residual, cl) : at::Tensor();
  at::Tensor dz = write_dz ? at::empty_like(x) : at::empty({0}, x.options());
  const BnShape sh = bn_shape(x);
  const Strides st = bn_strides(sh, cl);
  const auto opts = x.options().dtype(bn_stat_dtype(x));
  at::Tensor sum_dz = at::empty({sh.c}, opts), sum_dz_xmu = at::empty({sh.c}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_bwd_reduce_cpu", [&] {
    using C = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.data_ptr<scalar_t>() : nullptr;
    scalar_t* dzp = write_dz ? dz.data_ptr<scalar_t>() : nullptr;
    const C *mp = p.mean.data_ptr<C>(), *kp = p.scale.data_ptr<C>(), *bp = p.shift.data_ptr<C>();
    C* s1p = sum_dz.data_ptr<C>();
    C* s2p = sum_dz_xmu.data_ptr<C>();
    const C slope = static_cast<C>(negative_slope);
    dispatch_bn_act(std::string(act), [&](auto op) {
      using Op = decltype(op);
      parallel_over_channels(sh, [&](int64_t c) {
        double s1 = 0, s2 = 0;
        for_channel(sh, st, c, [&](int64_t off) {
          const C xmu = static_cast<C>(xp[off]) - mp[c];
          C z = xmu * kp[c] + bp[c];
          if (rp) z += static_cast<C>(rp[off]);
          const C d = static_cast<C>(gp[off]) * Op::grad(z, slope);
          if (dzp) dzp[off] = static_cast<scalar_t>(d);
          s1 += d;
          s2 += d * xmu;
        });
        s1p[c] = static_cast<C>(s1);
        s2p[c] = static_cast<C>(s2);
      });
    });
  });
  return {sum_dz, sum_dz_xmu, dz};
}

at::Tensor batch_norm_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                              const at::Tensor& scale, const at::Tensor& shift,
                              const c10::optional<at::Tensor>& residual, const at::Tensor& coef_xmu,
                              const at::Tensor& coef_const, c10::string_view act, double negative_slope) {
  const Affine p = check_affine(input, mean, scale, shift, residual);
  check_like_input(grad_out, "grad_out", input);
  check_bn_param(coef_xmu, "coef_xmu", input);
  check_bn_param(coef_const, "coef_const", input);
  const bool cl = is_channels_last_dense(input);
  const at::Tensor x = in_layout(input, cl);
  const at::Tensor g = in_layout(grad_out, cl);
  const at::Tensor res = residual ? in_layout(*residual, cl) : at::Tensor();
  const at::Tensor kx = coef_xmu.contiguous(), k0 = coef_const.contiguous();
  at::Tensor dx = at::empty_like(x);
  const BnShape sh = bn_shape(x);
  const Strides st = bn_strides(sh, cl);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_bwd_cpu", [&] {
    using C = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.data_ptr<scalar_t>() : nullptr;
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const C *mp = p.mean.data_ptr<C>(), *kp = p.scale.data_ptr<C>(), *bp = p.shift.data_ptr<C>();
    const C *kxp = kx.data_ptr<C>(), *k0p = k0.data_ptr<C>();
    const C slope = static_cast<C>(negative_slope);
    dispatch_bn_act(std::string(act), [&](auto op) {
      using Op = decltype(op);
      parallel_over_channels(sh, [&](int64_t c) {
        for_channel(sh, st, c, [&](int64_t off) {
          const C xmu = static_cast<C>(xp[off]) - mp[c];
          C z = xmu * kp[c] + bp[c];
          if (rp) z += static_cast<C>(rp[off]);
          const C d = static_cast<C>(gp[off]) * Op::grad(z, slope);
          dxp[off] = static_cast<scalar_t>(d * kp[c] + kxp[c] * xmu + k0p[c]);
        });
      });
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_fwd", &batch_norm_fwd_cpu);
  m.impl("batch_norm_bwd_reduce", &batch_norm_bwd_reduce_cpu);
  m.impl("batch_norm_bwd", &batch_norm_bwd_cpu);
}

}  // namespace fastdl
