// CUDA flash attention, forward and backward, with tensor-core MMA (sm_80+).
//
// Contract (fastdl::flash_attn_fwd / flash_attn_bwd, schemas in registration.cpp):
//   q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D), fp16 or bf16, D in {64, 128},
//   Hq % Hkv == 0 (q head h reads kv head h / (Hq / Hkv)); the last dim must be
//   contiguous, other strides are free. Causal masks align bottom-right: query i
//   sees keys j <= i + Nk - Nq; a query that sees no key gets out = 0 and
//   lse = -inf. lse is the fp32 natural-log log-sum-exp of the scaled scores.
//
// Design (FlashAttention-2):
// * A CTA is 4 warps. The forward and dQ kernels give a CTA kBlockM = 64 query
//   rows of one (batch, q head), 16 per warp, and stream the keys and values of
//   its kv head through shared memory in tiles of kBlockN = 64, double-buffered
//   with cp.async so the next tile loads while the current one is multiplied.
// * Products use mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate). Operands
//   come from shared memory through ldmatrix, except probabilities and dS,
//   which go from the accumulator layout to the A-operand layout in registers
//   (the layouts line up; see "Fragment layouts").
// * Shared tiles are row-major [rows][D] with the 16-byte chunks of row r
//   XOR-swizzled by r % 8, so the 8 row addresses of one ldmatrix matrix (and 8
//   consecutive cp.async chunks) fall in 8 different bank groups.
// * Softmax runs in the log2 domain: s = (q . k) * scale * log2(e), exp2f, running
//   row max m and sum l in fp32; lse = (m + log2 l) * ln 2. The scale multiplies
//   before the max, so a negative scale is still exact.
// * Causal: key tiles entirely after a query tile's last visible key are never
//   loaded; the mask is evaluated only on tiles that cross the diagonal or the
//   end of the key sequence.
//
// Backward. With S = scale Q K^T, P = softmax(S) row-wise and O = P V:
//   dV = P^T dO,  dP = dO V^T,
//   dS_ij = P_ij (dP_ij - delta_i),  delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id
//   (the softmax Jacobian; the second form needs no P), dQ = scale dS K,
//   dK = scale dS^T Q. P is recomputed from q, k and the saved lse.
// * preprocess: delta = rowsum(dO * O) in fp32, and lse in log2 units with -inf
//   replaced by +inf, so rows that saw no key give P = exp2(s - inf) = 0.
// * dK/dV kernel: a CTA owns 64 keys of one kv head, 16 per warp, and loops
//   over every q head of its GQA group and every query tile that can see its
//   keys (double-buffered Q, dO), accumulating dK and dV in registers. The sum
//   over the group's heads happens in that loop: no atomics.
// * dQ kernel: a separate pass shaped like the forward (64 query rows per CTA,
//   loop over key tiles) that recomputes P and dP and accumulates dQ = dS K in
//   registers. The alternative, fp32 atomicAdd of dS K into a dq_accum buffer
//   from the dK/dV kernel plus a conversion kernel, saves recomputing S and dP
//   (5 instead of 7 matrix products per tile pair), but its float atomics make
//   dQ nondeterministic and it needs an extra fp32 (B, Hq, Nq, D) buffer. This
//   pass gives bitwise reproducible gradients, which deterministic=True needs.
// * Registers (ptxas, sm_80/sm_90a): forward 133-222, dQ 168-250, dK/dV D=64
//   ~225; dK/dV D=128 hits the 255 cap with ~60 bytes of spills (its fp32
//   dK, dV, S^T and dP^T tiles alone take 192). A 32-row query tile there is
//   the first thing to try when tuning.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/launch.cuh"
#include "common/vec.cuh"

namespace fastdl {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kBlockM = 64;    // query rows per tile, 16 per warp
constexpr int kBlockN = 64;    // keys per tile (16 per warp in the dK/dV kernel)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------
// MMA, ldmatrix and cp.async helpers
// ---------------------------------------------------------------------------
//
// Fragment layouts. lane = 4 g + t with g = lane / 4 in [0, 8), t = lane % 4.
// mma.sync.aligned.m16n8k16 (PTX ISA), each b32 register holds 2 elements,
// the lower column (or lower k) in the low 16 bits:
//   A (16 x 16, m x k):  a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//                        a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B (16 x 8,  k x n):  b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   C (16 x 8,  m x n, fp32): c[0], c[1] = C[g][2t, 2t+1]
//                             c[2], c[3] = C[g+8][2t, 2t+1]
// ldmatrix.x4: lanes 8i .. 8i+7 give the addresses of the 8 rows (16 bytes
// each) of 8x8 matrix i; register i of every lane receives matrix i's
// elements [g][2t, 2t+1], or with .trans [2t, 2t+1][g].
// Hence, for tiles stored row-major in shared memory:
// * ldsm_a: an A operand (16 rows x 16 k) is matrices (rows 0-7, k 0-7),
//   (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) -> a[0..3].
// * ldsm_b: for B = X^T with X stored [n][k] (K in Q K^T), b[0] of an n-tile is
//   the non-transposed matrix (its 8 rows, k 0-7) and b[1] is (its 8 rows,
//   k 8-15). One x4 load covers two n-tiles: rows 0-7 -> regs 0, 1; rows 8-15
//   -> regs 2, 3.
// * ldsm_bt: for B = X with X stored [k][n] (V in P V), b[0] is the transposed
//   matrix (k 0-7, the tile's 8 columns) and b[1] is (k 8-15, same columns).
//   One x4 load covers two n-tiles: columns 0-7 -> regs 0, 1; 8-15 -> regs 2, 3.
// * pack_a: C tiles 2j and 2j+1 (16 rows x 16 columns) hold exactly the A
//   fragment of k-slice j: tile 2j gives a[0] = (c0, c1), a[1] = (c2, c3), tile
//   2j+1 gives a[2], a[3]. So P and dS feed the next product without shared
//   memory.

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Element offset of (row, col) in a swizzled [rows][D] tile. Chunks of 8
// elements (16 bytes) stay contiguous; D / 8 >= 8, so the XOR stays in the row.
template <int D>
__device__ __forceinline__ int swz(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// 16-byte global -> shared copy; with !valid the 16 bytes are zero-filled and
// nothing is read (src-size 0).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)),
               "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// No "memory" clobber, as in CUTLASS: every shared-memory write that an
// ldmatrix must see, or must not overtake, is separated from it by a
// __syncthreads, which also orders the compiler.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

// c += A B for one 16x8 tile.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two fp32 values as one b32 register of T, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// A fragment of rows [row0, row0 + 16) x columns [col0, col0 + 16).
template <int D, typename T>
__device__ __forceinline__ void ldsm_a(uint32_t (&a)[4], const T* tile, int row0, int col0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(a, tile + swz<D>(row0 + (lane & 15), col0 + ((lane >> 4) << 3)));
}

// B fragments of two n-tiles from X stored [n][k]: n rows [row0, row0 + 16),
// k columns [col0, col0 + 16). b[0], b[1]: n-tile row0; b[2], b[3]: row0 + 8.
template <int D, typename T>
__device__ __forceinline__ void ldsm_b(uint32_t (&b)[4], const T* tile, int row0, int col0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(b, tile + swz<D>(row0 + ((lane >> 4) << 3) + (lane & 7),
                               col0 + (((lane >> 3) & 1) << 3)));
}

// B fragments of two n-tiles from X stored [k][n]: k rows [row0, row0 + 16),
// n columns [col0, col0 + 16). b[0], b[1]: n-tile col0; b[2], b[3]: col0 + 8.
template <int D, typename T>
__device__ __forceinline__ void ldsm_bt(uint32_t (&b)[4], const T* tile, int row0, int col0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4_trans(b, tile + swz<D>(row0 + (lane & 15), col0 + ((lane >> 4) << 3)));
}

// A fragment of k-slice j from the fp32 accumulator tiles acc[2j], acc[2j+1].
template <typename T>
__device__ __forceinline__ void pack_a(uint32_t (&a)[4], const float (&lo)[4],
                                       const float (&hi)[4]) {
  a[0] = pack2<T>(lo[0], lo[1]);
  a[1] = pack2<T>(lo[2], lo[3]);
  a[2] = pack2<T>(hi[0], hi[1]);
  a[3] = pack2<T>(hi[2], hi[3]);
}

// acc (16 x 16 NT columns, C layout) += A (16 x 16 KT, from smem rows
// [a_row0, +16) of a_tile) times X^T, X stored [n][k] in b_tile: the
// Q K^T-shaped product.
template <int D, int NT, typename T>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const T* a_tile, int a_row0,
                                        const T* b_tile) {
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[4];
    ldsm_a<D>(a, a_tile, a_row0, ks * 16);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      ldsm_b<D>(b, b_tile, np * 16, ks * 16);
      mma_16816<T>(acc[2 * np], a, b[0], b[1]);
      mma_16816<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x D, C layout) += M X, with M (16 x 16 KT) given as fp32 accumulator
// tiles and X stored [k][D] in b_tile: the P V-shaped product.
template <int D, int KT, typename T>
__device__ __forceinline__ void mma_cb(float (&acc)[D / 8][4], const float (&m)[2 * KT][4],
                                       const T* b_tile) {
#pragma unroll
  for (int kt = 0; kt < KT; ++kt) {
    uint32_t a[4];
    pack_a<T>(a, m[2 * kt], m[2 * kt + 1]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];
      ldsm_bt<D>(b, b_tile, kt * 16, dp * 16);
      mma_16816<T>(acc[2 * dp], a, b[0], b[1]);
      mma_16816<T>(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// Copies rows [0, rows_valid) of a [ROWS][D] global tile (row stride
// `stride`, elements) into a swizzled shared tile; rows past rows_valid are
// zero-filled, so padding never feeds NaN or Inf into a product.
template <int ROWS, int D, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t stride, int rows_valid) {
  constexpr int kChunksPerRow = D / 8;
  static_assert((ROWS * kChunksPerRow) % kThreads == 0, "tile must split evenly over the CTA");
#pragma unroll
  for (int c = threadIdx.x; c < ROWS * kChunksPerRow; c += kThreads) {
    const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const bool valid = row < rows_valid;
    cp_async_16(smem + swz<D>(row, col), gmem + (valid ? row * stride + col : 0), valid);
  }
}

// Writes rows [0, rows_valid) of a swizzled shared tile to a contiguous
// [ROWS][D] global tile, 16 bytes per thread and step.
template <int ROWS, int D, typename T>
__device__ __forceinline__ void store_tile(T* gmem, const T* smem, int rows_valid) {
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int c = threadIdx.x; c < ROWS * kChunksPerRow; c += kThreads) {
    const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    if (row < rows_valid)
      *reinterpret_cast<uint4*>(gmem + int64_t(row) * D + col) =
          *reinterpret_cast<const uint4*>(smem + swz<D>(row, col));
  }
}

// Stores a warp's 16 x D accumulator, times `mul[r]` for row g + 8 r, as T
// into rows [row0, row0 + 16) of a swizzled shared tile.
template <int D, typename T>
__device__ __forceinline__ void stage_acc(T* tile, int row0, const float (&acc)[D / 8][4],
                                          float mul0, float mul1) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    *reinterpret_cast<uint32_t*>(tile + swz<D>(row0 + g, dt * 8 + 2 * t)) =
        pack2<T>(acc[dt][0] * mul0, acc[dt][1] * mul0);
    *reinterpret_cast<uint32_t*>(tile + swz<D>(row0 + g + 8, dt * 8 + 2 * t)) =
        pack2<T>(acc[dt][2] * mul1, acc[dt][3] * mul1);
  }
}

// The 4 lanes of a quad (same g) hold one accumulator row between them.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------

// A (B, H, N, D) tensor with a contiguous last dim. int64 strides: batch and
// head offsets pass 2^31 elements on long sequences.
template <typename T>
struct BHND {
  T* ptr;
  int64_t sb, sh, sn;
  __device__ __forceinline__ T* head(int b, int h) const { return ptr + b * sb + h * sh; }
};

template <typename T>
struct FwdParams {
  BHND<const T> q, k, v;
  BHND<T> out;       // contiguous
  float* lse;        // (B, Hq, Nq) contiguous
  int hq, group, nq, nk;
  float scale_log2;  // scale * log2(e)
};

template <typename T>
struct BwdParams {
  BHND<const T> q, k, v, dout;
  const float* lse_log2;  // (B, Hq, Nq): lse * log2(e), +inf where lse = -inf
  const float* delta;     // (B, Hq, Nq): rowsum(dO * O)
  BHND<T> dq, dk, dv;     // contiguous
  int hq, group, nq, nk;
  float scale, scale_log2;
};

// Key tiles [0, end) that query rows [m0, m0 + rows) need: all of them, or,
// causally, up to the tile of the last key that the last row sees.
template <bool CAUSAL>
__device__ __forceinline__ int key_tile_end(int m0, int rows, int nq, int nk) {
  const int tiles = ceil_div(nk, kBlockN);
  if (!CAUSAL) return tiles;
  const int last_key = m0 + rows - 1 + (nk - nq);
  return last_key < 0 ? 0 : min(tiles, last_key / kBlockN + 1);
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------
//
// grid (ceil(Nq / 64), Hq, B). Shared: Q [64][D], K [2][64][D], V [2][64][D].
// Warp w owns query rows m0 + 16 w + [0, 16); lane (g, t) holds rows g and
// g + 8 of them (index r = 0, 1 below) and, in each 8-column tile, columns 2t
// and 2t + 1.
template <typename T, int D, bool CAUSAL>
__global__ void __launch_bounds__(kThreads) flash_attn_fwd_kernel(const FwdParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * D;
  T* sV = sK + 2 * kBlockN * D;

  // Causally, the last query tiles see the most keys: schedule them first.
  const int m_block = CAUSAL ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int m0 = m_block * kBlockM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int rows_q = min(kBlockM, p.nq - m0);
  const int n_end = key_tile_end<CAUSAL>(m0, rows_q, p.nq, p.nk);
  const int off = p.nk - p.nq;

  const T* k = p.k.head(b, h / p.group);
  const T* v = p.v.head(b, h / p.group);
  auto load_kv = [&](int nb, int buf) {
    const int n0 = nb * kBlockN, rows = min(kBlockN, p.nk - n0);
    load_tile<kBlockN, D>(sK + buf * kBlockN * D, k + n0 * p.k.sn, p.k.sn, rows);
    load_tile<kBlockN, D>(sV + buf * kBlockN * D, v + n0 * p.v.sn, p.v.sn, rows);
  };
  if (n_end > 0) {
    load_tile<kBlockM, D>(sQ, p.q.head(b, h) + m0 * p.q.sn, p.q.sn, rows_q);
    load_kv(0, 0);
  }
  cp_async_commit();

  float acc_o[D / 8][4] = {};
  float m_run[2] = {-INFINITY, -INFINITY};  // running max of s, log2 units
  float l_run[2] = {0.f, 0.f};              // this lane's part of the row sum
  for (int nb = 0; nb < n_end; ++nb) {
    const int buf = nb & 1;
    if (nb + 1 < n_end) load_kv(nb + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // tile nb (and Q) landed; tile nb + 1 may be in flight
    __syncthreads();

    float s[kBlockN / 8][4] = {};
    mma_abt<D, kBlockN / 8>(s, sQ, warp * 16, sK + buf * kBlockN * D);

    const int n0 = nb * kBlockN;
    const bool need_mask = n0 + kBlockN > p.nk || (CAUSAL && n0 + kBlockN - 1 > m0 + off);
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[nt][i] *= p.scale_log2;
        if (need_mask) {
          const int key = n0 + nt * 8 + 2 * t + (i & 1);
          const int row = m0 + warp * 16 + g + (i >> 1) * 8;
          if (key >= p.nk || (CAUSAL && key > row + off)) s[nt][i] = -INFINITY;
        }
      }
    }

    // Online softmax: rescale what was summed so far to the new row max.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt)
        tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      const float m_new = fmaxf(m_run[r], quad_max(tile_max));
      // A row with every key masked so far keeps m = -inf; subtracting 0
      // instead keeps exp2 at 0 rather than NaN.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m_run[r] - m_use);
      m_run[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - m_use);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - m_use);
        sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        acc_o[dt][2 * r] *= alpha;
        acc_o[dt][2 * r + 1] *= alpha;
      }
    }

    mma_cb<D, kBlockN / 16>(acc_o, s, sV + buf * kBlockN * D);
    __syncthreads();  // buffer `buf` is refilled by the next iteration's prefetch
  }
  cp_async_wait<0>();

  float inv[2];
  float* lse = p.lse + (int64_t(b) * p.hq + h) * p.nq;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_run[r]);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
    const int row = m0 + warp * 16 + g + r * 8;
    if (t == 0 && row < p.nq) lse[row] = l > 0.f ? (m_run[r] + log2f(l)) * kLn2 : -INFINITY;
  }
  // Each warp only ever read its own 16 rows of sQ, so it may overwrite them.
  stage_acc<D>(sQ, warp * 16, acc_o, inv[0], inv[1]);
  __syncthreads();
  store_tile<kBlockM, D>(p.out.head(b, h) + m0 * p.out.sn, sQ, rows_q);
}

// ---------------------------------------------------------------------------
// Backward preprocess: delta = rowsum(dO * O), lse in log2 units
// ---------------------------------------------------------------------------
//
// D / 8 consecutive lanes share a row, one 16-byte chunk each; rows are
// (b, h, i) flattened. 1-D grid over B * Hq * Nq * D / 8 threads.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    flash_attn_bwd_preprocess_kernel(const BHND<const T> dout, const BHND<const T> out,
                                     const float* __restrict__ lse, float* __restrict__ lse_log2,
                                     float* __restrict__ delta, int hq, int nq, int64_t rows) {
  constexpr int kLanes = D / 8;
  const int64_t row = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / kLanes;
  const int part = threadIdx.x % kLanes;
  float acc = 0.f;
  if (row < rows) {
    const int i = int(row % nq);
    const int64_t bh = row / nq;
    const int h = int(bh % hq), b = int(bh / hq);
    const auto x = load_vec<T, 8>(dout.head(b, h) + i * dout.sn + part * 8);
    const auto y = load_vec<T, 8>(out.head(b, h) + i * out.sn + part * 8);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc += to_float(x.val[e]) * to_float(y.val[e]);
  }
  // Rows never straddle warps (kLanes divides 32), and every lane takes part.
#pragma unroll
  for (int o = kLanes / 2; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (row < rows && part == 0) {
    delta[row] = acc;
    lse_log2[row] = lse[row] == -INFINITY ? INFINITY : lse[row] * kLog2e;
  }
}

// ---------------------------------------------------------------------------
// Backward dK, dV
// ---------------------------------------------------------------------------
//
// grid (ceil(Nk / 64), Hkv, B). Shared: K [64][D], V [64][D], Q [2][64][D],
// dO [2][64][D], lse_log2 [2][64], delta [2][64]. Warp w owns keys
// n0 + 16 w + [0, 16) and computes the transposed products, keys as rows:
//   S^T = K Q^T, P^T = exp2(S^T scale log2(e) - lse_log2[query column]),
//   dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta[col]), dK += dS^T Q.
// Query rows past Nq load as zeros with lse_log2 = +inf and delta = 0, so P^T
// and dS^T vanish there. Key rows past Nk compute garbage that is not stored
// and does not mix into other keys' rows.
template <typename T, int D, bool CAUSAL>
__global__ void __launch_bounds__(kThreads) flash_attn_bwd_dkdv_kernel(const BwdParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockN * D;
  T* sQ = sV + kBlockN * D;         // [2][kBlockM * D]
  T* sdO = sQ + 2 * kBlockM * D;    // [2][kBlockM * D]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * kBlockM * D);  // [2][kBlockM]
  float* sDelta = sLse + 2 * kBlockM;                             // [2][kBlockM]

  const int hk = blockIdx.y, b = blockIdx.z;
  const int n0 = blockIdx.x * kBlockN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int off = p.nk - p.nq;
  const int rows_k = min(kBlockN, p.nk - n0);

  // Causally, key n0 is first seen by query n0 - off: earlier tiles are skipped.
  const int m_begin = CAUSAL ? max(0, n0 - off) / kBlockM : 0;
  const int per_head = max(0, ceil_div(p.nq, kBlockM) - m_begin);
  const int iters = per_head * p.group;  // (q head of the group, query tile) pairs

  auto load_q = [&](int it, int buf) {
    const int h = hk * p.group + it / per_head;
    const int m0 = (m_begin + it % per_head) * kBlockM;
    const int rows = min(kBlockM, p.nq - m0);
    load_tile<kBlockM, D>(sQ + buf * kBlockM * D, p.q.head(b, h) + m0 * p.q.sn, p.q.sn, rows);
    load_tile<kBlockM, D>(sdO + buf * kBlockM * D, p.dout.head(b, h) + m0 * p.dout.sn,
                          p.dout.sn, rows);
    // Plain loads: visible to the other warps after the next __syncthreads.
    const int64_t base = (int64_t(b) * p.hq + h) * p.nq + m0;
    for (int r = threadIdx.x; r < kBlockM; r += kThreads) {
      sLse[buf * kBlockM + r] = r < rows ? p.lse_log2[base + r] : INFINITY;
      sDelta[buf * kBlockM + r] = r < rows ? p.delta[base + r] : 0.f;
    }
  };
  if (iters > 0) {
    load_tile<kBlockN, D>(sK, p.k.head(b, hk) + n0 * p.k.sn, p.k.sn, rows_k);
    load_tile<kBlockN, D>(sV, p.v.head(b, hk) + n0 * p.v.sn, p.v.sn, rows_k);
    load_q(0, 0);
  }
  cp_async_commit();

  float acc_dk[D / 8][4] = {};
  float acc_dv[D / 8][4] = {};
  for (int it = 0; it < iters; ++it) {
    const int buf = it & 1;
    if (it + 1 < iters) load_q(it + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* tq = sQ + buf * kBlockM * D;
    const T* tdo = sdO + buf * kBlockM * D;
    const float* lse2 = sLse + buf * kBlockM;
    const float* dlt = sDelta + buf * kBlockM;
    const int m0 = (m_begin + it % per_head) * kBlockM;

    float pt[kBlockM / 8][4] = {};  // S^T, then P^T
    mma_abt<D, kBlockM / 8>(pt, sK, warp * 16, tq);
    const bool need_mask = CAUSAL && n0 + kBlockN - 1 > m0 + off;
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int col = nt * 8 + 2 * t + (i & 1);  // query m0 + col
        const float prob = exp2f(pt[nt][i] * p.scale_log2 - lse2[col]);
        // Select, not multiply: a masked score can exceed lse and overflow.
        const int key = n0 + warp * 16 + g + (i >> 1) * 8;
        pt[nt][i] = need_mask && key > m0 + col + off ? 0.f : prob;
      }
    }
    mma_cb<D, kBlockM / 16>(acc_dv, pt, tdo);

    float ds[kBlockM / 8][4] = {};  // dP^T, then dS^T
    mma_abt<D, kBlockM / 8>(ds, sV, warp * 16, tdo);
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) ds[nt][i] = pt[nt][i] * (ds[nt][i] - dlt[nt * 8 + 2 * t + (i & 1)]);
    }
    mma_cb<D, kBlockM / 16>(acc_dk, ds, tq);
    __syncthreads();  // buffer `buf` is refilled by the next iteration's prefetch
  }
  cp_async_wait<0>();

  // Each warp only ever read its own 16 rows of sK and sV.
  stage_acc<D>(sK, warp * 16, acc_dk, p.scale, p.scale);
  stage_acc<D>(sV, warp * 16, acc_dv, 1.f, 1.f);
  __syncthreads();
  store_tile<kBlockN, D>(p.dk.head(b, hk) + n0 * p.dk.sn, sK, rows_k);
  store_tile<kBlockN, D>(p.dv.head(b, hk) + n0 * p.dv.sn, sV, rows_k);
}

// ---------------------------------------------------------------------------
// Backward dQ
// ---------------------------------------------------------------------------
//
// grid (ceil(Nq / 64), Hq, B), the forward's tiling. Shared: Q [64][D],
// dO [64][D], K [2][64][D], V [2][64][D]. Warp w owns query rows
// m0 + 16 w + [0, 16): S = Q K^T, P = exp2(S scale log2(e) - lse_log2[row]),
// dP = dO V^T, dS = P (dP - delta[row]), dQ += dS K.
template <typename T, int D, bool CAUSAL>
__global__ void __launch_bounds__(kThreads) flash_attn_bwd_dq_kernel(const BwdParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBlockM * D;
  T* sK = sdO + kBlockM * D;  // [2][kBlockN * D]
  T* sV = sK + 2 * kBlockN * D;  // [2][kBlockN * D]

  const int m_block = CAUSAL ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int m0 = m_block * kBlockM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int rows_q = min(kBlockM, p.nq - m0);
  const int n_end = key_tile_end<CAUSAL>(m0, rows_q, p.nq, p.nk);
  const int off = p.nk - p.nq;

  // Per-row statistics of rows g and g + 8; rows past Nq behave as fully masked.
  float lse2[2], dlt[2];
  const int64_t stat = (int64_t(b) * p.hq + h) * p.nq;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + warp * 16 + g + r * 8;
    lse2[r] = row < p.nq ? p.lse_log2[stat + row] : INFINITY;
    dlt[r] = row < p.nq ? p.delta[stat + row] : 0.f;
  }

  const T* k = p.k.head(b, h / p.group);
  const T* v = p.v.head(b, h / p.group);
  auto load_kv = [&](int nb, int buf) {
    const int n0 = nb * kBlockN, rows = min(kBlockN, p.nk - n0);
    load_tile<kBlockN, D>(sK + buf * kBlockN * D, k + n0 * p.k.sn, p.k.sn, rows);
    load_tile<kBlockN, D>(sV + buf * kBlockN * D, v + n0 * p.v.sn, p.v.sn, rows);
  };
  if (n_end > 0) {
    load_tile<kBlockM, D>(sQ, p.q.head(b, h) + m0 * p.q.sn, p.q.sn, rows_q);
    load_tile<kBlockM, D>(sdO, p.dout.head(b, h) + m0 * p.dout.sn, p.dout.sn, rows_q);
    load_kv(0, 0);
  }
  cp_async_commit();

  float acc_dq[D / 8][4] = {};
  for (int nb = 0; nb < n_end; ++nb) {
    const int buf = nb & 1;
    if (nb + 1 < n_end) load_kv(nb + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* tk = sK + buf * kBlockN * D;
    float ps[kBlockN / 8][4] = {};  // S, then P
    mma_abt<D, kBlockN / 8>(ps, sQ, warp * 16, tk);
    const int n0 = nb * kBlockN;
    const bool need_mask = n0 + kBlockN > p.nk || (CAUSAL && n0 + kBlockN - 1 > m0 + off);
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float prob = exp2f(ps[nt][i] * p.scale_log2 - lse2[i >> 1]);
        const int key = n0 + nt * 8 + 2 * t + (i & 1);
        const int row = m0 + warp * 16 + g + (i >> 1) * 8;
        ps[nt][i] = need_mask && (key >= p.nk || (CAUSAL && key > row + off)) ? 0.f : prob;
      }
    }

    float ds[kBlockN / 8][4] = {};  // dP, then dS
    mma_abt<D, kBlockN / 8>(ds, sdO, warp * 16, sV + buf * kBlockN * D);
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) ds[nt][i] = ps[nt][i] * (ds[nt][i] - dlt[i >> 1]);
    }
    mma_cb<D, kBlockN / 16>(acc_dq, ds, tk);
    __syncthreads();
  }
  cp_async_wait<0>();

  stage_acc<D>(sQ, warp * 16, acc_dq, p.scale, p.scale);
  __syncthreads();
  store_tile<kBlockM, D>(p.dq.head(b, h) + m0 * p.dq.sn, sQ, rows_q);
}

// ---------------------------------------------------------------------------
// Host
// ---------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>, integral_constant<int, D>, bool_constant<causal>).
template <typename F>
void dispatch_flash(at::ScalarType dtype, int64_t head_dim, bool causal, F&& f) {
  auto by_causal = [&](auto type_tag, auto dim_tag) {
    if (causal) {
      f(type_tag, dim_tag, std::true_type{});
    } else {
      f(type_tag, dim_tag, std::false_type{});
    }
  };
  auto by_dim = [&](auto type_tag) {
    if (head_dim == 64) {
      by_causal(type_tag, std::integral_constant<int, 64>{});
    } else {
      by_causal(type_tag, std::integral_constant<int, 128>{});
    }
  };
  if (dtype == at::kHalf) {
    by_dim(TypeTag<__half>{});
  } else {
    by_dim(TypeTag<__nv_bfloat16>{});
  }
}

template <typename T>
BHND<T> bhnd(const at::Tensor& t) {
  return {reinterpret_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// The kernels move rows in 16-byte chunks, so every row must start 16-byte
// aligned: last dim contiguous, aligned base, and strides of the other dims
// (where the size is > 1) multiples of 8 elements. Anything else is copied once.
at::Tensor as_operand(const at::Tensor& t) {
  bool ok = t.stride(3) == 1 && is_aligned(t.data_ptr(), 16);
  for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) == 1 || t.stride(d) % 8 == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

template <typename K>
void allow_smem(K* kernel, int bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// Checks shared by forward and backward; the message names the argument.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  FASTDL_CHECK_DEVICE_TYPE(q, at::kCUDA);
  FASTDL_CHECK_SAME_DEVICE(k, q);
  FASTDL_CHECK_SAME_DEVICE(v, q);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "fastdl: q must be float16 or bfloat16 for the CUDA flash attention kernels, got ",
              q.scalar_type());
  FASTDL_CHECK_SAME_DTYPE(k, q);
  FASTDL_CHECK_SAME_DTYPE(v, q);
  TORCH_CHECK(q.dim() == 4, "fastdl: q must be 4-D (B, Hq, Nq, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "fastdl: k must be 4-D (B, Hkv, Nk, D), got shape ", k.sizes());
  FASTDL_CHECK_SAME_SHAPE(v, k);
  const int64_t d = q.size(3);
  TORCH_CHECK(d == 64 || d == 128,
              "fastdl: head dim q.size(-1) must be 64 or 128 for the CUDA flash attention "
              "kernels, got ", d);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == d, "fastdl: k must have shape (B, Hkv, Nk, ",
              d, ") with B = q.size(0) = ", q.size(0), ", got ", k.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "fastdl: the number of q heads (",
              q.size(1), ") must be a multiple of the number of k/v heads (", k.size(1), ")");
  TORCH_CHECK(q.size(0) <= 65535 && q.size(1) <= 65535,
              "fastdl: batch and q heads must each be at most 65535, got q shape ", q.sizes());
  TORCH_CHECK(q.size(2) <= INT32_MAX - kBlockM && k.size(2) <= INT32_MAX - kBlockN,
              "fastdl: sequence lengths must be below 2^31 - 64, got Nq = ", q.size(2),
              ", Nk = ", k.size(2));
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v, double scale,
                                                       bool causal) {
  check_qkv(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (Nk == 0) return {out.zero_(), lse.fill_(-INFINITY)};

  const at::Tensor q_ = as_operand(q), k_ = as_operand(k), v_ = as_operand(v);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_flash(q.scalar_type(), D, causal, [&](auto type_tag, auto dim_tag, auto causal_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int kD = decltype(dim_tag)::value;
    FwdParams<T> p{bhnd<const T>(q_), bhnd<const T>(k_), bhnd<const T>(v_), bhnd<T>(out),
                   lse.data_ptr<float>(), int(Hq), int(Hq / Hkv), int(Nq), int(Nk),
                   float(scale) * kLog2e};
    auto kernel = flash_attn_fwd_kernel<T, kD, decltype(causal_tag)::value>;
    const int smem = (kBlockM + 4 * kBlockN) * kD * int(sizeof(T));
    allow_smem(kernel, smem);
    const dim3 grid(ceil_div(int(Nq), kBlockM), unsigned(Hq), unsigned(B));
    kernel<<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool causal) {
  check_qkv(q, k, v);
  FASTDL_CHECK_SAME_DEVICE(grad_out, q);
  FASTDL_CHECK_SAME_DEVICE(out, q);
  FASTDL_CHECK_SAME_DEVICE(lse, q);
  FASTDL_CHECK_SAME_DTYPE(grad_out, q);
  FASTDL_CHECK_SAME_DTYPE(out, q);
  FASTDL_CHECK_SAME_SHAPE(grad_out, q);
  FASTDL_CHECK_SAME_SHAPE(out, q);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "fastdl: lse must be float32, got ",
              lse.scalar_type());
  const std::vector<int64_t> lse_shape{B, Hq, Nq};
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lse_shape),
              "fastdl: lse must have shape (B, Hq, Nq) = ", lse_shape, ", got ", lse.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  if (q.numel() == 0 || Nk == 0)
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()),
            at::zeros(v.sizes(), v.options())};

  const at::Tensor q_ = as_operand(q), k_ = as_operand(k), v_ = as_operand(v);
  const at::Tensor do_ = as_operand(grad_out), o_ = as_operand(out);
  const at::Tensor lse_ = lse.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor lse_log2 = at::empty({B, Hq, Nq}, lse.options());
  at::Tensor delta = at::empty({B, Hq, Nq}, lse.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_flash(q.scalar_type(), D, causal, [&](auto type_tag, auto dim_tag, auto causal_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int kD = decltype(dim_tag)::value;
    constexpr bool kCausal = decltype(causal_tag)::value;

    const int64_t rows = B * Hq * Nq;
    const int64_t pre_threads = rows * (kD / 8);
    flash_attn_bwd_preprocess_kernel<T, kD>
        <<<unsigned((pre_threads + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
            bhnd<const T>(do_), bhnd<const T>(o_), lse_.data_ptr<float>(),
            lse_log2.data_ptr<float>(), delta.data_ptr<float>(), int(Hq), int(Nq), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    BwdParams<T> p{bhnd<const T>(q_),   bhnd<const T>(k_),         bhnd<const T>(v_),
                   bhnd<const T>(do_),  lse_log2.data_ptr<float>(), delta.data_ptr<float>(),
                   bhnd<T>(dq),         bhnd<T>(dk),                bhnd<T>(dv),
                   int(Hq),             int(Hq / Hkv),              int(Nq),
                   int(Nk),             float(scale),               float(scale) * kLog2e};

    auto dkdv = flash_attn_bwd_dkdv_kernel<T, kD, kCausal>;
    const int smem_dkdv = (2 * kBlockN + 4 * kBlockM) * kD * int(sizeof(T)) +
                          4 * kBlockM * int(sizeof(float));
    allow_smem(dkdv, smem_dkdv);
    dkdv<<<dim3(ceil_div(int(Nk), kBlockN), unsigned(Hkv), unsigned(B)), kThreads, smem_dkdv,
           stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    auto dqk = flash_attn_bwd_dq_kernel<T, kD, kCausal>;
    const int smem_dq = (2 * kBlockM + 4 * kBlockN) * kD * int(sizeof(T));
    allow_smem(dqk, smem_dq);
    dqk<<<dim3(ceil_div(int(Nq), kBlockM), unsigned(Hq), unsigned(B)), kThreads, smem_dq,
          stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_cuda);
  m.impl("flash_attn_bwd", &flash_attn_bwd_cuda);
}

}  // namespace fastdl
