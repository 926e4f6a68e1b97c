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
}
