// BN -> ReLU -> Conv2d over the channel concatenation of a list of feature maps, without the concatenation
// (Huang et al. 2017, DenseNet; the shared-memory scheme of Pleiss et al. 2017, "Memory-efficient
// implementation of DenseNets"), shared by the CPU (dense.cpp) and CUDA (cuda/dense_cuda.cu) kernels.
//
// Forward:  per-channel batch statistics of every feature (ATen's batch-norm statistics, the very code
//           nn.BatchNorm2d runs), y = relu(x * scale_c + shift_c) written straight from each feature into
//           its channel slice of ONE temporary buffer, out = conv2d(y, conv_weight) (oneDNN / cuDNN), and
//           the buffer is freed: the op keeps nothing but its inputs and the per-channel mean and variance.
// Backward: the same buffer is recomputed from the features and the saved statistics (the running
//           statistics are not touched), ATen's convolution_backward gives grad_y, the buffer is freed,
//           then the BN-ReLU backward reads each feature and its slice of grad_y and writes that feature's
//           gradient, in two passes (per-channel sums, then the elementwise gradient).
//
// The per-channel arithmetic (scale/shift from gamma, beta, mean, var; the BN backward's coefficients)
// and the argument checks of the fused pre-activation op are reused from bn_relu_conv.h; a device
// supplies the three list-aware elementwise/reduction primitives (DensePrims).
#pragma once

#include "bn_relu_conv.h"

#include <ATen/ops/batch_norm_update_stats.h>
#include <ATen/ops/cat.h>

#include <string>
#include <vector>

namespace lightcnn {
namespace dense {

using bn_relu_conv::running_stats;
using bn_relu_conv::stats_dtype;

// y[:, c0_j : c0_j + k_j] = relu(features[j] * scale + shift) for every j; y is (N, C, H, W) in `format`,
// every feature (N, k_j, H, W) in the same format; scale/shift (C,) in the stats dtype.
using BnReluIntoFn = void (*)(at::Tensor& y, const std::vector<at::Tensor>& features, const at::Tensor& scale,
                              const at::Tensor& shift);
// (sum dz, sum dz * (x - mean)) per channel of the concatenation, dz = g * [x * scale + shift > 0], x the
// feature that holds the channel and g (N, C, H, W) the gradient of y.
using ReduceFromFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor& g,
                                                            const std::vector<at::Tensor>& features,
                                                            const at::Tensor& scale, const at::Tensor& shift,
                                                            const at::Tensor& mean);
// grad of features[j] = dz * alpha + x * beta + gamma per channel, one new tensor per feature.
using GradInputsFn = std::vector<at::Tensor> (*)(const at::Tensor& g, const std::vector<at::Tensor>& features,
                                                 const at::Tensor& scale, const at::Tensor& shift,
                                                 const at::Tensor& alpha, const at::Tensor& beta,
                                                 const at::Tensor& gamma);

// (mean, biased var, scale, shift) per channel of the concatenation, (C,) with the given options (the stats
// dtype): the batch statistics and then the affine step of bn_relu_conv::scale_shift, as one primitive (the
// device's reduction ends in a per-channel finishing launch, which does the affine step too).
using StatsFromFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const std::vector<at::Tensor>& features, int64_t C, const at::TensorOptions& stats_options,
    const at::Tensor& weight, const at::Tensor& bias, double eps);

struct DensePrims {
  BnReluIntoFn bn_relu_into;
  ReduceFromFn reduce_from;
  GradInputsFn grad_inputs;
  bn_relu_conv::AffineFn affine = nullptr;  // optional, as in bn_relu_conv::Prims
  bn_relu_conv::CoefsFn coefs = nullptr;
  StatsFromFn stats_from = nullptr;  // optional: else ATen's batch-norm statistics, a call per feature
};

// Channels-last when every feature is (and is not also NCHW-contiguous), NCHW otherwise.
inline at::MemoryFormat common_format(at::TensorList features) {
  for (const auto& f : features)
    if (!bn_relu_conv::is_channels_last(f)) return at::MemoryFormat::Contiguous;
  return at::MemoryFormat::ChannelsLast;
}

// Checks the features and returns them in their common format (copying only the odd ones), with C.
inline std::vector<at::Tensor> checked_features(const char* op, at::TensorList features, c10::DeviceType device_type,
                                                std::initializer_list<c10::ScalarType> dtypes, int64_t& C) {
  TORCH_CHECK(!features.empty(), op, ": features is an empty list; give at least one (N, C_i, H, W) tensor");
  const at::Tensor& f0 = features[0];
  TORCH_CHECK(f0.device().type() == device_type, op, ": this is the ", c10::DeviceTypeName(device_type),
              " kernel but features[0] is on ", f0.device());
  bool ok = false;
  for (auto t : dtypes) ok |= f0.scalar_type() == t;
  TORCH_CHECK(ok, op, ": feature dtype ", f0.scalar_type(), " is not supported by the ",
              c10::DeviceTypeName(device_type), " kernel");
  const at::MemoryFormat fmt = common_format(features);
  std::vector<at::Tensor> out;
  out.reserve(features.size());
  C = 0;
  for (size_t j = 0; j < features.size(); ++j) {
    const at::Tensor& f = features[j];
    TORCH_CHECK(f.dim() == 4, op, ": features[", j, "] must be 4-D (N, C_i, H, W), got shape ", f.sizes());
    TORCH_CHECK(f.device() == f0.device() && f.scalar_type() == f0.scalar_type(), op, ": features[", j, "] is ",
                f.scalar_type(), " on ", f.device(), " but features[0] is ", f0.scalar_type(), " on ", f0.device(),
                "; every feature must share the first one's dtype and device");
    TORCH_CHECK(f.size(0) == f0.size(0) && f.size(2) == f0.size(2) && f.size(3) == f0.size(3), op, ": features[",
                j, "] has shape ", f.sizes(), " but features[0] has ", f0.sizes(),
                "; features are concatenated along dim 1, so N, H and W must agree");
    TORCH_CHECK(f.size(1) > 0, op, ": features[", j, "] has no channels (shape ", f.sizes(), ")");
    out.push_back(f.contiguous(fmt));
    C += f.size(1);
  }
  return out;
}

inline void check_conv(const char* op, const at::Tensor& f0, int64_t C, const at::Tensor& conv_weight,
                       at::IntArrayRef padding) {
  TORCH_CHECK(conv_weight.device() == f0.device(), op, ": conv_weight is on ", conv_weight.device(),
              " but the features are on ", f0.device());
  TORCH_CHECK(conv_weight.dim() == 4 && conv_weight.size(1) == C, op,
              ": conv_weight must be (C_out, C, kH, kW) with C = ", C,
              " (the features' channels together), got shape ", conv_weight.sizes());
  TORCH_CHECK(at::isFloatingType(conv_weight.scalar_type()), op, ": conv_weight must be floating point, got ",
              conv_weight.scalar_type());
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
              ": padding must be two values >= 0, got ", padding);
  for (int i = 0; i < 2; ++i)
    TORCH_CHECK(f0.size(2 + i) + 2 * padding[i] >= conv_weight.size(2 + i), op, ": the padded input (H, W = ",
                f0.size(2), ", ", f0.size(3), " with padding ", padding, ") is smaller than the kernel ",
                conv_weight.sizes());
}

inline void check_per_channel(const char* op, const char* name, const at::Tensor& p, const at::Tensor& f0,
                              int64_t C) {
  if (!p.defined()) return;
  TORCH_CHECK(p.device() == f0.device() && p.dim() == 1 && p.size(0) == C, op, ": ", name,
              " must be a (", C, ",) tensor (one value per channel of the concatenation) on ", f0.device(),
              ", got shape ", p.sizes(), " on ", p.device());
  TORCH_CHECK(p.scalar_type() == f0.scalar_type() || p.scalar_type() == stats_dtype(f0.scalar_type()), op, ": ",
              name, " has dtype ", p.scalar_type(), " but the features have ", f0.scalar_type(),
              "; BN parameters must have the features' dtype (or float32 for float16/bfloat16 features)");
}

inline at::Tensor bn_relu_buffer(const DensePrims& prims, const std::vector<at::Tensor>& feats, int64_t C,
                                 const at::Tensor& scale, const at::Tensor& shift) {
  const at::Tensor& f0 = feats[0];
  at::Tensor y = at::empty({f0.size(0), C, f0.size(2), f0.size(3)},
                           f0.options().memory_format(common_format(feats)));
  prims.bn_relu_into(y, feats, scale, shift);
  return y;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const DensePrims& prims, const char* op, at::TensorList features_, const std::optional<at::Tensor>& weight_,
    const std::optional<at::Tensor>& bias_, const std::optional<at::Tensor>& running_mean_,
    const std::optional<at::Tensor>& running_var_, const at::Tensor& conv_weight, at::IntArrayRef padding,
    bool training, double eps, c10::DeviceType device_type, std::initializer_list<c10::ScalarType> dtypes) {
  bn_relu_conv::NoAutocast no_autocast;
  int64_t C = 0;
  const std::vector<at::Tensor> feats = checked_features(op, features_, device_type, dtypes, C);
  const at::Tensor& f0 = feats[0];
  const at::Tensor weight = weight_.value_or(at::Tensor()), bias = bias_.value_or(at::Tensor());
  const at::Tensor running_mean = running_mean_.value_or(at::Tensor()),
                   running_var = running_var_.value_or(at::Tensor());
  check_per_channel(op, "weight", weight, f0, C);
  check_per_channel(op, "bias", bias, f0, C);
  check_per_channel(op, "running_mean", running_mean, f0, C);
  check_per_channel(op, "running_var", running_var, f0, C);
  check_conv(op, f0, C, conv_weight, padding);
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  const auto sdt = stats_dtype(f0.scalar_type());
  at::Tensor mean, var, scale, shift;
  if (training) {
    TORCH_CHECK(f0.size(0) * f0.size(2) * f0.size(3) > 1, op,
                ": expected more than 1 value per channel when training, got features of shape ", f0.sizes(),
                " (batch statistics need at least 2 values)");
    if (prims.stats_from) {
      // the device's list-aware kernel: a launch per 64 features, not one (and a cast) per feature
      std::tie(mean, var, scale, shift) = prims.stats_from(feats, C, f0.options().dtype(sdt), weight, bias, eps);
    } else {
      // ATen's batch-norm statistics (mean, biased variance; float for half inputs): bit-identical to the
      // ones nn.BatchNorm2d normalises with, in either layout.
      std::vector<at::Tensor> means, vars;
      for (const auto& f : feats) {
        auto mv = at::batch_norm_update_stats(f, std::nullopt, std::nullopt, 0.0);
        means.push_back(std::get<0>(mv).to(sdt));
        vars.push_back(std::get<1>(mv).to(sdt));
      }
      mean = at::cat(means);
      var = at::cat(vars);
    }
  } else {
    std::tie(mean, var) = running_stats(op, running_mean, running_var, sdt);
  }
  if (!scale.defined())
    std::tie(scale, shift, std::ignore) = bn_relu_conv::scale_shift(prims.affine, mean, var, weight, bias, eps);
  at::Tensor out;
  {
    const at::Tensor y = bn_relu_buffer(prims, feats, C, scale, shift);
    out = at::convolution(y.to(conv_weight.scalar_type()), conv_weight, std::nullopt, {1, 1}, padding, {1, 1},
                          /*transposed=*/false, /*output_padding=*/{0, 0}, /*groups=*/1);
  }  // the buffer dies here: nothing of it is kept for the backward
  return {out, mean, var};
}

// Returns the grads of (features, weight, bias, conv_weight); the BN ones in the stats dtype.
inline std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> backward(
    const DensePrims& prims, const char* op, const at::Tensor& grad_output, at::TensorList features_,
    const std::optional<at::Tensor>& weight_, const std::optional<at::Tensor>& bias_, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& conv_weight, at::IntArrayRef padding, bool training, double eps,
    c10::DeviceType device_type, std::initializer_list<c10::ScalarType> dtypes) {
  bn_relu_conv::NoAutocast no_autocast;
  int64_t C = 0;
  const std::vector<at::Tensor> feats = checked_features(op, features_, device_type, dtypes, C);
  const at::Tensor& f0 = feats[0];
  const at::Tensor weight = weight_.value_or(at::Tensor()), bias = bias_.value_or(at::Tensor());
  check_per_channel(op, "weight", weight, f0, C);
  check_per_channel(op, "bias", bias, f0, C);
  check_per_channel(op, "mean", mean, f0, C);
  check_per_channel(op, "var", var, f0, C);
  check_conv(op, f0, C, conv_weight, padding);
  TORCH_CHECK(grad_output.device() == f0.device() && grad_output.dim() == 4 && grad_output.size(0) == f0.size(0) &&
                  grad_output.size(1) == conv_weight.size(0),
              op, ": grad_output must be (N, C_out, H_out, W_out) = (", f0.size(0), ", ", conv_weight.size(0),
              ", ...) on ", f0.device(), ", got ", grad_output.sizes(), " on ", grad_output.device());
  const auto sdt = stats_dtype(f0.scalar_type());
  const at::Tensor mean_s = mean.to(sdt).contiguous(), var_s = var.to(sdt).contiguous();
  at::Tensor scale, shift, invstd;
  std::tie(scale, shift, invstd) = bn_relu_conv::scale_shift(prims.affine, mean_s, var_s, weight, bias, eps);

  at::Tensor grad_y, grad_conv_weight;
  {
    const at::Tensor y = bn_relu_buffer(prims, feats, C, scale, shift).to(conv_weight.scalar_type());
    std::tie(grad_y, grad_conv_weight, std::ignore) = at::convolution_backward(
        grad_output.to(conv_weight.scalar_type()), y, conv_weight, std::nullopt, {1, 1}, padding, {1, 1},
        /*transposed=*/false, /*output_padding=*/{0, 0}, /*groups=*/1, {true, true, false});
  }  // the recomputed buffer is freed before the feature gradients are allocated
  grad_y = grad_y.to(f0.scalar_type()).contiguous(common_format(feats));

  at::Tensor sum_dz, sum_dz_xmu;
  std::tie(sum_dz, sum_dz_xmu) = prims.reduce_from(grad_y, feats, scale, shift, mean_s);
  at::Tensor alpha, beta, gamma, grad_weight, grad_bias;
  std::tie(alpha, beta, gamma, grad_weight, grad_bias) = bn_relu_conv::backward_coefs(
      prims.coefs, sum_dz, sum_dz_xmu, invstd, mean_s, weight, f0.size(0) * f0.size(2) * f0.size(3), training);
  std::vector<at::Tensor> grads = prims.grad_inputs(grad_y, feats, scale, shift, alpha, beta, gamma);
  return {grads, grad_weight, grad_bias, grad_conv_weight};
}

}  // namespace dense
}  // namespace lightcnn
