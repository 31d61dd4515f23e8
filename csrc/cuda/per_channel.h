// The per-channel arithmetic of a batch-norm step on CUDA (per_channel_cuda.cu), one launch each; their
// signatures are bn_relu_conv::AffineFn and bn_relu_conv::CoefsFn (../bn_relu_conv.h). A reduction whose
// finishing kernel can do the step itself calls per_channel.cuh's device functions there instead (no launch).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace lightcnn {
namespace per_channel {

// A per-channel parameter as a contiguous tensor of the statistics' dtype (undefined stays undefined).
inline at::Tensor as_stats(const at::Tensor& p, const at::Tensor& like) {
  return p.defined() ? p.to(like.scalar_type()).contiguous() : p;
}

// The data of an optional parameter, or nullptr.
template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

// (scale, shift, invstd) from (mean, var): invstd = 1/sqrt(var + eps), scale = weight * invstd,
// shift = bias - mean * scale; all (C,) in the stats dtype; weight and bias may be undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> affine(const at::Tensor& mean, const at::Tensor& var,
                                                      const at::Tensor& weight, const at::Tensor& bias, double eps);

// (alpha, beta, gamma, grad_weight, grad_bias) of the BN backward from sum dz and sum dz * (x - mean) over
// the M values of each channel (see bn_relu_conv::backward_coefs).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> coefs(
    const at::Tensor& sum_dz, const at::Tensor& sum_dzx, const at::Tensor& invstd, const at::Tensor& mean,
    const at::Tensor& weight, int64_t M, bool training);

}  // namespace per_channel
}  // namespace lightcnn
