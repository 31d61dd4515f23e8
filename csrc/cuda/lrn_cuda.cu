// Local response normalisation on CUDA: float32, float64, float16 and bfloat16 (accumulated in float).
//
// Every window sum is recomputed from its n terms (n = 5 for AlexNet: reads that hit the cache), never
// carried from one channel to the next by adding the entering term and subtracting the leaving one: such a
// running sum cancels catastrophically after a large term and keeps a NaN or Inf for every later channel,
// where torch.nn.functional.local_response_norm confines them to the windows that hold them.
//
// Channels-first: one thread per (image, spatial position, run of channels) walks its run; neighbouring
// threads read neighbouring addresses (coalesced). A pixel's C channels are cut into runs (of >= 8) until
// there are ~2^20 threads, so that enough loads are in flight to reach the memory bandwidth (one serial
// walk over 96 channels per pixel left the GPU waiting on each load).
// Channels-last: a warp per pixel (below). The backward saves only the input and runs in one pass:
// t_c = g_c a_c s_c^(-beta-1), then da_j sums t over the mirrored window (see ../lrn.h for the formula).
// Channels-first, each thread computes t for its run and the n - 1 channels around it (recomputed by the
// neighbouring runs' threads too) into its own slots of shared memory, n of them reused as it walks (every
// sum still recomputed from its n terms); a window too wide for shared memory (n > 24 in float32) writes t
// to a scratch tensor instead, then a second kernel sums it.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "../lrn.h"
#include "indexing.cuh"

namespace lightcnn {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kTargetThreads = int64_t(1) << 20;  // ~4 waves of an H100/H200 (132 SMs x 2048 threads)
constexpr int kMaxWarps = 8;                          // warps a block in the channels-last kernels

template <typename acc_t>
__device__ __forceinline__ acc_t neg_pow(acc_t s, acc_t beta, PowMode mode) {
  switch (mode) {
    case PowMode::ThreeQuarters: {
      const acc_t r = rsqrt(s);
      return r * sqrt(r);
    }
    case PowMode::Half:
      return rsqrt(s);
    case PowMode::One:
      return acc_t(1) / s;
    default:
      return pow(s, -beta);
  }
}

// The element (n, c, s) of an (N, C, S) view lives at n*C*S + c*cs + s*ss: (cs, ss) = (S, 1) for
// channels-first, (1, C) for channels-last. A pixel's channels are cut into `groups` runs of `per`.
struct Geometry {
  int64_t NS, C, S, cs, ss;
  int64_t lo, hi;  // window of channel c: [c - lo, c + hi]
  int64_t per, groups;
};

// The sum of at(j) over the window [c - left, c + right] of one (n, s) column, clipped to [0, C).
// `at(j)` reads value j of the column (a^2 of the input, or the backward's t).
template <typename acc_t, typename At>
__device__ __forceinline__ acc_t window_sum(const At& at, int64_t c, int64_t left, int64_t right, int64_t C) {
  const int64_t j1 = min(c + right, C - 1);
  acc_t sum = 0;
  for (int64_t j = max(c - left, int64_t(0)); j <= j1; ++j) sum += at(j);
  return sum;
}

// What the backward multiplies g*a*s^-beta by: 1/s, NaN where s > nan_above (see grad_nan_above in ../lrn.h).
template <typename acc_t>
__device__ __forceinline__ acc_t inv_scale(acc_t s, acc_t nan_above) {
  return s > nan_above ? acc_t(NAN) : acc_t(1) / s;
}

template <typename scalar_t, typename acc_t>
struct Squares {  // a^2 of a column of the input
  const scalar_t* xp;
  int64_t cs;
  __device__ __forceinline__ acc_t operator()(int64_t j) const {
    const acc_t a = static_cast<acc_t>(xp[j * cs]);
    return a * a;
  }
};

template <typename acc_t>
struct Column {  // a column of an acc_t scratch buffer
  const acc_t* p;
  int64_t cs;
  __device__ __forceinline__ acc_t operator()(int64_t j) const { return p[j * cs]; }
};

// Work item idx of the per-column kernels: (group, pixel), pixels fastest, so that a warp takes
// neighbouring pixels of one channel run (coalesced in channels-first memory). Returns the column's base
// offset and the run [c0, c1).
__device__ __forceinline__ int64_t column(const Geometry& g, int64_t idx, int64_t& c0, int64_t& c1) {
  const int64_t grp = idx / g.NS, p = idx - grp * g.NS, n = p / g.S, s = p - n * g.S;
  c0 = grp * g.per;
  c1 = min(g.C, c0 + g.per);
  return n * g.C * g.S + s * g.ss;
}

template <typename scalar_t, typename acc_t>
__global__ void lrn_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Geometry g, acc_t coef,
                                   acc_t k, acc_t beta, PowMode mode) {
  grid_stride(g.NS * g.groups, [&](int64_t idx) {
    int64_t c0, c1;
    const int64_t base = column(g, idx, c0, c1);
    const scalar_t* xp = x + base;
    scalar_t* yp = y + base;
    const Squares<scalar_t, acc_t> sq{xp, g.cs};
    for (int64_t c = c0; c < c1; ++c) {
      const acc_t sum = window_sum<acc_t>(sq, c, g.lo, g.hi, g.C);
      yp[c * g.cs] = static_cast<scalar_t>(static_cast<acc_t>(xp[c * g.cs]) * neg_pow<acc_t>(k + coef * sum, beta, mode));
    }
  });
}

// Kernel 1 of the two-kernel backward (a window too wide for lrn_backward_kernel's rings): t = g * a * s^-beta / s,
// in the layout of x, in acc_t.
template <typename scalar_t, typename acc_t>
__global__ void lrn_backward_t_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                      acc_t* __restrict__ t, Geometry g, acc_t coef, acc_t k, acc_t beta, PowMode mode,
                                      acc_t nan_above) {
  grid_stride(g.NS * g.groups, [&](int64_t idx) {
    int64_t c0, c1;
    const int64_t base = column(g, idx, c0, c1);
    const scalar_t *xp = x + base, *gp = grad + base;
    acc_t* tp = t + base;
    const Squares<scalar_t, acc_t> sq{xp, g.cs};
    for (int64_t c = c0; c < c1; ++c) {
      const acc_t sc = k + coef * window_sum<acc_t>(sq, c, g.lo, g.hi, g.C);
      tp[c * g.cs] = static_cast<acc_t>(gp[c * g.cs]) * static_cast<acc_t>(xp[c * g.cs]) * neg_pow<acc_t>(sc, beta, mode) *
                     inv_scale<acc_t>(sc, nan_above);
    }
  });
}

// Kernel 2 of the two-kernel backward: da_j = g_j s_j^-beta - coef2 * a_j * sum_{c in [j - hi, j + lo]} t_c.
template <typename scalar_t, typename acc_t>
__global__ void lrn_backward_grad_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                         const acc_t* __restrict__ t, scalar_t* __restrict__ dx, Geometry g,
                                         acc_t coef, acc_t coef2, acc_t k, acc_t beta, PowMode mode) {
  grid_stride(g.NS * g.groups, [&](int64_t idx) {
    int64_t c0, c1;
    const int64_t base = column(g, idx, c0, c1);
    const scalar_t *xp = x + base, *gp = grad + base;
    scalar_t* dp = dx + base;
    const Squares<scalar_t, acc_t> sq{xp, g.cs};
    const Column<acc_t> tc{t + base, g.cs};
    for (int64_t j = c0; j < c1; ++j) {
      const acc_t p = neg_pow<acc_t>(k + coef * window_sum<acc_t>(sq, j, g.lo, g.hi, g.C), beta, mode);
      const acc_t tsum = window_sum<acc_t>(tc, j, g.hi, g.lo, g.C);  // the mirrored window
      dp[j * g.cs] = static_cast<scalar_t>(static_cast<acc_t>(gp[j * g.cs]) * p -
                                           coef2 * static_cast<acc_t>(xp[j * g.cs]) * tsum);
    }
  });
}

// The whole channels-first backward in one pass: this thread's run [c0, c1) of a column walks i over
// [c0 - hi, c1 + lo), computing p_i = s_i^-beta and t_i into slot i mod n of its two rings in shared memory
// (i < C), and, once t_(j + lo) is there, da_j for j = i - lo >= c0 from the n slots of j's mirrored
// window. ring: 2 * n * blockDim.x acc_t values, thread-major per slot (no bank conflict).
template <typename scalar_t, typename acc_t>
__global__ void lrn_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                    scalar_t* __restrict__ dx, Geometry g, acc_t coef, acc_t coef2, acc_t k,
                                    acc_t beta, PowMode mode, acc_t nan_above) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t n = g.lo + g.hi + 1;
  acc_t* pw = reinterpret_cast<acc_t*>(smem_raw) + threadIdx.x;  // slot q at pw[q * blockDim.x]
  acc_t* tr = pw + n * blockDim.x;
  grid_stride(g.NS * g.groups, [&](int64_t idx) {
    int64_t c0, c1;
    const int64_t base = column(g, idx, c0, c1);
    const scalar_t *xp = x + base, *gp = grad + base;
    scalar_t* dp = dx + base;
    const Squares<scalar_t, acc_t> sq{xp, g.cs};
    for (int64_t i = max(c0 - g.hi, int64_t(0)); i < c1 + g.lo; ++i) {
      if (i < g.C) {
        const acc_t sc = k + coef * window_sum<acc_t>(sq, i, g.lo, g.hi, g.C);
        const acc_t pc = neg_pow<acc_t>(sc, beta, mode);
        const int64_t q = (i % n) * blockDim.x;
        pw[q] = pc;
        tr[q] = static_cast<acc_t>(gp[i * g.cs]) * static_cast<acc_t>(xp[i * g.cs]) * pc *
                inv_scale<acc_t>(sc, nan_above);
      }
      const int64_t j = i - g.lo;
      if (j < c0) continue;
      const int64_t j1 = min(j + g.lo, g.C - 1);
      acc_t tsum = 0;
      for (int64_t c = max(j - g.hi, int64_t(0)); c <= j1; ++c) tsum += tr[(c % n) * blockDim.x];
      dp[j * g.cs] = static_cast<scalar_t>(static_cast<acc_t>(gp[j * g.cs]) * pw[(j % n) * blockDim.x] -
                                           coef2 * static_cast<acc_t>(xp[j * g.cs]) * tsum);
    }
  });
}

// ---- Channels-last: a warp per pixel ----
// The lanes take neighbouring channels of one pixel, so every load and store is coalesced (a thread per
// pixel reads addresses C elements apart from its neighbour's), and the window sums read the pixel's
// squares from the warp's slice of shared memory (O(size) per element, cheap for LRN's n = 5). The block
// is (32, warps); each warp walks pixels grid-stride and synchronises with __syncwarp() only.

template <typename scalar_t, typename acc_t>
__global__ void lrn_forward_cl_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Geometry g,
                                      acc_t coef, acc_t k, acc_t beta, PowMode mode) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sq = reinterpret_cast<acc_t*>(smem_raw) + threadIdx.y * g.C;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.y + threadIdx.y; p < g.NS; p += (int64_t)gridDim.x * blockDim.y) {
    const scalar_t* xp = x + p * g.C;
    scalar_t* yp = y + p * g.C;
    for (int64_t c = threadIdx.x; c < g.C; c += 32) {
      const acc_t a = static_cast<acc_t>(xp[c]);
      sq[c] = a * a;
    }
    __syncwarp();
    for (int64_t c = threadIdx.x; c < g.C; c += 32) {
      const acc_t sum = window_sum<acc_t>(Column<acc_t>{sq, 1}, c, g.lo, g.hi, g.C);
      yp[c] = static_cast<scalar_t>(static_cast<acc_t>(xp[c]) * neg_pow<acc_t>(k + coef * sum, beta, mode));
    }
    __syncwarp();  // the next pixel overwrites sq
  }
}

// The whole backward in one pass per pixel: s^-beta and t = g a s^-beta / s into shared memory, then
// da_j = g_j s_j^-beta - coef2 * a_j * sum of t over the mirrored window [j - hi, j + lo].
template <typename scalar_t, typename acc_t>
__global__ void lrn_backward_cl_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                       scalar_t* __restrict__ dx, Geometry g, acc_t coef, acc_t coef2, acc_t k,
                                       acc_t beta, PowMode mode, acc_t nan_above) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sq = reinterpret_cast<acc_t*>(smem_raw) + threadIdx.y * 3 * g.C;
  acc_t* pw = sq + g.C;
  acc_t* t = pw + g.C;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.y + threadIdx.y; p < g.NS; p += (int64_t)gridDim.x * blockDim.y) {
    const scalar_t *xp = x + p * g.C, *gp = grad + p * g.C;
    scalar_t* dp = dx + p * g.C;
    for (int64_t c = threadIdx.x; c < g.C; c += 32) {
      const acc_t a = static_cast<acc_t>(xp[c]);
      sq[c] = a * a;
    }
    __syncwarp();
    for (int64_t c = threadIdx.x; c < g.C; c += 32) {
      const acc_t sc = k + coef * window_sum<acc_t>(Column<acc_t>{sq, 1}, c, g.lo, g.hi, g.C);
      const acc_t pc = neg_pow<acc_t>(sc, beta, mode);
      pw[c] = pc;
      t[c] = static_cast<acc_t>(gp[c]) * static_cast<acc_t>(xp[c]) * pc * inv_scale<acc_t>(sc, nan_above);
    }
    __syncwarp();
    for (int64_t j = threadIdx.x; j < g.C; j += 32) {
      const acc_t tsum = window_sum<acc_t>(Column<acc_t>{t, 1}, j, g.hi, g.lo, g.C);
      dp[j] = static_cast<scalar_t>(static_cast<acc_t>(gp[j]) * pw[j] - coef2 * static_cast<acc_t>(xp[j]) * tsum);
    }
    __syncwarp();  // the next pixel overwrites sq, pw and t
  }
}

// Warps per block of the channels-last kernels: `arrays` per-channel acc_t arrays per warp must fit in the
// default 48 KiB of shared memory; 0 when not even one warp's fit (the per-column kernels serve then).
// LIGHTCNN_CUDA_LRN_CHANNELS_LAST=column forces the per-column kernels on channels-last inputs too, so
// that benchmarks/gpu_check.sh measures both designs in one run.
int cl_warps(const LrnView& v, size_t acc_bytes, int arrays) {
  const char* opt = std::getenv("LIGHTCNN_CUDA_LRN_CHANNELS_LAST");
  if (!v.channels_last || (opt != nullptr && std::strcmp(opt, "column") == 0)) return 0;
  const int64_t fit = static_cast<int64_t>(48 * 1024 / (static_cast<size_t>(v.C) * acc_bytes * arrays));
  return static_cast<int>(std::min<int64_t>(kMaxWarps, fit));
}

// Blocks of the channels-last kernels: about 4 pixels a warp (at most 2^16 blocks; the loops are grid-stride).
unsigned cl_blocks(int64_t pixels, int warps) {
  return static_cast<unsigned>(std::clamp<int64_t>((pixels + 4 * warps - 1) / (4 * warps), 1, int64_t(1) << 16));
}

// Runs of channels per pixel: enough (pixel, run) work items for ~kTargetThreads threads, runs of >= 8.
Geometry geometry(const LrnView& v, int64_t size) {
  const int64_t NS = v.N * v.S;
  int64_t groups = std::clamp<int64_t>((kTargetThreads + NS - 1) / NS, 1, std::max<int64_t>(1, v.C / 8));
  const int64_t per = (v.C + groups - 1) / groups;
  groups = (v.C + per - 1) / per;
  return {NS, v.C, v.S, v.channels_last ? 1 : v.S, v.channels_last ? v.C : 1, size / 2, (size - 1) / 2, per, groups};
}

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)); }

void check_cuda(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, ": expected a CUDA tensor, got one on ", t.device());
}

at::Tensor lrn_cuda(const at::Tensor& input, int64_t size, double alpha, double beta, double k) {
  lrn_check(input, size, "lightcnn::lrn");
  check_cuda(input, "lightcnn::lrn");
  c10::cuda::CUDAGuard guard(input.device());
  const LrnView v = lrn_view(input);
  at::Tensor out = at::empty_like(v.x);
  if (out.numel() == 0) return out;
  const Geometry g = geometry(v, size);
  const PowMode mode = pow_mode(beta);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "lrn_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (const int warps = cl_warps(v, sizeof(acc_t), 1)) {
      lrn_forward_cl_kernel<scalar_t, acc_t><<<cl_blocks(g.NS, warps), dim3(32, warps), warps * g.C * sizeof(acc_t),
                                                stream>>>(
          v.x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, static_cast<acc_t>(alpha / size),
          static_cast<acc_t>(k), static_cast<acc_t>(beta), mode);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    lrn_forward_kernel<scalar_t, acc_t><<<blocks_for(g.NS * g.groups), kThreads, 0, stream>>>(
        v.x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, static_cast<acc_t>(alpha / size),
        static_cast<acc_t>(k), static_cast<acc_t>(beta), mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor lrn_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input, int64_t size, double alpha,
                             double beta, double k) {
  check_cuda(input, "lightcnn::lrn_backward");
  c10::cuda::CUDAGuard guard(input.device());
  const auto [v, grad, grad_input] = lrn_backward_operands(grad_output, input, size);
  if (grad_input.numel() == 0) return grad_input;
  const Geometry g = geometry(v, size);
  const PowMode mode = pow_mode(beta);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "lrn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t coef = static_cast<acc_t>(alpha / size), coef2 = static_cast<acc_t>(2.0 * alpha * beta / size);
    const acc_t nan_above = grad_nan_above<acc_t>(beta);
    if (const int warps = cl_warps(v, sizeof(acc_t), 3)) {
      lrn_backward_cl_kernel<scalar_t, acc_t><<<cl_blocks(g.NS, warps), dim3(32, warps),
                                                 3 * warps * g.C * sizeof(acc_t), stream>>>(
          grad.const_data_ptr<scalar_t>(), v.x.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(), g,
          coef, coef2, static_cast<acc_t>(k), static_cast<acc_t>(beta), mode, nan_above);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const size_t ring_bytes = 2 * static_cast<size_t>(size) * kThreads * sizeof(acc_t);
    if (ring_bytes <= 48 * 1024) {
      lrn_backward_kernel<scalar_t, acc_t><<<blocks_for(g.NS * g.groups), kThreads, ring_bytes, stream>>>(
          grad.const_data_ptr<scalar_t>(), v.x.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(), g,
          coef, coef2, static_cast<acc_t>(k), static_cast<acc_t>(beta), mode, nan_above);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    // Scratch for t, laid out like x (its strides are those of x: same dense layout, same sizes).
    at::Tensor t = at::empty_like(v.x, v.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    lrn_backward_t_kernel<scalar_t, acc_t><<<blocks_for(g.NS * g.groups), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), v.x.const_data_ptr<scalar_t>(), t.mutable_data_ptr<acc_t>(), g, coef,
        static_cast<acc_t>(k), static_cast<acc_t>(beta), mode, nan_above);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    lrn_backward_grad_kernel<scalar_t, acc_t><<<blocks_for(g.NS * g.groups), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), v.x.const_data_ptr<scalar_t>(), t.const_data_ptr<acc_t>(),
        grad_input.mutable_data_ptr<scalar_t>(), g, coef, coef2, static_cast<acc_t>(k), static_cast<acc_t>(beta), mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input;
}

}  // namespace

}  // namespace lightcnn

TORCH_LIBRARY_IMPL(lightcnn, CUDA, m) {
  m.impl("lrn", &lightcnn::lrn_cuda);
  m.impl("lrn_backward", &lightcnn::lrn_backward_cuda);
}
