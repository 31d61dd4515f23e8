// The per-channel arithmetic of a batch-norm step on CUDA, one launch each (declared in per_channel.h):
// the fused BN-ReLU-Conv and DenseNet ops use them as their Prims::affine / DensePrims::affine and
// Prims::coefs / DensePrims::coefs, where the ATen sequence would cost about a dozen launches of tiny
// kernels per unit and step (see bn_relu_conv.h: scale_shift, backward_coefs). Where a reduction's
// finishing launch precedes the step, that launch does it instead (per_channel.cuh: the fused unit's
// training forward and backward), and these serve every other step.
#include "per_channel.h"
#include "per_channel.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

namespace lightcnn {
namespace per_channel {
namespace {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

constexpr int kThreads = 256;

template <typename acc_t>
__global__ void affine_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                              const acc_t* __restrict__ weight, const acc_t* __restrict__ bias, acc_t eps, int64_t C,
                              acc_t* __restrict__ scale, acc_t* __restrict__ shift, acc_t* __restrict__ invstd) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x)
    affine_at(c, mean[c], var[c], weight, bias, eps, scale, shift, invstd);
}

template <typename acc_t>
__global__ void coefs_kernel(const acc_t* __restrict__ sum_dz, const acc_t* __restrict__ sum_dzx,
                             const acc_t* __restrict__ invstd, const acc_t* __restrict__ mean,
                             const acc_t* __restrict__ weight, acc_t inv_M, bool training, int64_t C,
                             acc_t* __restrict__ alpha, acc_t* __restrict__ beta, acc_t* __restrict__ gamma,
                             acc_t* __restrict__ grad_weight) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x)
    coefs_at(c, sum_dz[c], sum_dzx[c], invstd[c], mean[c], weight, inv_M, training, alpha, beta, gamma, grad_weight);
}

unsigned per_channel_blocks(int64_t C) {
  return static_cast<unsigned>(std::clamp<int64_t>((C + kThreads - 1) / kThreads, 1, 1024));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine(const at::Tensor& mean, const at::Tensor& var,
                                                      const at::Tensor& weight_, const at::Tensor& bias_, double eps) {
  const at::Tensor weight = as_stats(weight_, mean), bias = as_stats(bias_, mean);
  at::Tensor scale = at::empty_like(mean), shift = at::empty_like(mean), invstd = at::empty_like(mean);
  const int64_t C = mean.numel();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "per_channel_affine_cuda", [&] {
    affine_kernel<scalar_t><<<per_channel_blocks(C), kThreads, 0, current_stream()>>>(
        mean.const_data_ptr<scalar_t>(), var.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(weight),
        ptr_or_null<scalar_t>(bias), static_cast<scalar_t>(eps), C, scale.mutable_data_ptr<scalar_t>(),
        shift.mutable_data_ptr<scalar_t>(), invstd.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {scale, shift, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> coefs(
    const at::Tensor& sum_dz, const at::Tensor& sum_dzx, const at::Tensor& invstd, const at::Tensor& mean,
    const at::Tensor& weight_, int64_t M, bool training) {
  const at::Tensor weight = as_stats(weight_, invstd);
  at::Tensor alpha = at::empty_like(invstd), beta = at::empty_like(invstd), gamma = at::empty_like(invstd),
             grad_weight = at::empty_like(invstd);
  const int64_t C = invstd.numel();
  AT_DISPATCH_FLOATING_TYPES(invstd.scalar_type(), "per_channel_coefs_cuda", [&] {
    coefs_kernel<scalar_t><<<per_channel_blocks(C), kThreads, 0, current_stream()>>>(
        sum_dz.const_data_ptr<scalar_t>(), sum_dzx.const_data_ptr<scalar_t>(), invstd.const_data_ptr<scalar_t>(),
        mean.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(weight), scalar_t(1) / static_cast<scalar_t>(M),
        training, C, alpha.mutable_data_ptr<scalar_t>(), beta.mutable_data_ptr<scalar_t>(),
        gamma.mutable_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {alpha, beta, gamma, grad_weight, sum_dz};
}

}  // namespace per_channel
}  // namespace lightcnn
