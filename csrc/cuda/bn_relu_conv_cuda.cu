// CUDA kernels of the fused pre-activation BN -> ReLU -> Conv2d (torch.ops.lightcnn.bn_relu_conv2d).
// The forward/backward logic is shared with the CPU in ../bn_relu_conv.h; here are the four primitives:
//   stats       one block per channel, two passes (mean, then squared deviations) for accuracy
//   bn_relu     elementwise y = max(x * scale_c + shift_c, 0)
//   reduce      one block per channel: sum dz and sum dz * (x - mean), dz = g * [x * scale_c + shift_c > 0]
//   grad_input  elementwise grad_x = dz * alpha_c + x * beta_c + gamma_c
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
#include <cstdlib>
#include <cstring>

#include "../bn_relu_conv.h"

namespace lightcnn {
namespace bn_relu_conv {
namespace {

// at::cuda::getCurrentCUDAStream() is c10::cuda::getCurrentCUDAStream(); its c10 header spares the
// .cu ATen/cuda/CUDAContext.h, which needs the cuSPARSE/cuBLAS headers a bare toolkit may lack.
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

constexpr int kReduceThreads = 512;  // a multiple of the warp size
constexpr int kElementwiseThreads = 256;

struct Layout {
  int64_t N, C, S;
  bool channels_last;
  __device__ __forceinline__ int64_t offset(int64_t n, int64_t c, int64_t s) const {
    return channels_last ? (n * S + s) * C + c : (n * C + c) * S + s;
  }
  __device__ __forceinline__ int64_t channel(int64_t i) const { return channels_last ? i % C : (i / S) % C; }
};

Layout layout_of(const at::Tensor& x) {
  return Layout{x.size(0), x.size(1), x.size(2) * x.size(3), is_channels_last(x)};
}

__device__ __forceinline__ float preact(float x, float s, float b) { return fmaf(x, s, b); }
__device__ __forceinline__ double preact(double x, double s, double b) { return fma(x, s, b); }

// Sum over the block; the result is valid in thread 0. `smem` holds one value per warp.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // smem may still be read by a previous block_sum
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  v = threadIdx.x < nwarps ? smem[threadIdx.x] : T(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void stats_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ mean, acc_t* __restrict__ var,
                             Layout L) {
  __shared__ acc_t smem[32];
  __shared__ acc_t s_mean;
  const int64_t c = blockIdx.x, M = L.N * L.S;
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    const int64_t n = i / L.S;
    sum += static_cast<acc_t>(x[L.offset(n, c, i - n * L.S)]);
  }
  sum = block_sum(sum, smem);
  if (threadIdx.x == 0) s_mean = sum / static_cast<acc_t>(M);
  __syncthreads();
  const acc_t m = s_mean;
  acc_t sq = 0;
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    const int64_t n = i / L.S;
    const acc_t d = static_cast<acc_t>(x[L.offset(n, c, i - n * L.S)]) - m;
    sq += d * d;
  }
  sq = block_sum(sq, smem);
  if (threadIdx.x == 0) {
    mean[c] = m;
    var[c] = sq / static_cast<acc_t>(M);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bn_relu_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                               const acc_t* __restrict__ scale, const acc_t* __restrict__ shift, int64_t numel,
                               Layout L) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = L.channel(i);
    const acc_t v = preact(static_cast<acc_t>(x[i]), scale[c], shift[c]);
    y[i] = static_cast<scalar_t>(v > acc_t(0) ? v : (v != v ? v : acc_t(0)));  // NaN propagates as in F.relu
  }
}

template <typename scalar_t, typename acc_t>
__global__ void reduce_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                              const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                              const acc_t* __restrict__ mean, acc_t* __restrict__ sum_dz,
                              acc_t* __restrict__ sum_dzx, Layout L) {
  __shared__ acc_t smem[32];
  const int64_t c = blockIdx.x, M = L.N * L.S;
  const acc_t s = scale[c], b = shift[c], m = mean[c];
  acc_t a1 = 0, a2 = 0;
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    const int64_t n = i / L.S;
    const int64_t off = L.offset(n, c, i - n * L.S);
    const acc_t xv = static_cast<acc_t>(x[off]);
    const acc_t dz = preact(xv, s, b) > acc_t(0) ? static_cast<acc_t>(g[off]) : acc_t(0);
    a1 += dz;
    a2 += dz * (xv - m);
  }
  a1 = block_sum(a1, smem);
  a2 = block_sum(a2, smem);
  if (threadIdx.x == 0) {
    sum_dz[c] = a1;
    sum_dzx[c] = a2;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void grad_input_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                  scalar_t* __restrict__ gx, const acc_t* __restrict__ scale,
                                  const acc_t* __restrict__ shift, const acc_t* __restrict__ alpha,
                                  const acc_t* __restrict__ beta, const acc_t* __restrict__ gamma, int64_t numel,
                                  Layout L) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = L.channel(i);
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t dz = preact(xv, scale[c], shift[c]) > acc_t(0) ? static_cast<acc_t>(g[i]) : acc_t(0);
    gx[i] = static_cast<scalar_t>(dz * alpha[c] + (xv * beta[c] + gamma[c]));
  }
}

// g = g * [x * scale_c + shift_c > 0], in place: the ReLU's backward with the mask recomputed exactly as
// the forward computed it (the ATen-reductions variant below hands the masked gradient to ATen).
template <typename scalar_t, typename acc_t>
__global__ void relu_mask_kernel(scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                 const acc_t* __restrict__ scale, const acc_t* __restrict__ shift, int64_t numel,
                                 Layout L) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = L.channel(i);
    if (!(preact(static_cast<acc_t>(x[i]), scale[c], shift[c]) > acc_t(0))) g[i] = scalar_t(0);
  }
}

unsigned elementwise_blocks(int64_t numel) {
  return static_cast<unsigned>(std::max<int64_t>(
      1, std::min<int64_t>((numel + kElementwiseThreads - 1) / kElementwiseThreads, int64_t(1) << 16)));
}

#define LIGHTCNN_DISPATCH(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), name, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> stats_cuda(const at::Tensor& x) {
  const Layout L = layout_of(x);
  const auto sdt = stats_dtype(x.scalar_type());
  at::Tensor mean = at::empty({L.C}, x.options().dtype(sdt)), var = at::empty({L.C}, x.options().dtype(sdt));
  LIGHTCNN_DISPATCH(x, "bn_relu_conv2d_stats_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    stats_kernel<scalar_t, acc_t><<<static_cast<unsigned>(L.C), kReduceThreads, 0, current_stream()>>>(
        x.const_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(), L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

at::Tensor bn_relu_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  const Layout L = layout_of(x);
  at::Tensor y = at::empty_like(x, x.options(), format_of(x));
  const int64_t numel = x.numel();
  if (numel == 0) return y;
  LIGHTCNN_DISPATCH(x, "bn_relu_conv2d_bn_relu_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    bn_relu_kernel<scalar_t, acc_t><<<elementwise_blocks(numel), kElementwiseThreads, 0,
                                      current_stream()>>>(
        x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(),
        shift.const_data_ptr<acc_t>(), numel, L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> reduce_cuda(const at::Tensor& g, const at::Tensor& x, const at::Tensor& scale,
                                               const at::Tensor& shift, const at::Tensor& mean) {
  const Layout L = layout_of(x);
  at::Tensor sum_dz = at::empty({L.C}, scale.options()), sum_dzx = at::empty({L.C}, scale.options());
  LIGHTCNN_DISPATCH(x, "bn_relu_conv2d_reduce_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    reduce_kernel<scalar_t, acc_t><<<static_cast<unsigned>(L.C), kReduceThreads, 0, current_stream()>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(),
        shift.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(), sum_dz.mutable_data_ptr<acc_t>(),
        sum_dzx.mutable_data_ptr<acc_t>(), L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_dz, sum_dzx};
}

at::Tensor grad_input_cuda(const at::Tensor& g, const at::Tensor& x, const at::Tensor& scale,
                           const at::Tensor& shift, const at::Tensor& alpha, const at::Tensor& beta,
                           const at::Tensor& gamma) {
  const Layout L = layout_of(x);
  at::Tensor gx = at::empty_like(x, x.options(), format_of(x));
  const int64_t numel = x.numel();
  if (numel == 0) return gx;
  LIGHTCNN_DISPATCH(x, "bn_relu_conv2d_grad_input_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    grad_input_kernel<scalar_t, acc_t><<<elementwise_blocks(numel), kElementwiseThreads, 0,
                                         current_stream()>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(),
        scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(), alpha.const_data_ptr<acc_t>(),
        beta.const_data_ptr<acc_t>(), gamma.const_data_ptr<acc_t>(), numel, L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

const Prims kCudaPrims{stats_cuda, bn_relu_cuda, reduce_cuda, grad_input_cuda};

// ---- Variant (issue 10, item 1): the two per-channel reductions on ATen's SyncBatchNorm primitives ----
// at::batch_norm_stats (Welford) and at::batch_norm_backward_reduce use many blocks per channel and have
// channels-last kernels with coalesced loads along C, where the kernels above use one block per channel.
// The elementwise passes stay ours (BN-ReLU in one pass; the ReLU mask folded into the input gradient).
// Compiled and CPU-reviewed only: no GPU has measured it yet, so it is opt-in,
// LIGHTCNN_CUDA_BN_REDUCTIONS=aten (read at every call, so that tests and benchmarks can switch it).

std::tuple<at::Tensor, at::Tensor> stats_aten(const at::Tensor& x) {
  // eps = 0: invstd = 1/sqrt(var), and ATen returns invstd = 0 for a constant channel (var = 0).
  auto [mean, invstd] = at::batch_norm_stats(x, /*epsilon=*/0.0);
  at::Tensor var = at::where(invstd == 0, at::zeros_like(invstd), invstd.pow(-2));
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> reduce_aten(const at::Tensor& g, const at::Tensor& x, const at::Tensor& scale,
                                               const at::Tensor& shift, const at::Tensor& mean) {
  const Layout L = layout_of(x);
  const int64_t numel = x.numel();
  if (numel > 0) {
    // dz in place of grad_y (a buffer of backward()'s own); grad_input then re-applies the same mask, a no-op.
    LIGHTCNN_DISPATCH(x, "bn_relu_conv2d_relu_mask_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      relu_mask_kernel<scalar_t, acc_t><<<elementwise_blocks(numel), kElementwiseThreads, 0, current_stream()>>>(
          g.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(),
          shift.const_data_ptr<acc_t>(), numel, L);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // sum dz and sum dz * (x - mean); invstd and weight only scale gradients that are not asked for. A
  // weight in the statistics' dtype tells ATen that a half input has float statistics (its mixed-type path).
  auto r = at::batch_norm_backward_reduce(g, x, mean, /*invstd=*/scale, /*weight=*/scale, /*input_g=*/true,
                                          /*weight_g=*/false, /*bias_g=*/false);
  return {std::get<0>(r), std::get<1>(r)};
}

const Prims kCudaAtenPrims{stats_aten, bn_relu_cuda, reduce_aten, grad_input_cuda};

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
