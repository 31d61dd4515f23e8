// The per-channel arithmetic of a batch-norm step, for one channel c, as device functions: the kernels of
// per_channel_cuda.cu run it alone (a launch), and a reduction's finishing kernel runs it right after a
// channel's sums (bn_relu_conv_cuda.cu), so that the step costs no launch of its own.
#pragma once

#include <cstdint>

namespace lightcnn {
namespace per_channel {

// The shift K of a channel's shifted sums (of x - K and (x - K)^2): the running mean of its first values (up
// to 8, `stride` apart from `first`). With K one value, a K far from the mean scales the variance's float
// rounding by E[(x - K)^2] / var; near the mean that ratio stays close to 1. Every block of a channel reads
// the same values in the same order, so all get the same K.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t stats_shift(const scalar_t* __restrict__ x, int64_t first, int64_t stride,
                                             int64_t count) {
  const int n = count < 8 ? static_cast<int>(count) : 8;
  acc_t k = static_cast<acc_t>(x[first]);
  for (int j = 1; j < n; ++j) k += (static_cast<acc_t>(x[first + j * stride]) - k) / static_cast<acc_t>(j + 1);
  return k;
}

// invstd = 1/sqrt(var + eps), scale = weight * invstd, shift = bias - mean * scale (weight, bias may be null).
template <typename acc_t>
__device__ __forceinline__ void affine_at(int64_t c, acc_t mean, acc_t var, const acc_t* __restrict__ weight,
                                          const acc_t* __restrict__ bias, acc_t eps, acc_t* __restrict__ scale,
                                          acc_t* __restrict__ shift, acc_t* __restrict__ invstd) {
  const acc_t inv = rsqrt(var + eps);
  const acc_t s = weight != nullptr ? weight[c] * inv : inv;
  scale[c] = s;
  shift[c] = (bias != nullptr ? bias[c] : acc_t(0)) - mean * s;
  invstd[c] = inv;
}

// The BN backward's coefficients from sum dz and sum dz * (x - mean) over the channel's M values
// (bn_relu_conv::backward_coefs): grad_x = dz * alpha + x * beta + gamma; grad_weight = sum_dzx * invstd.
template <typename acc_t>
__device__ __forceinline__ void coefs_at(int64_t c, acc_t sum_dz, acc_t sum_dzx, acc_t inv, acc_t mean,
                                         const acc_t* __restrict__ weight, acc_t inv_M, bool training,
                                         acc_t* __restrict__ alpha, acc_t* __restrict__ beta,
                                         acc_t* __restrict__ gamma, acc_t* __restrict__ grad_weight) {
  const acc_t gi = weight != nullptr ? weight[c] * inv : inv;
  const acc_t be = training ? -gi * inv * inv * sum_dzx * inv_M : acc_t(0);
  alpha[c] = gi;
  beta[c] = be;
  gamma[c] = training ? -gi * sum_dz * inv_M - be * mean : acc_t(0);
  grad_weight[c] = sum_dzx * inv;
}

}  // namespace per_channel
}  // namespace lightcnn
