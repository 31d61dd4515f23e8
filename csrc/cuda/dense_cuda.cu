// CUDA kernels of the memory-efficient DenseNet op (torch.ops.lightcnn.dense_bn_relu_conv2d). The logic is
// shared with the CPU in ../dense.h (convolution: cuDNN; scale/shift and the backward's coefficients:
// per_channel_cuda.cu); here are the four list-aware primitives. One launch serves up to kMaxPieces
// features: blockIdx.y is the feature, and the grid-stride loops walk that feature's own elements, so a
// feature is read coalesced in its layout and its slice of the (N, C, H, W) buffer is addressed as
//   NCHW: (n * C + c0 + c) * S + s        NHWC: (n * S + s) * C + c0 + c        (S = H * W)
//   bn_relu_into  y[slice] = max(fma(x, scale, shift), 0)
//   reduce_from   per channel: sum dz and sum dz * (x - mean), dz = g[slice] * [fma(x, scale, shift) > 0];
//                 a channel's M = N * S values are split over several blocks (atomicAdd of the partial
//                 sums: the order of float additions, and so the last bits, may vary between runs)
//   grad_inputs   grad_x = dz * alpha + x * beta + gamma, into a new tensor per feature
//   stats_from    per channel: mean and biased variance from shifted sums (x - K, K near the channel's
//                 mean), split and added as reduce_from, then one finishing launch
// The reductions follow the layout: NCHW, a block sums (a split of) one channel's contiguous rows; NHWC, a
// block's lanes run along the channels of a pixel (a warp reads one contiguous run of a pixel's channels),
// each thread sums one channel over many pixels, and the block adds its rows per channel (shared memory).
// Arithmetic is in at::acc_type (float for half/bfloat16/float, double for double); the pre-activation
// is computed with the same fma in every kernel, so that the backward's ReLU mask is the forward's.
// Index arithmetic: the elementwise kernels divide by k and S with FastDiv (indexing.cuh) when the
// buffer has < 2^31 elements; the reductions walk their values by adding to offsets (walk_channel).
#include "../dense.h"
#include "indexing.cuh"
#include "per_channel.cuh"
#include "per_channel.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace lightcnn {
namespace dense {
namespace {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

constexpr int kMaxPieces = 64;  // features per launch (kernel parameters stay under 4 KiB)
constexpr int kThreads = 256;

struct Pieces {
  const void* x[kMaxPieces];  // the features
  void* out[kMaxPieces];      // their gradients (grad_inputs only)
  int64_t c0[kMaxPieces];     // first channel of each feature in the concatenation
  int64_t k[kMaxPieces];      // its channels
  FastDiv by_k[kMaxPieces];   // division by k (32-bit launches)
  int64_t N, C, S;
  FastDiv by_S;
  int count;  // features in this launch
  bool channels_last;
};

// n / d: FastDiv for 32-bit indices, a plain division for 64-bit ones.
__device__ __forceinline__ uint32_t div(uint32_t n, const FastDiv& fd, int64_t) { return fd(n); }
__device__ __forceinline__ int64_t div(int64_t n, const FastDiv&, int64_t d) { return n / d; }

// The buffer offset of element i of feature j (i in the feature's own layout) and its channel in the concatenation.
template <typename index_t>
__device__ __forceinline__ index_t buffer_offset(const Pieces& P, int j, index_t i, index_t& c) {
  const index_t k = static_cast<index_t>(P.k[j]), c0 = static_cast<index_t>(P.c0[j]);
  const index_t C = static_cast<index_t>(P.C), S = static_cast<index_t>(P.S);
  if (P.channels_last) {
    const index_t pixel = div(i, P.by_k[j], P.k[j]), lc = i - pixel * k;
    c = c0 + lc;
    return pixel * C + c;
  }
  const index_t row = div(i, P.by_S, P.S), s = i - row * S, n = div(row, P.by_k[j], P.k[j]);
  c = c0 + (row - n * k);
  return (n * C + c) * S + s;
}

__device__ __forceinline__ float preact(float x, float s, float b) { return fmaf(x, s, b); }
__device__ __forceinline__ double preact(double x, double s, double b) { return fma(x, s, b); }

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void bn_relu_into_kernel(Pieces P, scalar_t* __restrict__ y, const acc_t* __restrict__ scale,
                                    const acc_t* __restrict__ shift) {
  const int j = blockIdx.y;
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(P.x[j]);
  const index_t numel = static_cast<index_t>(P.N * P.k[j] * P.S);
  grid_stride(numel, [&](index_t i) {
    index_t c;
    const index_t o = buffer_offset(P, j, i, c);
    const acc_t v = preact(static_cast<acc_t>(x[i]), scale[c], shift[c]);
    y[o] = static_cast<scalar_t>(v > acc_t(0) ? v : (v != v ? v : acc_t(0)));  // NaN propagates as in F.relu
  });
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void grad_inputs_kernel(Pieces P, const scalar_t* __restrict__ g, const acc_t* __restrict__ scale,
                                   const acc_t* __restrict__ shift, const acc_t* __restrict__ alpha,
                                   const acc_t* __restrict__ beta, const acc_t* __restrict__ gamma) {
  const int j = blockIdx.y;
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(P.x[j]);
  scalar_t* __restrict__ gx = static_cast<scalar_t*>(P.out[j]);
  const index_t numel = static_cast<index_t>(P.N * P.k[j] * P.S);
  grid_stride(numel, [&](index_t i) {
    index_t c;
    const index_t o = buffer_offset(P, j, i, c);
    // g loaded by every lane, masked or not: one request per warp, not one per pattern of the mask
    const acc_t xv = static_cast<acc_t>(x[i]), gv = static_cast<acc_t>(g[o]);
    const acc_t dz = preact(xv, scale[c], shift[c]) > acc_t(0) ? gv : acc_t(0);
    gx[i] = static_cast<scalar_t>(dz * alpha[c] + (xv * beta[c] + gamma[c]));
  });
}

template <typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? smem[threadIdx.x] : T(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Calls f(xi, gi) for the values m = m0 + threadIdx.x, m0 + threadIdx.x + blockDim.x, ... < m1 (m = n * S + s)
// of local channel lc of NCHW feature j: xi = (n * k + lc) * S + s is the value's offset in the feature, gi =
// (n * C + c) * S + s in the (N, C, H, W) buffer. Both offsets advance by addition (no division per value).
template <typename F>
__device__ __forceinline__ void walk_channel(const Pieces& P, int j, int64_t lc, int64_t m0, int64_t m1, F&& f) {
  int64_t m = m0 + threadIdx.x;
  if (m >= m1) return;
  const int64_t k = P.k[j], c = P.c0[j] + lc, step = blockDim.x;
  const int64_t n = m / P.S, step_n = step / P.S, step_s = step - step_n * P.S;
  int64_t s = m - n * P.S, xi = (n * k + lc) * P.S + s, gi = (n * P.C + c) * P.S + s;
  const int64_t x_step = step_n * k * P.S + step_s, g_step = step_n * P.C * P.S + step_s;
  const int64_t x_wrap = (k - 1) * P.S, g_wrap = (P.C - 1) * P.S;  // s passing S: the next image
  for (; m < m1; m += step) {
    f(xi, gi);
    xi += x_step;
    gi += g_step;
    s += step_s;
    if (s >= P.S) {
      s -= P.S;
      xi += x_wrap;
      gi += g_wrap;
    }
  }
}

// The reductions' grids. NCHW: blockIdx.y is the feature, blockIdx.x a (local channel, split) pair, splits
// consecutive; blocks past the feature's channels return at once (uniformly: no thread reaches a barrier).
// Each block sums its split of the channel's M = N * S values.
// NHWC: blockIdx.x is a (feature, group of TX channels) pair, features in order, blockIdx.y the split;
// the block's 256 threads are TY rows of TX lanes, TX = min(32, k rounded up to a power of 2), lane l on
// local channel group * TX + l, row r on the pixels split * TY + r + i * splits * TY (i = 0, 1, ...), so
// that the rows of all blocks sweep the feature's memory together.
// Both add the block's sums with atomicAdd (so the order of float additions, and the last bits, may vary
// between runs).

// This block's place in the NCHW grid: feature j, local channel lc (channel c of the concatenation) and its
// range [m0, m1) of the channel's values; false for a block past the feature's channels.
struct BlockSplit {
  int j;
  int64_t lc, c, m0, m1;
};

__device__ __forceinline__ bool block_split(const Pieces& P, int splits, BlockSplit& b) {
  b.j = blockIdx.y;
  b.lc = blockIdx.x / splits;
  if (b.lc >= P.k[b.j]) return false;
  const int64_t split = blockIdx.x % splits, M = P.N * P.S, per = (M + splits - 1) / splits;
  b.c = P.c0[b.j] + b.lc;
  b.m0 = split * per;
  b.m1 = min(M, b.m0 + per);
  return true;
}

// Lanes along the channels of a feature of k channels in the NHWC reductions (host and device).
__host__ __device__ __forceinline__ int nhwc_lanes(int64_t k) {
  int tx = 1;
  while (tx < 32 && tx < k) tx *= 2;
  return tx;
}

// This thread's place in the NHWC grid: feature j, its lanes tx, local channel lc (c in the concatenation;
// active: lc < k) and the first pixel m and pixel step of its row.
struct ThreadCol {
  int j, tx, lane;
  int64_t lc, c, m, step;
  bool active;
};

__device__ __forceinline__ ThreadCol thread_col(const Pieces& P) {
  ThreadCol t{};
  int64_t group = blockIdx.x;
  for (t.j = 0; t.j < P.count - 1; ++t.j) {  // uniform per block: at most kMaxPieces steps
    const int64_t groups = (P.k[t.j] + nhwc_lanes(P.k[t.j]) - 1) / nhwc_lanes(P.k[t.j]);
    if (group < groups) break;
    group -= groups;
  }
  t.tx = nhwc_lanes(P.k[t.j]);
  t.lane = threadIdx.x & (t.tx - 1);
  const int row = threadIdx.x / t.tx, rows = blockDim.x / t.tx;
  t.lc = group * t.tx + t.lane;
  t.c = P.c0[t.j] + t.lc;
  t.active = t.lc < P.k[t.j];
  t.m = blockIdx.y * static_cast<int64_t>(rows) + row;
  t.step = static_cast<int64_t>(gridDim.y) * rows;
  return t;
}

// The NHWC block's sums per channel: each thread's (a, b) added over the block's rows in row order (lanes of
// row 0 hold the results). smem: 2 * blockDim.x values.
template <typename acc_t>
__device__ __forceinline__ void column_sums(const ThreadCol& t, acc_t& a, acc_t& b, acc_t* smem) {
  smem[threadIdx.x] = a;
  smem[blockDim.x + threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.x < t.tx)
    for (unsigned r = t.tx; r < blockDim.x; r += t.tx) {
      a += smem[r + threadIdx.x];
      b += smem[blockDim.x + r + threadIdx.x];
    }
}

// (sum dz, sum dz * (x - mean)) per channel, dz = g * [fma(x, scale, shift) > 0].
template <typename scalar_t, typename acc_t>
__global__ void reduce_from_kernel(Pieces P, const scalar_t* __restrict__ g, const acc_t* __restrict__ scale,
                                   const acc_t* __restrict__ shift, const acc_t* __restrict__ mean,
                                   acc_t* __restrict__ sum_dz, acc_t* __restrict__ sum_dzx, int splits) {
  __shared__ acc_t smem[2 * kThreads];
  if (P.channels_last) {
    const ThreadCol t = thread_col(P);
    const scalar_t* __restrict__ x = static_cast<const scalar_t*>(P.x[t.j]);
    const int64_t k = P.k[t.j], M = P.N * P.S;
    acc_t a1 = 0, a2 = 0;
    if (t.active) {
      const acc_t s = scale[t.c], b = shift[t.c], mu = mean[t.c];
      int64_t xi = t.m * k + t.lc, gi = t.m * P.C + t.c;
      const int64_t x_step = t.step * k, g_step = t.step * P.C;
#pragma unroll 4  // loads of four pixels in flight a thread
      for (int64_t m = t.m; m < M; m += t.step, xi += x_step, gi += g_step) {
        const acc_t xv = static_cast<acc_t>(x[xi]), gv = static_cast<acc_t>(g[gi]);  // unmasked load, as above
        const acc_t dz = preact(xv, s, b) > acc_t(0) ? gv : acc_t(0);
        a1 += dz;
        a2 += dz * (xv - mu);
      }
    }
    column_sums(t, a1, a2, smem);
    if (threadIdx.x < t.tx && t.active) {
      atomicAdd(sum_dz + t.c, a1);
      atomicAdd(sum_dzx + t.c, a2);
    }
    return;
  }
  BlockSplit bs;
  if (!block_split(P, splits, bs)) return;  // uniform per block: no thread reaches block_sum's barriers
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(P.x[bs.j]);
  const int64_t c = bs.c;
  const acc_t s = scale[c], b = shift[c], mu = mean[c];
  acc_t a1 = 0, a2 = 0;
  walk_channel(P, bs.j, bs.lc, bs.m0, bs.m1, [&](int64_t xi, int64_t gi) {
    const acc_t xv = static_cast<acc_t>(x[xi]), gv = static_cast<acc_t>(g[gi]);  // unmasked load, as above
    const acc_t dz = preact(xv, s, b) > acc_t(0) ? gv : acc_t(0);
    a1 += dz;
    a2 += dz * (xv - mu);
  });
  a1 = block_sum(a1, smem);
  a2 = block_sum(a2, smem);
  if (threadIdx.x == 0) {
    atomicAdd(sum_dz + c, a1);
    atomicAdd(sum_dzx + c, a2);
  }
}

// Batch statistics per channel of the concatenation, as shifted sums: sums[(0|1) * C + c] += sum of x - K and
// of (x - K)^2, with K near the channel's mean (per_channel::stats_shift: no cancellation whatever the mean), which the channel's
// first block writes to sums[2 * C + c].
template <typename scalar_t, typename acc_t>
__global__ void stats_from_kernel(Pieces P, acc_t* __restrict__ sums, int splits) {
  __shared__ acc_t smem[2 * kThreads];
  if (P.channels_last) {
    const ThreadCol t = thread_col(P);
    const scalar_t* __restrict__ x = static_cast<const scalar_t*>(P.x[t.j]);
    const int64_t k = P.k[t.j], M = P.N * P.S;
    acc_t a = 0, b = 0, K = 0;
    if (t.active) {
      K = per_channel::stats_shift<acc_t>(x, t.lc, k, P.S);  // from values (0, lc, 0..7)
      int64_t xi = t.m * k + t.lc;
      const int64_t x_step = t.step * k;
#pragma unroll 4
      for (int64_t m = t.m; m < M; m += t.step, xi += x_step) {
        const acc_t d = static_cast<acc_t>(x[xi]) - K;
        a += d;
        b += d * d;
      }
    }
    column_sums(t, a, b, smem);
    if (threadIdx.x < t.tx && t.active) {
      atomicAdd(sums + t.c, a);
      atomicAdd(sums + P.C + t.c, b);
      if (blockIdx.y == 0) sums[2 * P.C + t.c] = K;
    }
    return;
  }
  BlockSplit bs;
  if (!block_split(P, splits, bs)) return;
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(P.x[bs.j]);
  const int64_t c = bs.c;
  const acc_t K = per_channel::stats_shift<acc_t>(x, bs.lc * P.S, 1, P.S);  // from values (0, lc, 0..7)
  acc_t a = 0, b = 0;
  walk_channel(P, bs.j, bs.lc, bs.m0, bs.m1, [&](int64_t xi, int64_t) {
    const acc_t d = static_cast<acc_t>(x[xi]) - K;
    a += d;
    b += d * d;
  });
  a = block_sum(a, smem);
  b = block_sum(b, smem);
  if (threadIdx.x == 0) {
    atomicAdd(sums + c, a);
    atomicAdd(sums + P.C + c, b);
    if (bs.m0 == 0) sums[2 * P.C + c] = K;
  }
}

// mean and biased variance from the shifted sums, then the affine step (per_channel::affine_at).
template <typename acc_t>
__global__ void finish_stats_kernel(const acc_t* __restrict__ sums, int64_t C, acc_t inv_M,
                                    const acc_t* __restrict__ weight, const acc_t* __restrict__ bias, acc_t eps,
                                    acc_t* __restrict__ mean, acc_t* __restrict__ var, acc_t* __restrict__ scale,
                                    acc_t* __restrict__ shift, acc_t* __restrict__ invstd) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t d = sums[c] * inv_M, v = sums[C + c] * inv_M - d * d;  // d: mean - K
    const acc_t mu = sums[2 * C + c] + d, var_c = v > acc_t(0) ? v : acc_t(0);
    mean[c] = mu;
    var[c] = var_c;
    per_channel::affine_at(c, mu, var_c, weight, bias, eps, scale, shift, invstd);
  }
}

#define LIGHTCNN_DENSE_DISPATCH(t, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, name, __VA_ARGS__)

// Calls launch(Pieces, number of features in it, largest k) for consecutive chunks of at most kMaxPieces.
template <typename F>
void for_chunks(const std::vector<at::Tensor>& feats, const std::vector<at::Tensor>* outs, int64_t C,
                const F& launch) {
  const at::Tensor& f0 = feats[0];
  int64_t c0 = 0;
  for (size_t start = 0; start < feats.size(); start += kMaxPieces) {
    Pieces P{};
    P.N = f0.size(0);
    P.C = C;
    P.S = f0.size(2) * f0.size(3);
    P.channels_last = common_format(feats) == at::MemoryFormat::ChannelsLast;
    P.by_S = FastDiv(P.S);
    const int n = static_cast<int>(std::min<size_t>(kMaxPieces, feats.size() - start));
    P.count = n;
    int64_t max_k = 0;
    for (int j = 0; j < n; ++j) {
      const at::Tensor& f = feats[start + j];
      P.x[j] = f.const_data_ptr();
      P.out[j] = outs ? (*outs)[start + j].mutable_data_ptr() : nullptr;
      P.c0[j] = c0;
      P.k[j] = f.size(1);
      P.by_k[j] = FastDiv(f.size(1));
      c0 += f.size(1);
      max_k = std::max(max_k, f.size(1));
    }
    launch(P, n, max_k);
  }
}

unsigned elementwise_blocks(int64_t numel) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((numel + kThreads - 1) / kThreads, 4096)));
}

void bn_relu_into_cuda(at::Tensor& y, const std::vector<at::Tensor>& feats, const at::Tensor& scale,
                       const at::Tensor& shift) {
  if (y.numel() == 0) return;
  LIGHTCNN_DENSE_DISPATCH(y.scalar_type(), "dense_bn_relu_conv2d_bn_relu_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    for_chunks(feats, nullptr, y.size(1), [&](const Pieces& P, int n, int64_t max_k) {
      const dim3 grid(elementwise_blocks(P.N * max_k * P.S), n);
      const auto launch = [&](auto index) {
        bn_relu_into_kernel<scalar_t, acc_t, decltype(index)><<<grid, kThreads, 0, current_stream()>>>(
            P, y.mutable_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (fits_32_bits(y.numel()))
        launch(uint32_t(0));
      else
        launch(int64_t(0));
    });
  });
}

// Blocks per channel in the NCHW reductions: enough to fill the GPU when a feature has few channels (k = 12
// ... 48 in DenseNets), each with at least 16 values a thread.
int reduction_splits(int64_t M, int64_t max_k) {
  const int splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(64, M / (kThreads * 16))));
  TORCH_CHECK(max_k * splits < (int64_t(1) << 31), "dense_bn_relu_conv2d: a feature has too many channels (", max_k,
              ") for the CUDA reduction's grid");
  return splits;
}

// The reductions' grid (see above): NCHW (max_k * splits, features); NHWC (groups of TX channels over the
// features, splits), splits chosen for about kTargetBlocks blocks (8 of 256 threads on each of 132 SMs: a
// full H100) with at least 16 pixels a row of 8 threads.
constexpr int64_t kTargetBlocks = 8 * 132;

dim3 reduction_grid(const Pieces& P, int n, int64_t max_k, int& splits) {
  const int64_t M = P.N * P.S;
  if (!P.channels_last) {
    splits = reduction_splits(M, max_k);
    return dim3(static_cast<unsigned>(max_k * splits), n);
  }
  int64_t groups = 0;
  for (int j = 0; j < n; ++j) groups += (P.k[j] + nhwc_lanes(P.k[j]) - 1) / nhwc_lanes(P.k[j]);
  TORCH_CHECK(groups < (int64_t(1) << 31), "dense_bn_relu_conv2d: the features have too many channels (",
              groups * 32, ") for the CUDA reduction's grid");
  splits = static_cast<int>(std::clamp<int64_t>((kTargetBlocks + groups - 1) / groups, 1,
                                                std::clamp<int64_t>(M / (8 * 16), 1, 65535)));
  return dim3(static_cast<unsigned>(groups), static_cast<unsigned>(splits));
}

std::tuple<at::Tensor, at::Tensor> reduce_from_cuda(const at::Tensor& g, const std::vector<at::Tensor>& feats,
                                                    const at::Tensor& scale, const at::Tensor& shift,
                                                    const at::Tensor& mean) {
  const int64_t C = g.size(1);
  at::Tensor sum_dz = at::zeros({C}, scale.options()), sum_dzx = at::zeros({C}, scale.options());
  LIGHTCNN_DENSE_DISPATCH(g.scalar_type(), "dense_bn_relu_conv2d_reduce_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    for_chunks(feats, nullptr, C, [&](const Pieces& P, int n, int64_t max_k) {
      int splits;
      const dim3 grid = reduction_grid(P, n, max_k, splits);
      reduce_from_kernel<scalar_t, acc_t><<<grid, kThreads, 0, current_stream()>>>(
          P, g.const_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(),
          mean.const_data_ptr<acc_t>(), sum_dz.mutable_data_ptr<acc_t>(), sum_dzx.mutable_data_ptr<acc_t>(), splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {sum_dz, sum_dzx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_from_cuda(const std::vector<at::Tensor>& feats,
                                                                           int64_t C,
                                                                           const at::TensorOptions& stats_options,
                                                                           const at::Tensor& weight_,
                                                                           const at::Tensor& bias_, double eps) {
  const at::Tensor& f0 = feats[0];
  const int64_t M = f0.size(0) * f0.size(2) * f0.size(3);
  at::Tensor sums = at::zeros({3, C}, stats_options);
  at::Tensor mean = at::empty({C}, stats_options), var = at::empty_like(mean), scale = at::empty_like(mean),
             shift = at::empty_like(mean), invstd = at::empty_like(mean);
  const at::Tensor weight = per_channel::as_stats(weight_, mean), bias = per_channel::as_stats(bias_, mean);
  LIGHTCNN_DENSE_DISPATCH(f0.scalar_type(), "dense_bn_relu_conv2d_stats_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    for_chunks(feats, nullptr, C, [&](const Pieces& P, int n, int64_t max_k) {
      int splits;
      const dim3 grid = reduction_grid(P, n, max_k, splits);
      stats_from_kernel<scalar_t, acc_t><<<grid, kThreads, 0, current_stream()>>>(P, sums.mutable_data_ptr<acc_t>(),
                                                                                   splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    finish_stats_kernel<acc_t><<<static_cast<unsigned>(std::min<int64_t>((C + kThreads - 1) / kThreads, 1024)),
                                 kThreads, 0, current_stream()>>>(
        sums.const_data_ptr<acc_t>(), C, acc_t(1) / static_cast<acc_t>(M), per_channel::ptr_or_null<acc_t>(weight),
        per_channel::ptr_or_null<acc_t>(bias), static_cast<acc_t>(eps), mean.mutable_data_ptr<acc_t>(),
        var.mutable_data_ptr<acc_t>(), scale.mutable_data_ptr<acc_t>(), shift.mutable_data_ptr<acc_t>(),
        invstd.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var, scale, shift};
}

std::vector<at::Tensor> grad_inputs_cuda(const at::Tensor& g, const std::vector<at::Tensor>& feats,
                                         const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& alpha,
                                         const at::Tensor& beta, const at::Tensor& gamma) {
  std::vector<at::Tensor> grads;
  for (const auto& f : feats) grads.push_back(at::empty_like(f, f.options(), common_format(feats)));
  if (g.numel() == 0) return grads;
  LIGHTCNN_DENSE_DISPATCH(g.scalar_type(), "dense_bn_relu_conv2d_grad_inputs_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    for_chunks(feats, &grads, g.size(1), [&](const Pieces& P, int n, int64_t max_k) {
      const dim3 grid(elementwise_blocks(P.N * max_k * P.S), n);
      const auto launch = [&](auto index) {
        grad_inputs_kernel<scalar_t, acc_t, decltype(index)><<<grid, kThreads, 0, current_stream()>>>(
            P, g.const_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(),
            alpha.const_data_ptr<acc_t>(), beta.const_data_ptr<acc_t>(), gamma.const_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (fits_32_bits(g.numel()))
        launch(uint32_t(0));
      else
        launch(int64_t(0));
    });
  });
  return grads;
}

const DensePrims kCudaPrims{bn_relu_into_cuda, reduce_from_cuda, grad_inputs_cuda, per_channel::affine,
                            per_channel::coefs, stats_from_cuda};

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_bn_relu_conv2d_cuda(
    at::TensorList features, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const at::Tensor& conv_weight, at::IntArrayRef padding, bool training, double eps) {
  TORCH_CHECK(!features.empty(), "dense_bn_relu_conv2d: features is an empty list");
  const c10::cuda::OptionalCUDAGuard guard(features[0].device());
  return forward(kCudaPrims, "dense_bn_relu_conv2d", features, weight, bias, running_mean, running_var,
                 conv_weight, padding, training, eps, c10::DeviceType::CUDA,
                 {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> dense_bn_relu_conv2d_backward_cuda(
    const at::Tensor& grad_output, at::TensorList features, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& conv_weight, at::IntArrayRef padding, bool training, double eps) {
  const c10::cuda::OptionalCUDAGuard guard(grad_output.device());
  return backward(kCudaPrims, "dense_bn_relu_conv2d_backward", grad_output, features, weight, bias, mean, var,
                  conv_weight, padding, training, eps, c10::DeviceType::CUDA,
                  {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
}

}  // namespace
}  // namespace dense
}  // namespace lightcnn

TORCH_LIBRARY_IMPL(lightcnn, CUDA, m) {
  m.impl("dense_bn_relu_conv2d", &lightcnn::dense::dense_bn_relu_conv2d_cuda);
  m.impl("dense_bn_relu_conv2d_backward", &lightcnn::dense::dense_bn_relu_conv2d_backward_cuda);
}
