// Local response normalisation on CUDA: float32, float64, float16 and bfloat16 (accumulated in float).
//
// One thread per (image, spatial position) walks the channels with a running sum of squares, so each
// input element is read about twice (once entering, once leaving the window) whatever the window size.
// In the channels-first layout neighbouring threads read neighbouring addresses (coalesced).
// The backward saves only the input: kernel 1 writes t_c = g_c a_c s_c^(-beta-1) to a scratch buffer,
// kernel 2 recomputes s_j and sums t over the mirrored window (see ../lrn.h for the formula).
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

namespace lightcnn {
namespace {

constexpr int kThreads = 256;

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
// channels-first, (1, C) for channels-last.
struct Geometry {
  int64_t NS, C, S, cs, ss;
  int64_t lo, hi;  // window of channel c: [c - lo, c + hi]
};

// The running sum of a^2 over the window [c - lo, c + hi] of one (n, s) column; `next()` returns the
// sum of channel 0, then 1, 2, ... (one add and one subtract per step, whatever the window size).
template <typename scalar_t, typename acc_t>
struct SquareWindow {
  const scalar_t* xp;
  const Geometry g;
  int64_t c = 0;
  acc_t sum = 0;

  __device__ __forceinline__ acc_t sq(int64_t j) const {
    const acc_t a = static_cast<acc_t>(xp[j * g.cs]);
    return a * a;
  }
  __device__ SquareWindow(const scalar_t* xp_, const Geometry& g_) : xp(xp_), g(g_) {
    for (int64_t j = 0; j <= min(g.hi, g.C - 1); ++j) sum += sq(j);
  }
  __device__ __forceinline__ acc_t next() {
    if (c > 0) {
      if (c + g.hi < g.C) sum += sq(c + g.hi);
      if (c - g.lo - 1 >= 0) sum -= sq(c - g.lo - 1);
    }
    ++c;
    return sum;
  }
};

template <typename scalar_t, typename acc_t>
__global__ void lrn_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Geometry g, acc_t coef,
                                   acc_t k, acc_t beta, PowMode mode) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < g.NS;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = idx / g.S, s = idx % g.S, base = n * g.C * g.S + s * g.ss;
    const scalar_t* xp = x + base;
    scalar_t* yp = y + base;
    SquareWindow<scalar_t, acc_t> window(xp, g);
    for (int64_t c = 0; c < g.C; ++c) {
      const acc_t sum = window.next();
      yp[c * g.cs] = static_cast<scalar_t>(static_cast<acc_t>(xp[c * g.cs]) * neg_pow<acc_t>(k + coef * sum, beta, mode));
    }
  }
}

// Kernel 1 of the backward: t = g * a * s^-beta / s, in the layout of x, in acc_t.
template <typename scalar_t, typename acc_t>
__global__ void lrn_backward_t_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                      acc_t* __restrict__ t, Geometry g, acc_t coef, acc_t k, acc_t beta, PowMode mode) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < g.NS;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = idx / g.S, s = idx % g.S, base = n * g.C * g.S + s * g.ss;
    const scalar_t *xp = x + base, *gp = grad + base;
    acc_t* tp = t + base;
    SquareWindow<scalar_t, acc_t> window(xp, g);
    for (int64_t c = 0; c < g.C; ++c) {
      const acc_t sum = window.next();
      const acc_t sc = k + coef * sum;
      tp[c * g.cs] = static_cast<acc_t>(gp[c * g.cs]) * static_cast<acc_t>(xp[c * g.cs]) * neg_pow<acc_t>(sc, beta, mode) / sc;
    }
  }
}

// Kernel 2 of the backward: da_j = g_j s_j^-beta - coef2 * a_j * sum_{c in [j - hi, j + lo]} t_c.
template <typename scalar_t, typename acc_t>
__global__ void lrn_backward_grad_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                         const acc_t* __restrict__ t, scalar_t* __restrict__ dx, Geometry g,
                                         acc_t coef, acc_t coef2, acc_t k, acc_t beta, PowMode mode) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < g.NS;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = idx / g.S, s = idx % g.S, base = n * g.C * g.S + s * g.ss;
    const scalar_t *xp = x + base, *gp = grad + base;
    const acc_t* tp = t + base;
    scalar_t* dp = dx + base;
    SquareWindow<scalar_t, acc_t> window(xp, g);
    acc_t tsum = 0;
    for (int64_t c = 0; c <= min(g.lo, g.C - 1); ++c) tsum += tp[c * g.cs];
    for (int64_t j = 0; j < g.C; ++j) {
      const acc_t sum = window.next();
      if (j > 0) {
        const int64_t tin = j + g.lo, tout = j - g.hi - 1;
        if (tin < g.C) tsum += tp[tin * g.cs];
        if (tout >= 0) tsum -= tp[tout * g.cs];
      }
      const acc_t p = neg_pow<acc_t>(k + coef * sum, beta, mode);
      dp[j * g.cs] = static_cast<scalar_t>(static_cast<acc_t>(gp[j * g.cs]) * p -
                                           coef2 * static_cast<acc_t>(xp[j * g.cs]) * tsum);
    }
  }
}

// ---- Variant for channels-last (issue 10, item 2): a block per pixel, its C channels in shared memory ----
// Neighbouring threads take neighbouring channels of one pixel, so every load and store is coalesced
// (the kernels above give each thread a pixel, whose channels are C elements apart from the next
// thread's). Each window sum is read from shared memory: O(size) per element, cheap for LRN's n = 5.
// Compiled and CPU-reviewed only: opt-in with LIGHTCNN_CUDA_LRN_CHANNELS_LAST=block until a GPU measures it.

template <typename acc_t>
__device__ __forceinline__ acc_t window_sum_shared(const acc_t* v, int64_t c, int64_t left, int64_t right, int64_t C) {
  acc_t sum = 0;
  const int64_t j1 = min(c + right, C - 1);
  for (int64_t j = max(c - left, int64_t(0)); j <= j1; ++j) sum += v[j];
  return sum;
}

template <typename scalar_t, typename acc_t>
__global__ void lrn_forward_cl_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Geometry g,
                                      acc_t coef, acc_t k, acc_t beta, PowMode mode) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sq = reinterpret_cast<acc_t*>(smem_raw);
  for (int64_t p = blockIdx.x; p < g.NS; p += gridDim.x) {
    const scalar_t* xp = x + p * g.C;
    scalar_t* yp = y + p * g.C;
    __syncthreads();  // the previous pixel's reads of sq are done
    for (int64_t c = threadIdx.x; c < g.C; c += blockDim.x) {
      const acc_t a = static_cast<acc_t>(xp[c]);
      sq[c] = a * a;
    }
    __syncthreads();
    for (int64_t c = threadIdx.x; c < g.C; c += blockDim.x) {
      const acc_t sum = window_sum_shared(sq, c, g.lo, g.hi, g.C);
      yp[c] = static_cast<scalar_t>(static_cast<acc_t>(xp[c]) * neg_pow<acc_t>(k + coef * sum, beta, mode));
    }
  }
}

// The whole backward in one pass per pixel: s^-beta and t = g a s^-beta / s into shared memory, then
// da_j = g_j s_j^-beta - coef2 * a_j * sum of t over the mirrored window [j - hi, j + lo].
template <typename scalar_t, typename acc_t>
__global__ void lrn_backward_cl_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                       scalar_t* __restrict__ dx, Geometry g, acc_t coef, acc_t coef2, acc_t k,
                                       acc_t beta, PowMode mode) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sq = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* pw = sq + g.C;
  acc_t* t = pw + g.C;
  for (int64_t p = blockIdx.x; p < g.NS; p += gridDim.x) {
    const scalar_t *xp = x + p * g.C, *gp = grad + p * g.C;
    scalar_t* dp = dx + p * g.C;
    __syncthreads();
    for (int64_t c = threadIdx.x; c < g.C; c += blockDim.x) {
      const acc_t a = static_cast<acc_t>(xp[c]);
      sq[c] = a * a;
    }
    __syncthreads();
    for (int64_t c = threadIdx.x; c < g.C; c += blockDim.x) {
      const acc_t sc = k + coef * window_sum_shared(sq, c, g.lo, g.hi, g.C);
      const acc_t pc = neg_pow<acc_t>(sc, beta, mode);
      pw[c] = pc;
      t[c] = static_cast<acc_t>(gp[c]) * static_cast<acc_t>(xp[c]) * pc / sc;
    }
    __syncthreads();
    for (int64_t j = threadIdx.x; j < g.C; j += blockDim.x) {
      const acc_t tsum = window_sum_shared(t, j, g.hi, g.lo, g.C);
      dp[j] = static_cast<scalar_t>(static_cast<acc_t>(gp[j]) * pw[j] - coef2 * static_cast<acc_t>(xp[j]) * tsum);
    }
  }
}

// Whether the channels-last variant serves this call: asked for, channels-last, and `arrays` per-channel
// acc_t arrays fit in the default 48 KiB of shared memory.
bool use_cl_variant(const LrnView& v, size_t acc_bytes, int arrays) {
  const char* opt = std::getenv("LIGHTCNN_CUDA_LRN_CHANNELS_LAST");
  return opt != nullptr && std::strcmp(opt, "block") == 0 && v.channels_last &&
         static_cast<size_t>(v.C) * acc_bytes * arrays <= 48 * 1024;
}

unsigned cl_threads(int64_t C) { return static_cast<unsigned>(std::min<int64_t>(256, (C + 31) / 32 * 32)); }

unsigned cl_blocks(int64_t pixels) { return static_cast<unsigned>(std::min<int64_t>(pixels, int64_t(1) << 20)); }

Geometry geometry(const LrnView& v, int64_t size) {
  return {v.N * v.S, v.C, v.S, v.channels_last ? 1 : v.S, v.channels_last ? v.C : 1, size / 2, (size - 1) / 2};
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
    if (use_cl_variant(v, sizeof(acc_t), 1)) {
      lrn_forward_cl_kernel<scalar_t, acc_t><<<cl_blocks(g.NS), cl_threads(g.C), g.C * sizeof(acc_t), stream>>>(
          v.x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, static_cast<acc_t>(alpha / size),
          static_cast<acc_t>(k), static_cast<acc_t>(beta), mode);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    lrn_forward_kernel<scalar_t, acc_t><<<blocks_for(g.NS), kThreads, 0, stream>>>(
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
    if (use_cl_variant(v, sizeof(acc_t), 3)) {
      lrn_backward_cl_kernel<scalar_t, acc_t><<<cl_blocks(g.NS), cl_threads(g.C), 3 * g.C * sizeof(acc_t), stream>>>(
          grad.const_data_ptr<scalar_t>(), v.x.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(), g,
          coef, coef2, static_cast<acc_t>(k), static_cast<acc_t>(beta), mode);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    // Scratch for t, laid out like x (its strides are those of x: same dense layout, same sizes).
    at::Tensor t = at::empty_like(v.x, v.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    lrn_backward_t_kernel<scalar_t, acc_t><<<blocks_for(g.NS), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), v.x.const_data_ptr<scalar_t>(), t.mutable_data_ptr<acc_t>(), g, coef,
        static_cast<acc_t>(k), static_cast<acc_t>(beta), mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    lrn_backward_grad_kernel<scalar_t, acc_t><<<blocks_for(g.NS), kThreads, 0, stream>>>(
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
