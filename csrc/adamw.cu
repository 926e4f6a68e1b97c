// CUDA kernels of the fused Adam/AdamW step and of the global grad norm.
//
// Multi-tensor apply: the host packs up to kMaxTensors tensors (pointers,
// sizes, chunk offsets) into a struct passed by value as a kernel argument, so
// one launch updates many tensors with no metadata copy to the device. Each
// tensor is cut into chunks of kChunk elements; a fixed grid of blocks walks
// the chunks of the launch (block b takes chunks b, b + grid, ...), so a few
// huge tensors and many tiny ones both fill the GPU. Every element of param,
// grad, exp_avg, exp_avg_sq (and max_exp_avg_sq, master) is read once and
// written once, in 4-element vectors when every pointer of the tensor allows.
//
// Nothing here reads device memory on the host: lr, grad_scale, found_inf and
// the grad norm are read by the kernels, so a step never syncs and can be
// captured in a CUDA graph.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "adamw.h"
#include "common/launch.cuh"
#include "common/vec.cuh"

namespace fastdl {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int64_t kChunk = 16384;
// The per-launch metadata must fit, with the scalar args, in the 4 KB of
// kernel parameters every CUDA version accepts.
constexpr int kMaxTensors = 48;
constexpr int kMaxNormTensors = 128;
constexpr int kMaxSteps = 480;

struct AdamwTensorList {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  void* exp_avg[kMaxTensors];
  void* exp_avg_sq[kMaxTensors];
  void* max_exp_avg_sq[kMaxTensors];  // nullptr without amsgrad
  float* master[kMaxTensors];         // nullptr without fp32 master weights
  const float* step[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t chunk_begin[kMaxTensors + 1];  // chunks of tensor t: [chunk_begin[t], chunk_begin[t + 1])
  uint32_t index[kMaxTensors];           // position in the op's lists: keys the rounding hash
  uint64_t vec_ok;                       // bit t: every pointer of tensor t is vector-aligned
  int count;
};
static_assert(sizeof(AdamwTensorList) + sizeof(AdamwArgs) <= 4096, "kernel params past 4 KB");

struct NormTensorList {
  const void* grad[kMaxNormTensors];
  int64_t numel[kMaxNormTensors];
  int64_t chunk_begin[kMaxNormTensors + 1];
  uint64_t vec_ok[kMaxNormTensors / 64];
  int count;
};
static_assert(sizeof(NormTensorList) + sizeof(float*) <= 4096, "kernel params past 4 KB");

struct StepList {
  float* step[kMaxSteps];
  int count;
};
static_assert(sizeof(StepList) + sizeof(float*) <= 4096, "kernel params past 4 KB");

// Elements [i, i + V) of one tensor; V = kVec needs aligned pointers and i % kVec == 0.
template <typename T, typename S, int V>
__device__ __forceinline__ void adamw_apply(T* p, const T* g, S* m, S* v, S* vmax, float* master,
                                            int64_t i, const AdamwCoeffs& k, bool sr, uint32_t key) {
  const Vec<T, V> gv = load_vec<T, V>(g + i);
  const Vec<S, V> mv = load_vec<S, V>(m + i);
  const Vec<S, V> vv = load_vec<S, V>(v + i);
  Vec<S, V> xv{};
  if (vmax) xv = load_vec<S, V>(vmax + i);
  Vec<float, V> pf;
  if (master) {
    pf = load_vec<float, V>(master + i);
  } else {
    const Vec<T, V> pv = load_vec<T, V>(p + i);
#pragma unroll
    for (int j = 0; j < V; ++j) pf.val[j] = static_cast<float>(pv.val[j]);
  }
  Vec<T, V> po;
  Vec<S, V> mo, vo, xo;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    float mj = static_cast<float>(mv.val[j]), vj = static_cast<float>(vv.val[j]);
    float xj = static_cast<float>(xv.val[j]);
    const float pj = adamw_update(pf.val[j], static_cast<float>(gv.val[j]), mj, vj,
                                  vmax ? &xj : nullptr, k);
    pf.val[j] = pj;
    po.val[j] = round_param<T>(pj, sr, key, i + j);
    mo.val[j] = static_cast<S>(mj);
    vo.val[j] = static_cast<S>(vj);
    xo.val[j] = static_cast<S>(xj);
  }
  store_vec<T, V>(p + i, po);
  store_vec<S, V>(m + i, mo);
  store_vec<S, V>(v + i, vo);
  if (vmax) store_vec<S, V>(vmax + i, xo);
  if (master) store_vec<float, V>(master + i, pf);
}

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads) adamw_step_kernel(const AdamwTensorList tl, const AdamwArgs a) {
  if (a.found_inf && *a.found_inf != 0.f) return;
  const double lr = a.lr_ptr ? *a.lr_ptr : a.lr;
  const float grad_mult = adamw_grad_mult(a);
  const int64_t total = tl.chunk_begin[tl.count];
  int t = 0;
  for (int64_t c = blockIdx.x; c < total; c += gridDim.x) {
    while (c >= tl.chunk_begin[t + 1]) ++t;
    const int64_t begin = (c - tl.chunk_begin[t]) * kChunk;
    const int64_t end = tl.numel[t] - begin < kChunk ? tl.numel[t] : begin + kChunk;
    const float step = *tl.step[t];
    const AdamwCoeffs k = adamw_coeffs(a, lr, grad_mult, step);
    const uint32_t key = sr_key(a.seed, tl.index[t], step);
    T* p = static_cast<T*>(tl.param[t]);
    const T* g = static_cast<const T*>(tl.grad[t]);
    S* m = static_cast<S*>(tl.exp_avg[t]);
    S* v = static_cast<S*>(tl.exp_avg_sq[t]);
    S* vmax = static_cast<S*>(tl.max_exp_avg_sq[t]);
    float* master = tl.master[t];
    int64_t i = begin + threadIdx.x;
    if ((tl.vec_ok >> t) & 1) {
      const int64_t vec_end = begin + (end - begin) / kVec * kVec;
      for (int64_t j = begin + threadIdx.x * kVec; j < vec_end; j += kThreads * kVec)
        adamw_apply<T, S, kVec>(p, g, m, v, vmax, master, j, k, a.stochastic_rounding, key);
      i = vec_end + threadIdx.x;
    }
    for (; i < end; i += kThreads)
      adamw_apply<T, S, 1>(p, g, m, v, vmax, master, i, k, a.stochastic_rounding, key);
  }
}

// Step counts advance before the update (the update reads them), except when
// GradScaler found inf/NaN: then nothing changes.
__global__ void adamw_step_count_kernel(const StepList l, const float* found_inf) {
  if (found_inf && *found_inf != 0.f) return;
  for (int i = threadIdx.x; i < l.count; i += blockDim.x) *l.step[i] += 1.f;
}

// Sum of squares: thread sums in fp32 within a chunk and in double across
// chunks; blocks reduce in a fixed tree and write one partial each, so the
// result does not depend on scheduling (no atomics).
template <typename T>
__global__ void __launch_bounds__(kThreads) grad_sumsq_kernel(const NormTensorList l, float* partial) {
  double acc = 0.0;
  const int64_t total = l.chunk_begin[l.count];
  int t = 0;
  for (int64_t c = blockIdx.x; c < total; c += gridDim.x) {
    while (c >= l.chunk_begin[t + 1]) ++t;
    const int64_t begin = (c - l.chunk_begin[t]) * kChunk;
    const int64_t end = l.numel[t] - begin < kChunk ? l.numel[t] : begin + kChunk;
    const T* g = static_cast<const T*>(l.grad[t]);
    float s = 0.f;
    int64_t i = begin + threadIdx.x;
    if ((l.vec_ok[t / 64] >> (t % 64)) & 1) {
      const int64_t vec_end = begin + (end - begin) / kVec * kVec;
      for (int64_t j = begin + threadIdx.x * kVec; j < vec_end; j += kThreads * kVec) {
        const Vec<T, kVec> x = load_vec<T, kVec>(g + j);
#pragma unroll
        for (int q = 0; q < kVec; ++q) s += static_cast<float>(x.val[q]) * static_cast<float>(x.val[q]);
      }
      i = vec_end + threadIdx.x;
    }
    for (; i < end; i += kThreads) s += static_cast<float>(g[i]) * static_cast<float>(g[i]);
    acc += s;
  }
  __shared__ double buf[kThreads];
  buf[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = float(buf[0]);
}

__global__ void __launch_bounds__(kThreads) grad_norm_finish_kernel(const float* partial, int64_t n, float* out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) acc += partial[i];
  __shared__ double buf[kThreads];
  buf[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = float(::sqrt(buf[0]));
}

const float* scalar_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

unsigned grid_of(int64_t chunks, int device) {
  return static_cast<unsigned>(std::min<int64_t>(chunks, int64_t(sm_count(device)) * (2048 / kThreads)));
}

// Indices of the list, grouped by `key` (stable: list order within a group).
template <typename K>
std::vector<std::vector<size_t>> group_by(size_t n, K&& key) {
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return key(x) < key(y); });
  std::vector<std::vector<size_t>> groups;
  for (size_t j = 0; j < n; ++j) {
    if (j == 0 || key(order[j]) != key(order[j - 1])) groups.emplace_back();
    groups.back().push_back(order[j]);
  }
  return groups;
}

template <typename T, typename S>
void launch_adamw(const std::vector<size_t>& idx, at::TensorList params, at::TensorList grads,
                  at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                  at::TensorList master_params, at::TensorList steps, const AdamwArgs& a,
                  cudaStream_t stream, int device) {
  AdamwTensorList tl;
  tl.count = 0;
  tl.vec_ok = 0;
  tl.chunk_begin[0] = 0;
  const auto flush = [&] {
    if (tl.count == 0) return;
    const int64_t chunks = tl.chunk_begin[tl.count];
    adamw_step_kernel<T, S><<<grid_of(chunks, device), kThreads, 0, stream>>>(tl, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    tl.count = 0;
    tl.vec_ok = 0;
  };
  for (size_t i : idx) {
    const int64_t n = params[i].numel();
    if (n == 0) continue;
    const int j = tl.count;
    tl.param[j] = params[i].data_ptr();
    tl.grad[j] = grads[i].data_ptr();
    tl.exp_avg[j] = exp_avgs[i].data_ptr();
    tl.exp_avg_sq[j] = exp_avg_sqs[i].data_ptr();
    tl.max_exp_avg_sq[j] = max_exp_avg_sqs.empty() ? nullptr : max_exp_avg_sqs[i].data_ptr();
    tl.master[j] = master_params.empty() ? nullptr : master_params[i].data_ptr<float>();
    tl.step[j] = steps[i].data_ptr<float>();
    tl.numel[j] = n;
    tl.chunk_begin[j + 1] = tl.chunk_begin[j] + chunks_of(n);
    tl.index[j] = uint32_t(i);
    const bool aligned = is_aligned(tl.param[j], kVec * sizeof(T)) &&
                         is_aligned(tl.grad[j], kVec * sizeof(T)) &&
                         is_aligned(tl.exp_avg[j], kVec * sizeof(S)) &&
                         is_aligned(tl.exp_avg_sq[j], kVec * sizeof(S)) &&
                         is_aligned(tl.max_exp_avg_sq[j], kVec * sizeof(S)) &&
                         is_aligned(tl.master[j], kVec * sizeof(float));
    tl.vec_ok |= uint64_t(aligned) << j;
    if (++tl.count == kMaxTensors) flush();
  }
  flush();
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList master_params, at::TensorList steps, double lr,
                     const c10::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                     double eps, double weight_decay, bool decoupled, bool maximize,
                     const c10::optional<at::Tensor>& grad_scale,
                     const c10::optional<at::Tensor>& found_inf,
                     const c10::optional<at::Tensor>& grad_norm, double max_grad_norm,
                     bool stochastic_rounding, int64_t seed) {
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps,
                   lr_tensor, grad_scale, found_inf, grad_norm, at::kCUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = params[0].get_device();
  const AdamwArgs a{lr, scalar_ptr(lr_tensor), beta1, beta2, float(eps), float(weight_decay),
                    decoupled, maximize, stochastic_rounding, scalar_ptr(grad_scale),
                    scalar_ptr(found_inf), scalar_ptr(grad_norm), float(max_grad_norm),
                    uint32_t(seed)};

  StepList sl;
  sl.count = 0;
  for (size_t i = 0; i < steps.size(); ++i) {
    sl.step[sl.count++] = steps[i].data_ptr<float>();
    if (sl.count == kMaxSteps || i + 1 == steps.size()) {
      adamw_step_count_kernel<<<1, 512, 0, stream>>>(sl, a.found_inf);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sl.count = 0;
    }
  }

  const auto dtypes = [&](size_t i) {
    return std::make_pair(int(params[i].scalar_type()), int(exp_avgs[i].scalar_type()));
  };
  for (const auto& idx : group_by(params.size(), dtypes)) {
    dispatch_param_state(params[idx[0]].scalar_type(), exp_avgs[idx[0]].scalar_type(), [&](auto t, auto s) {
      launch_adamw<decltype(t), decltype(s)>(idx, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                             master_params, steps, a, stream, device);
    });
  }
}

at::Tensor adamw_grad_norm_cuda(at::TensorList grads) {
  TORCH_CHECK(!grads.empty(), "fastdl: grads must not be empty");
  check_grad_norm_args(grads, at::kCUDA);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = grads[0].get_device();

  // Plan every launch first: the partials buffer holds one float per block.
  struct Launch {
    NormTensorList list;
    at::ScalarType dtype;
    unsigned grid;
  };
  std::vector<Launch> launches;
  int64_t partials = 0;
  const auto dtype_of = [&](size_t i) { return int(grads[i].scalar_type()); };
  for (const auto& idx : group_by(grads.size(), dtype_of)) {
    const at::ScalarType dtype = grads[idx[0]].scalar_type();
    Launch l{};
    l.dtype = dtype;
    const auto flush = [&] {
      if (l.list.count == 0) return;
      l.grid = grid_of(l.list.chunk_begin[l.list.count], device);
      partials += l.grid;
      launches.push_back(l);
      l.list = NormTensorList{};
    };
    for (size_t i : idx) {
      const int64_t n = grads[i].numel();
      if (n == 0) continue;
      NormTensorList& nl = l.list;
      const int j = nl.count++;
      nl.grad[j] = grads[i].data_ptr();
      nl.numel[j] = n;
      nl.chunk_begin[j + 1] = nl.chunk_begin[j] + chunks_of(n);
      nl.vec_ok[j / 64] |= uint64_t(is_aligned(nl.grad[j], kVec * grads[i].element_size())) << (j % 64);
      if (nl.count == kMaxNormTensors) flush();
    }
    flush();
  }
  const auto opts = grads[0].options().dtype(at::kFloat);
  if (partials == 0) return at::zeros({}, opts);
  at::Tensor partial = at::empty({partials}, opts);
  at::Tensor out = at::empty({}, opts);
  float* pp = partial.data_ptr<float>();
  for (const Launch& l : launches) {
    dispatch_adamw_dtype(l.dtype, [&](auto t) {
      grad_sumsq_kernel<decltype(t)><<<l.grid, kThreads, 0, stream>>>(l.list, pp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    pp += l.grid;
  }
  grad_norm_finish_kernel<<<1, kThreads, 0, stream>>>(partial.data_ptr<float>(), partials,
                                                      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("adamw_step", &adamw_step_cuda);
  m.impl("adamw_grad_norm", &adamw_grad_norm_cuda);
}

}  // namespace fastdl
