// CUDA kernels of the fused pre-activation BN -> ReLU -> Conv2d (torch.ops.lightcnn.bn_relu_conv2d).
// The forward/backward logic is shared with the CPU in ../bn_relu_conv.h; here are its primitives.
//
// Design: the two per-channel reductions use the whole GPU in both layouts, and the two
// elementwise passes run without a 64-bit division per element.
//   stats_affine  per-channel mean and biased variance: shifted sums (of x - K and (x - K)^2, K near the
//                 channel's mean, so no cancellation whatever the mean) over many blocks per channel, then a
//                 combining pass, one warp per channel, which also computes the channel's scale, shift and
//                 invstd (per_channel.cuh): two launches
//   reduce_coefs  per channel: sum dz and sum dz * (x - mean), dz = g * [x * scale_c + shift_c > 0] (the ReLU
//                 mask folded into the reduction), the same two passes, the combining one computing the BN
//                 backward's coefficients
//   bn_relu       elementwise y = max(x * scale_c + shift_c, 0), then WRN's dropout (the keep mask, 1 byte)
//   grad_input    elementwise grad_x = dz * alpha_c + x * beta_c + gamma_c
// The dropout is fused into bn_relu, reduce_coefs and grad_input (Drop in ../bn_relu_conv.h), where applying it
// with ATen would cost two more passes over y in the forward and over grad_y in the backward.
// The reductions' first pass, by layout:
//   NCHW  grid (C, splits), 256 threads: block (c, k) sums the k-th of `splits` consecutive ranges of the
//         channel's N*H*W values; neighbouring threads read neighbouring addresses, and a thread walks its
//         values by adding to an offset (no division per value)
//   NHWC  grid (ceil(C / TX), splits), threads (TX, TY), TX = min(32, C rounded up to a power of 2): a
//         warp reads TX neighbouring channels of 32 / TX neighbouring pixels (coalesced); block (j, k) takes
//         every splits-th group of TY pixels, then sums its TY rows in shared memory
// `splits` gives each block at least kValuesPerBlock values of a channel, so a WRN-28-10 layer at batch
// 128 runs thousands of blocks rather than one per channel. The elementwise kernels find
// an element's channel with a multiply-high and a shift (FastDiv) when the tensor has < 2^31 elements, and
// load and store 16 bytes at a time (4 floats, 8 bfloat16) when C (channels-last) or H*W (NCHW) allows.
// The alternative of ATen's SyncBatchNorm primitives for the reductions stays available (opt-in, below),
// so that the GPU check measures both in one run; these kernels keep what ATen's cannot: the ReLU mask
// folded into the backward reduction (ATen's needs a masked copy of the gradient first).
//
// Elements are addressed as (n, c, s) with s the flattened H*W, in NCHW ((n*C + c)*S + s) or NHWC
// ((n*S + s)*C + c) memory. Arithmetic is in at::acc_type (float for half/bfloat16/float, double for
// double); the pre-activation v = fma(x, scale, shift) is computed the same way in every kernel so that
// the backward's ReLU mask is bit-identical to the forward's.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/batch_norm_backward_reduce.h>
#include <ATen/ops/batch_norm_stats.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/where.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../bn_relu_conv.h"
#include "indexing.cuh"
#include "per_channel.cuh"
#include "per_channel.h"

namespace lightcnn {
namespace bn_relu_conv {
namespace {

// at::cuda::getCurrentCUDAStream() is c10::cuda::getCurrentCUDAStream(); its c10 header spares the
// .cu ATen/cuda/CUDAContext.h, which needs the cuSPARSE/cuBLAS headers a bare toolkit may lack.
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

constexpr int kReduceThreads = 256;  // a multiple of the warp size
constexpr int kElementwiseThreads = 256;
constexpr int64_t kValuesPerBlock = 4096;  // of one channel, at least, in a reduction block
constexpr int64_t kMaxSplits = 1024;       // blocks per channel, at most

struct Layout {
  int64_t N, C, S;
  bool channels_last;
  __device__ __forceinline__ int64_t channel(int64_t i) const { return channels_last ? i % C : (i / S) % C; }
  __device__ __forceinline__ int64_t first(int64_t c) const { return channels_last ? c : c * S; }  // (0, c, 0)
};

Layout layout_of(const at::Tensor& x) {
  return Layout{x.size(0), x.size(1), x.size(2) * x.size(3), is_channels_last(x)};
}

// The channel of element i: 32-bit with FastDiv (tensors of < 2^31 elements), else 64-bit division.
struct Channel32 {
  FastDiv by_S, by_C;
  uint32_t C;
  bool channels_last;
  explicit Channel32(const Layout& L)
      : by_S(L.S), by_C(L.C), C(static_cast<uint32_t>(L.C)), channels_last(L.channels_last) {}
  __device__ __forceinline__ uint32_t operator()(uint32_t i) const {
    const uint32_t q = channels_last ? i : by_S(i);  // NCHW: the plane n * C + c
    return q - by_C(q) * C;
  }
  __device__ __forceinline__ bool cl() const { return channels_last; }
};
struct Channel64 {
  Layout L;
  __device__ __forceinline__ int64_t operator()(int64_t i) const { return L.channel(i); }
  __device__ __forceinline__ bool cl() const { return L.channels_last; }
};

// V consecutive elements, loaded and stored as one access of V * sizeof(scalar_t) bytes (16 for the
// vectorised launches). With C % V == 0 (channels-last) or H*W % V == 0 (NCHW), the V elements of a
// vector are channels c0 .. c0 + V - 1 of one pixel, or V positions of one channel c0.
template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Vec {
  scalar_t v[V];
};

// The per-channel parameters of a vector's V elements: in channels-last, channels c0 .. c0 + V - 1, loaded
// as 16-byte vectors (lanes of a warp read neighbouring vectors: coalesced, where a load per channel would
// take V sectors a request); in NCHW the one channel c0, one load (the same address for the whole warp).
template <typename acc_t, int V, typename Chan, typename C0>
__device__ __forceinline__ void load_params(const acc_t* __restrict__ p, C0 c0, const Chan& channel, acc_t (&out)[V]) {
  constexpr int P = 16 / sizeof(acc_t);
  if constexpr (V % P == 0) {
    if (channel.cl()) {
#pragma unroll
      for (int q = 0; q < V / P; ++q) {
        const Vec<acc_t, P> v = reinterpret_cast<const Vec<acc_t, P>*>(p + c0)[q];
#pragma unroll
        for (int k = 0; k < P; ++k) out[q * P + k] = v.v[k];
      }
      return;
    }
  }
  if (channel.cl()) {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = p[c0 + k];
    return;
  }
  const acc_t v = p[c0];
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = v;
}

__device__ __forceinline__ float preact(float x, float s, float b) { return fmaf(x, s, b); }
__device__ __forceinline__ double preact(double x, double s, double b) { return fma(x, s, b); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a 1-D block whose size is a multiple of 32; the result is valid in thread 0. `smem` holds one
// value per warp.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // smem may still be read by a previous block_sum
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  v = threadIdx.x < nwarps ? smem[threadIdx.x] : T(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

// K of channel c's shifted sums: from its first values in sample 0 (contiguous in NCHW, C apart in NHWC).
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t shift_of(const scalar_t* __restrict__ x, const Layout& L, int64_t c) {
  return per_channel::stats_shift<acc_t>(x, L.first(c), L.channels_last ? L.C : 1, L.S);
}

// What the reductions sum per channel, two values per element at `off` (the channel's values only).
// stats: x - K and (x - K)^2, K = the mean of the channel's first values (per_channel::stats_shift).
template <typename scalar_t, typename acc_t>
struct StatsTerms {
  const scalar_t* __restrict__ x;
  Layout L;
  acc_t K = 0;
  __device__ __forceinline__ void begin(int64_t c) { K = shift_of<acc_t>(x, L, c); }
  __device__ __forceinline__ void add(int64_t off, acc_t& a, acc_t& b) const {
    const acc_t d = static_cast<acc_t>(x[off]) - K;
    a += d;
    b += d * d;
  }
};

// The dropout as the kernels apply it (see Drop in ../bn_relu_conv.h): keep == nullptr means none.
template <typename scalar_t, typename acc_t>
struct DropIn {
  const bool* __restrict__ keep;
  acc_t scale;
  // forward: y * m * s, rounded as ATen's y.mul_(m).mul_(s)
  __device__ __forceinline__ scalar_t forward(scalar_t y, int64_t i) const {
    if (keep == nullptr) return y;
    return keep[i] ? static_cast<scalar_t>(static_cast<acc_t>(y) * scale) : scalar_t(0);
  }
  // backward: (g * s) * m, rounded as ATen's g.mul_(s).mul_(m)
  __device__ __forceinline__ acc_t backward(scalar_t g, int64_t i) const {
    if (keep == nullptr) return static_cast<acc_t>(g);
    return keep[i] ? static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(g) * scale)) : acc_t(0);
  }
};

template <typename scalar_t, typename acc_t>
DropIn<scalar_t, acc_t> drop_in(const Drop& drop) {
  if (!drop.mask.defined()) return {nullptr, acc_t(1)};
  return {drop.mask.const_data_ptr<bool>(), static_cast<acc_t>(drop.scale)};
}

// reduce: dz and dz * (x - mean), dz = g' * [fma(x, scale, shift) > 0], g' = g through the dropout.
template <typename scalar_t, typename acc_t>
struct GradTerms {
  const scalar_t* __restrict__ g;
  const scalar_t* __restrict__ x;
  const acc_t* __restrict__ scale;
  const acc_t* __restrict__ shift;
  const acc_t* __restrict__ mean;
  DropIn<scalar_t, acc_t> drop;
  acc_t s = 0, b0 = 0, m = 0;
  __device__ __forceinline__ void begin(int64_t c) {
    s = scale[c];
    b0 = shift[c];
    m = mean[c];
  }
  __device__ __forceinline__ void add(int64_t off, acc_t& a, acc_t& b) const {
    // g (and the dropout's keep byte) are loaded by every lane and the ReLU mask selects afterwards: one
    // coalesced request per warp and instruction, where a load under the mask would be predicated per lane
    // and touch the same sectors anyway
    const acc_t xv = static_cast<acc_t>(x[off]);
    const acc_t gd = drop.backward(g[off], off);
    const acc_t dz = preact(xv, s, b0) > acc_t(0) ? gd : acc_t(0);
    a += dz;
    b += dz * (xv - m);
  }
};

// First pass, NCHW: block (c, k) sums range k of the channel's M = N*S values into part[(0|1, c, k)].
template <typename acc_t, typename Terms>
__global__ void partial_nchw_kernel(Terms terms, Layout L, acc_t* __restrict__ part) {
  __shared__ acc_t smem[32];
  const int64_t c = blockIdx.x, splits = gridDim.y, M = L.N * L.S;
  const int64_t per = (M + splits - 1) / splits, m0 = blockIdx.y * per, m1 = min(M, m0 + per);
  terms.begin(c);
  acc_t a = 0, b = 0;
  int64_t m = m0 + threadIdx.x;
  if (m < m1) {
    // value m is at (n * C + c) * S + s with n = m / S, s = m % S; step blockDim.x values at a time
    int64_t n = m / L.S, s = m - n * L.S, off = (n * L.C + c) * L.S + s;
    const int64_t step_n = blockDim.x / L.S, step_s = blockDim.x - step_n * L.S;
    const int64_t step_off = step_n * L.C * L.S + step_s, wrap = (L.C - 1) * L.S;  // s passing S: next image
    for (; m < m1; m += blockDim.x) {
      terms.add(off, a, b);
      s += step_s;
      off += step_off;
      if (s >= L.S) {
        s -= L.S;
        off += wrap;
      }
    }
  }
  a = block_sum(a, smem);
  b = block_sum(b, smem);
  if (threadIdx.x == 0) {
    part[c * splits + blockIdx.y] = a;
    part[(L.C + c) * splits + blockIdx.y] = b;
  }
}

// First pass, NHWC: threads (TX, TY); block (j, k) takes channels [j*TX, j*TX + TX) of the pixel groups
// k, k + splits, ... (TY pixels a group), then sums its TY rows.
template <typename acc_t, typename Terms>
__global__ void partial_nhwc_kernel(Terms terms, Layout L, acc_t* __restrict__ part) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sa = reinterpret_cast<acc_t*>(smem_raw);  // [TY][TX]
  acc_t* sb = sa + blockDim.x * blockDim.y;
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x, splits = gridDim.y;
  const int64_t M = L.N * L.S, step = splits * blockDim.y;
  acc_t a = 0, b = 0;
  if (c < L.C) {
    terms.begin(c);
    int64_t m = blockIdx.y * static_cast<int64_t>(blockDim.y) + threadIdx.y, off = m * L.C + c;
    for (const int64_t step_off = step * L.C; m < M; m += step, off += step_off) terms.add(off, a, b);
  }
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  sa[t] = a;
  sb[t] = b;
  __syncthreads();
  if (threadIdx.y == 0 && c < L.C) {
    for (unsigned y = 1; y < blockDim.y; ++y) {
      a += sa[y * blockDim.x + threadIdx.x];
      b += sb[y * blockDim.x + threadIdx.x];
    }
    part[c * splits + blockIdx.y] = a;
    part[(L.C + c) * splits + blockIdx.y] = b;
  }
}

// Second pass: a warp per channel sums the channel's `splits` partial pairs, then does the channel's
// per-channel step (per_channel.cuh) in the same launch.
// stats: mean and biased variance, then scale, shift and invstd (affine_at).
template <typename scalar_t, typename acc_t>
__global__ void finish_stats_kernel(const acc_t* __restrict__ part, int64_t splits, const scalar_t* __restrict__ x,
                                    Layout L, const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                    acc_t eps, acc_t* __restrict__ mean, acc_t* __restrict__ var,
                                    acc_t* __restrict__ scale, acc_t* __restrict__ shift, acc_t* __restrict__ invstd) {
  const int64_t c = blockIdx.x;
  acc_t a = 0, b = 0;
  for (int64_t k = threadIdx.x; k < splits; k += 32) {
    a += part[c * splits + k];
    b += part[(L.C + c) * splits + k];
  }
  a = warp_sum(a);
  b = warp_sum(b);
  if (threadIdx.x == 0) {
    const acc_t M = static_cast<acc_t>(L.N * L.S), d = a / M;  // d: mean - K
    const acc_t mu = shift_of<acc_t>(x, L, c) + d, v = b / M - d * d;
    const acc_t var_c = v > acc_t(0) ? v : acc_t(0);
    mean[c] = mu;
    var[c] = var_c;
    per_channel::affine_at(c, mu, var_c, weight, bias, eps, scale, shift, invstd);
  }
}

// reduce: sum dz and sum dz * (x - mean) (grad_bias and the numerator of grad_weight), then the BN
// backward's coefficients (coefs_at).
template <typename acc_t>
__global__ void finish_sums_kernel(const acc_t* __restrict__ part, int64_t splits, int64_t C,
                                   const acc_t* __restrict__ invstd, const acc_t* __restrict__ mean,
                                   const acc_t* __restrict__ weight, acc_t inv_M, bool training,
                                   acc_t* __restrict__ sum_dz, acc_t* __restrict__ alpha, acc_t* __restrict__ beta,
                                   acc_t* __restrict__ gamma, acc_t* __restrict__ grad_weight) {
  const int64_t c = blockIdx.x;
  acc_t a = 0, b = 0;
  for (int64_t k = threadIdx.x; k < splits; k += 32) {
    a += part[c * splits + k];
    b += part[(C + c) * splits + k];
  }
  a = warp_sum(a);
  b = warp_sum(b);
  if (threadIdx.x == 0) {
    sum_dz[c] = a;
    per_channel::coefs_at(c, a, b, invstd[c], mean[c], weight, inv_M, training, alpha, beta, gamma, grad_weight);
  }
}

// Launches the first pass for `terms` over x's layout into a new (2, C, splits) buffer; returns it and splits.
template <typename acc_t, typename Terms>
std::pair<at::Tensor, int64_t> partial_sums(const Terms& terms, const Layout& L, const at::TensorOptions& acc_options) {
  const int64_t M = L.N * L.S;
  TORCH_CHECK(L.C < (int64_t(1) << 31), "bn_relu_conv2d: too many channels for the CUDA reduction (", L.C, ")");
  if (L.channels_last) {
    int tx = 1;
    while (tx < 32 && tx < L.C) tx *= 2;
    const int ty = kReduceThreads / tx;
    const int64_t splits = std::clamp<int64_t>(M / (ty * 16), 1, kMaxSplits);
    at::Tensor part = at::empty({2, L.C, splits}, acc_options);
    const dim3 grid(static_cast<unsigned>((L.C + tx - 1) / tx), static_cast<unsigned>(splits));
    partial_nhwc_kernel<acc_t, Terms><<<grid, dim3(tx, ty), 2 * kReduceThreads * sizeof(acc_t), current_stream()>>>(
        terms, L, part.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {part, splits};
  }
  const int64_t splits = std::clamp<int64_t>(M / kValuesPerBlock, 1, kMaxSplits);
  at::Tensor part = at::empty({2, L.C, splits}, acc_options);
  const dim3 grid(static_cast<unsigned>(L.C), static_cast<unsigned>(splits));
  partial_nchw_kernel<acc_t, Terms><<<grid, kReduceThreads, 0, current_stream()>>>(terms, L,
                                                                                    part.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {part, splits};
}

template <typename scalar_t, typename acc_t, int V, typename index_t, typename Chan>
__global__ void bn_relu_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                               const acc_t* __restrict__ scale, const acc_t* __restrict__ shift, index_t numel,
                               Chan channel, DropIn<scalar_t, acc_t> drop) {
  using VecT = Vec<scalar_t, V>;
  grid_stride(numel / V, [&](index_t i) {
    const index_t e = i * V;
    const auto c0 = channel(e);
    const VecT in = reinterpret_cast<const VecT*>(x)[i];
    acc_t sc[V], sh[V];
    load_params<acc_t, V>(scale, c0, channel, sc);
    load_params<acc_t, V>(shift, c0, channel, sh);
    VecT out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t v = preact(static_cast<acc_t>(in.v[k]), sc[k], sh[k]);
      // NaN propagates as in F.relu
      out.v[k] = drop.forward(static_cast<scalar_t>(v > acc_t(0) ? v : (v != v ? v : acc_t(0))), e + k);
    }
    reinterpret_cast<VecT*>(y)[i] = out;
  });
}

template <typename scalar_t, typename acc_t, int V, typename index_t, typename Chan>
__global__ void grad_input_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                  scalar_t* __restrict__ gx, const acc_t* __restrict__ scale,
                                  const acc_t* __restrict__ shift, const acc_t* __restrict__ alpha,
                                  const acc_t* __restrict__ beta, const acc_t* __restrict__ gamma, index_t numel,
                                  Chan channel, DropIn<scalar_t, acc_t> drop) {
  using VecT = Vec<scalar_t, V>;
  grid_stride(numel / V, [&](index_t i) {
    const index_t e = i * V;
    const auto c0 = channel(e);
    const VecT gv = reinterpret_cast<const VecT*>(g)[i], xv = reinterpret_cast<const VecT*>(x)[i];
    acc_t sc[V], sh[V], al[V], be[V], ga[V];
    load_params<acc_t, V>(scale, c0, channel, sc);
    load_params<acc_t, V>(shift, c0, channel, sh);
    load_params<acc_t, V>(alpha, c0, channel, al);
    load_params<acc_t, V>(beta, c0, channel, be);
    load_params<acc_t, V>(gamma, c0, channel, ga);
    VecT out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t xk = static_cast<acc_t>(xv.v[k]);
      const acc_t dz = preact(xk, sc[k], sh[k]) > acc_t(0) ? drop.backward(gv.v[k], e + k) : acc_t(0);
      out.v[k] = static_cast<scalar_t>(dz * al[k] + (xk * be[k] + ga[k]));
    }
    reinterpret_cast<VecT*>(gx)[i] = out;
  });
}

// g = g * [x * scale_c + shift_c > 0], in place: the ReLU's backward with the mask recomputed exactly as
// the forward computed it (the ATen-reductions variant below hands the masked gradient to ATen).
template <typename scalar_t, typename acc_t, typename index_t, typename Chan>
__global__ void relu_mask_kernel(scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                 const acc_t* __restrict__ scale, const acc_t* __restrict__ shift, index_t numel,
                                 Chan channel) {
  grid_stride(numel, [&](index_t i) {
    const auto c = channel(i);
    if (!(preact(static_cast<acc_t>(x[i]), scale[c], shift[c]) > acc_t(0))) g[i] = scalar_t(0);
  });
}

unsigned elementwise_blocks(int64_t numel) {
  return static_cast<unsigned>(std::max<int64_t>(
      1, std::min<int64_t>((numel + kElementwiseThreads - 1) / kElementwiseThreads, int64_t(1) << 16)));
}

// Calls launch(index_t(numel), channel functor) with 32-bit indices and FastDiv when numel < 2^31.
template <typename F>
void with_index(const Layout& L, int64_t numel, const F& launch) {
  if (fits_32_bits(numel))
    launch(static_cast<uint32_t>(numel), Channel32(L));
  else
    launch(numel, Channel64{L});
}

// 16-byte vectors (Vec) when the layout keeps a vector in one pixel or one channel and every pointer (the
// per-channel parameters' too) is 16-byte aligned; else one element at a time. Calls
// launch(std::integral_constant<int, V>).
template <typename scalar_t, typename F>
void with_vector(const Layout& L, int64_t numel, std::initializer_list<const void*> ptrs, const F& launch) {
  constexpr int V = 16 / sizeof(scalar_t);
  bool ok = numel % V == 0 && (L.channels_last ? L.C : L.S) % V == 0;
  for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  if (ok)
    launch(std::integral_constant<int, V>());
  else
    launch(std::integral_constant<int, 1>());
}

#define LIGHTCNN_DISPATCH(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), name, __VA_ARGS__)

// The training forward's statistics and affine step: the first pass, then one finishing launch.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_affine_cuda(const at::Tensor& x,
                                                                                         const at::Tensor& weight_,
                                                                                         const at::Tensor& bias_,
                                                                                         double eps) {
  const Layout L = layout_of(x);
  const auto sdt = stats_dtype(x.scalar_type());
  at::Tensor mean = at::empty({L.C}, x.options().dtype(sdt));
  const at::Tensor weight = per_channel::as_stats(weight_, mean), bias = per_channel::as_stats(bias_, mean);
  at::Tensor var = at::empty_like(mean), scale = at::empty_like(mean), shift = at::empty_like(mean),
             invstd = at::empty_like(mean);
  LIGHTCNN_DISPATCH(x, "bn_relu_conv2d_stats_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const StatsTerms<scalar_t, acc_t> terms{x.const_data_ptr<scalar_t>(), L};
    auto [part, splits] = partial_sums<acc_t>(terms, L, mean.options());
    finish_stats_kernel<scalar_t, acc_t><<<static_cast<unsigned>(L.C), 32, 0, current_stream()>>>(
        part.const_data_ptr<acc_t>(), splits, x.const_data_ptr<scalar_t>(), L, per_channel::ptr_or_null<acc_t>(weight),
        per_channel::ptr_or_null<acc_t>(bias), static_cast<acc_t>(eps), mean.mutable_data_ptr<acc_t>(),
        var.mutable_data_ptr<acc_t>(), scale.mutable_data_ptr<acc_t>(), shift.mutable_data_ptr<acc_t>(),
        invstd.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var, scale, shift, invstd};
}

at::Tensor bn_relu_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const Drop& drop) {
  const Layout L = layout_of(x);
  at::Tensor y = at::empty_like(x, x.options(), format_of(x));
  const int64_t numel = x.numel();
  if (numel == 0) return y;
  LIGHTCNN_DISPATCH(x, "bn_relu_conv2d_bn_relu_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    with_vector<scalar_t>(L, numel, {xp, yp, scale.const_data_ptr(), shift.const_data_ptr()}, [&](auto vec) {
      with_index(L, numel, [&](auto n, auto channel) {
        bn_relu_kernel<scalar_t, acc_t, decltype(vec)::value, decltype(n), decltype(channel)>
            <<<elementwise_blocks(numel / vec), kElementwiseThreads, 0, current_stream()>>>(
                xp, yp, scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(), n, channel,
                drop_in<scalar_t, acc_t>(drop));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return y;
}

// The backward's sums and the BN backward's coefficients: the first pass, then one finishing launch.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> reduce_coefs_cuda(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight_, bool training, const Drop& drop) {
  const Layout L = layout_of(x);
  const at::Tensor weight = per_channel::as_stats(weight_, scale);
  at::Tensor sum_dz = at::empty({L.C}, scale.options()), alpha = at::empty_like(sum_dz),
             beta = at::empty_like(sum_dz), gamma = at::empty_like(sum_dz), grad_weight = at::empty_like(sum_dz);
  LIGHTCNN_DISPATCH(x, "bn_relu_conv2d_reduce_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const GradTerms<scalar_t, acc_t> terms{g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                           scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(),
                                           mean.const_data_ptr<acc_t>(), drop_in<scalar_t, acc_t>(drop)};
    auto [part, splits] = partial_sums<acc_t>(terms, L, scale.options());
    finish_sums_kernel<acc_t><<<static_cast<unsigned>(L.C), 32, 0, current_stream()>>>(
        part.const_data_ptr<acc_t>(), splits, L.C, invstd.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(),
        per_channel::ptr_or_null<acc_t>(weight), acc_t(1) / static_cast<acc_t>(L.N * L.S), training,
        sum_dz.mutable_data_ptr<acc_t>(), alpha.mutable_data_ptr<acc_t>(), beta.mutable_data_ptr<acc_t>(),
        gamma.mutable_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {alpha, beta, gamma, grad_weight, sum_dz};
}

at::Tensor grad_input_cuda(const at::Tensor& g, const at::Tensor& x, const at::Tensor& scale,
                           const at::Tensor& shift, const at::Tensor& alpha, const at::Tensor& beta,
                           const at::Tensor& gamma, const Drop& drop) {
  const Layout L = layout_of(x);
  at::Tensor gx = at::empty_like(x, x.options(), format_of(x));
  const int64_t numel = x.numel();
  if (numel == 0) return gx;
  LIGHTCNN_DISPATCH(x, "bn_relu_conv2d_grad_input_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = gx.mutable_data_ptr<scalar_t>();
    with_vector<scalar_t>(L, numel,
                          {gp, xp, op, scale.const_data_ptr(), shift.const_data_ptr(), alpha.const_data_ptr(),
                           beta.const_data_ptr(), gamma.const_data_ptr()},
                          [&](auto vec) {
      with_index(L, numel, [&](auto n, auto channel) {
        grad_input_kernel<scalar_t, acc_t, decltype(vec)::value, decltype(n), decltype(channel)>
            <<<elementwise_blocks(numel / vec), kElementwiseThreads, 0, current_stream()>>>(
                gp, xp, op, scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(),
                alpha.const_data_ptr<acc_t>(), beta.const_data_ptr<acc_t>(), gamma.const_data_ptr<acc_t>(), n,
                channel, drop_in<scalar_t, acc_t>(drop));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return gx;
}

// stats and reduce: none; stats_affine serves every training forward, reduce_coefs every backward.
const Prims kCudaPrims{nullptr, bn_relu_cuda, nullptr, grad_input_cuda, /*fuses_dropout=*/true, per_channel::affine,
                       per_channel::coefs, stats_affine_cuda, reduce_coefs_cuda};

// ---- Variant: the two per-channel reductions on ATen's SyncBatchNorm primitives ----
// at::batch_norm_stats (Welford) and at::batch_norm_backward_reduce use many blocks per channel and have
// channels-last kernels with coalesced loads along C, as the kernels above do; the backward needs the
// masked gradient written first (relu_mask_kernel), one extra pass. The elementwise passes stay ours.
// Opt-in, LIGHTCNN_CUDA_BN_REDUCTIONS=aten (read at every call), so that benchmarks/gpu_check.sh measures
// both designs in one run; ATen's batch_norm_stats has no CPU kernel, so the CUDA emulator cannot run it.

std::tuple<at::Tensor, at::Tensor> stats_aten(const at::Tensor& x) {
  // eps = 0: invstd = 1/sqrt(var), and ATen returns invstd = 0 for a constant channel (var = 0).
  auto [mean, invstd] = at::batch_norm_stats(x, /*epsilon=*/0.0);
  at::Tensor var = at::where(invstd == 0, at::zeros_like(invstd), invstd.pow(-2));
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> reduce_aten(const at::Tensor& g, const at::Tensor& x, const at::Tensor& scale,
                                               const at::Tensor& shift, const at::Tensor& mean, const Drop& drop) {
  no_fused_drop(drop, "reduce_aten");  // it writes dz into g, which grad_input would drop a second time
  const Layout L = layout_of(x);
  const int64_t numel = x.numel();
  if (numel > 0) {
    // dz in place of grad_y (a buffer of backward()'s own); grad_input then re-applies the same mask, a no-op.
    LIGHTCNN_DISPATCH(x, "bn_relu_conv2d_relu_mask_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      with_index(L, numel, [&](auto n, auto channel) {
        relu_mask_kernel<scalar_t, acc_t, decltype(n), decltype(channel)>
            <<<elementwise_blocks(numel), kElementwiseThreads, 0, current_stream()>>>(
                g.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(),
                shift.const_data_ptr<acc_t>(), n, channel);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  // sum dz and sum dz * (x - mean); invstd and weight only scale gradients that are not asked for. A
  // weight in the statistics' dtype tells ATen that a half input has float statistics (its mixed-type path).
  auto r = at::batch_norm_backward_reduce(g, x, mean, /*invstd=*/scale, /*weight=*/scale, /*input_g=*/true,
                                          /*weight_g=*/false, /*bias_g=*/false);
  return {std::get<0>(r), std::get<1>(r)};
}

const Prims kCudaAtenPrims{stats_aten,         bn_relu_cuda,          reduce_aten, grad_input_cuda,
                           /*fuses_dropout=*/false, per_channel::affine, per_channel::coefs};

const Prims& cuda_prims() {
  const char* v = std::getenv("LIGHTCNN_CUDA_BN_REDUCTIONS");
  return (v != nullptr && std::strcmp(v, "aten") == 0) ? kCudaAtenPrims : kCudaPrims;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_conv2d_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool training, double eps,
    const std::optional<at::Tensor>& drop_mask, double drop_rate) {
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  return forward(cuda_prims(), "bn_relu_conv2d", input, weight, bias, running_mean, running_var, conv_weight,
                 conv_bias, stride, padding, dilation, groups, training, eps, drop_mask, drop_rate, c10::DeviceType::CUDA,
                 {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& conv_weight, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, bool training, double eps, bool has_conv_bias, const std::optional<at::Tensor>& drop_mask,
    double drop_rate) {
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  return backward(cuda_prims(), "bn_relu_conv2d_backward", grad_output, input, weight, bias, mean, var, conv_weight,
                  stride, padding, dilation, groups, training, eps, has_conv_bias, drop_mask, drop_rate, c10::DeviceType::CUDA,
                  {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
}

}  // namespace
}  // namespace bn_relu_conv
}  // namespace lightcnn

TORCH_LIBRARY_IMPL(lightcnn, CUDA, m) {
  m.impl("bn_relu_conv2d", &lightcnn::bn_relu_conv::bn_relu_conv2d_cuda);
  m.impl("bn_relu_conv2d_backward", &lightcnn::bn_relu_conv::bn_relu_conv2d_backward_cuda);
}
