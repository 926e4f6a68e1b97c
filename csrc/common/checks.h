// Argument checks shared by every op. Each message names the argument and
// states what was expected, so a bad call reads like a Python error.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define FASTDL_CHECK_FLOAT(t)                                                      \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf || \
                  (t).scalar_type() == at::kBFloat16,                              \
              "fastdl: ", #t, " must be float32, float16 or bfloat16, got ", (t).scalar_type())

// FASTDL_CHECK_FLOAT plus float64, for ops whose kernels also run in double
// (used by gradcheck on the CPU path).
#define FASTDL_CHECK_FLOATING(t)                                                     \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||   \
                  (t).scalar_type() == at::kBFloat16 || (t).scalar_type() == at::kDouble, \
              "fastdl: ", #t, " must be float32, float16, bfloat16 or float64, got ",  \
              (t).scalar_type())

#define FASTDL_CHECK_SAME_DEVICE(a, b)                                               \
  TORCH_CHECK((a).device() == (b).device(), "fastdl: ", #a, " and ", #b,            \
              " must be on the same device, got ", (a).device(), " and ", (b).device())

#define FASTDL_CHECK_SAME_SHAPE(a, b)                                                 \
  TORCH_CHECK((a).sizes() == (b).sizes(), "fastdl: ", #a, " must have the shape of ", \
              #b, " ", (b).sizes(), ", got ", (a).sizes())

#define FASTDL_CHECK_SAME_DTYPE(a, b)                                                 \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), "fastdl: ", #a,                  \
              " must have the dtype of ", #b, " (", (b).scalar_type(), "), got ",      \
              (a).scalar_type())

#define FASTDL_CHECK_DEVICE_TYPE(t, devtype)                                            \
  TORCH_CHECK((t).device().type() == (devtype), "fastdl: ", #t, " must be a ", (devtype),  \
              " tensor, got ", (t).device())
