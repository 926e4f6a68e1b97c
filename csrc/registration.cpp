// Every fastdl op schema, in one place: this file is the list of ops.
// Implementations register per dispatch key in csrc/<op>.cu (CUDA) and
// csrc/<op>_cpu.cpp (CPU).
// Triton kernels are registered from Python as fastdl::<op>_triton ops.
#include <Python.h>
#include <torch/library.h>

#ifndef FASTDL_CUDA_ARCHS
#define FASTDL_CUDA_ARCHS "none"
#endif
#ifndef FASTDL_WITH_CUDA
#define FASTDL_WITH_CUDA 0
#endif

// A bare Python module: importing fastdl._C loads this library, which runs
// the registrations below. Build facts are exposed for fastdl.info().
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "fastdl compiled ops", -1, nullptr};
  PyObject* m = PyModule_Create(&def);
  if (m == nullptr) return nullptr;
  PyModule_AddIntConstant(m, "with_cuda", FASTDL_WITH_CUDA);
  PyModule_AddStringConstant(m, "cuda_archs", FASTDL_CUDA_ARCHS);
  return m;
}

TORCH_LIBRARY(fastdl, m) {
  // Fake kernels and autograd formulas: fastdl/_ops/<op>.py (imported by fastdl).

  // activation: y = act(x + bias); bias broadcasts over the last dim.
  m.def("bias_act_fwd(Tensor input, Tensor? bias, str act, float negative_slope) -> Tensor");
  m.def("bias_act_bwd(Tensor grad_out, Tensor input, Tensor? bias, str act, "
        "float negative_slope) -> Tensor");
  // activation, gated: a, b = input.chunk(2, -1); y = act(a) * b.
  m.def("glu_fwd(Tensor input, str act, float negative_slope) -> Tensor");
  m.def("glu_bwd(Tensor grad_out, Tensor input, str act, float negative_slope) -> Tensor");

  // adamw: one fused Adam (decoupled=False) / AdamW step over lists of tensors,
  // in place. Per param: grad, exp_avg, exp_avg_sq, step (+ max_exp_avg_sq with
  // amsgrad, + fp32 master copy); the empty list means "none" for those two.
  // lr_tensor overrides lr; grad_scale/found_inf come from GradScaler; with
  // grad_norm, grads are clipped to max_grad_norm inside the update.
  m.def("adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, "
        "Tensor(f!)[] steps, float lr, Tensor? lr_tensor, float beta1, float beta2, float eps, "
        "float weight_decay, bool decoupled, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
        "Tensor? grad_norm, float max_grad_norm, bool stochastic_rounding, int seed) -> ()");
  // adamw: global L2 norm of a list of grads (fp32 scalar), deterministic.
  m.def("adamw_grad_norm(Tensor[] grads) -> Tensor");

  // attention (flash, CUDA only): q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D), causal bottom-right.
  m.def("flash_attn_fwd(Tensor q, Tensor k, Tensor v, float scale, bool causal) "
        "-> (Tensor out, Tensor lse)");
  m.def("flash_attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale, bool causal) -> (Tensor dq, Tensor dk, Tensor dv)");

  // norm: LayerNorm (rms=False) or RMSNorm (rms=True) over normalized_shape,
  // optionally of input + residual (then also returned, else an empty tensor).
  // mean (empty when rms) and rstd: fp32 (fp64 for fp64 input), leading shape.
  m.def("layer_norm_fwd(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, "
        "int[] normalized_shape, float eps, bool rms) -> (Tensor, Tensor, Tensor, Tensor)");
  // x: what the forward normalized (input, or its returned input + residual).
  // grad_residual (of that returned sum) is added into dx. Returns dx and,
  // per grad_mask, dweight and dbias (else empty tensors).
  m.def("layer_norm_bwd(Tensor grad_out, Tensor? grad_residual, Tensor x, Tensor? weight, "
        "Tensor? bias, Tensor mean, Tensor rstd, bool rms, bool[2] grad_mask) "
        "-> (Tensor, Tensor, Tensor)");

  // batchnorm: channel = dim 1; per-channel tensors (mean, scale, ...) are fp32
  // (fp64 for fp64 input). Outputs take input's layout (channels_last or
  // contiguous; see csrc/batchnorm.h). z = (input - mean) * scale + shift
  // [+ residual], y = act(z), act "none" or a bias_act name.
  // Per-channel mean and biased variance (Welford).
  m.def("batch_norm_stats(Tensor input) -> (Tensor, Tensor)");
  m.def("batch_norm_fwd(Tensor input, Tensor mean, Tensor scale, Tensor shift, Tensor? residual, "
        "str act, float negative_slope) -> Tensor");
  // dz = grad_out * act'(z). Returns per-channel sum(dz), sum(dz * (input - mean))
  // and, when write_dz, dz itself (else an empty tensor).
  m.def("batch_norm_bwd_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor scale, "
        "Tensor shift, Tensor? residual, str act, float negative_slope, bool write_dz) "
        "-> (Tensor, Tensor, Tensor)");
  // grad_input = dz * scale + coef_xmu * (input - mean) + coef_const.
  m.def("batch_norm_bwd(Tensor grad_out, Tensor input, Tensor mean, Tensor scale, Tensor shift, "
        "Tensor? residual, Tensor coef_xmu, Tensor coef_const, str act, float negative_slope) "
        "-> Tensor");
}
