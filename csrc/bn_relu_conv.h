// Fused pre-activation BN -> ReLU -> Conv2d (He et al. 2016, "Identity mappings in deep residual
// networks"), shared by the CPU (bn_relu_conv.cpp) and CUDA (cuda/bn_relu_conv_cuda.cu) kernels.
//
// Forward:  y = relu(x * scale_c + shift_c), scale = gamma * invstd, shift = beta - mean * scale,
//           with dropout (a keep mask m given): y = y * m * 1/(1 - p)   (Zagoruyko & Komodakis 2016, 2.4)
//           out = conv2d(y.to(conv_weight.dtype), conv_weight, conv_bias)   (ATen: oneDNN / cuDNN)
// Backward: only x, the per-channel mean/var and the 1-byte mask are kept; y is recomputed from them,
//           then grad_y from ATen's convolution_backward (times m/(1-p)), then the BN-ReLU backward in
//           two passes.
//
// A device supplies four primitives (Prims::stats, bn_relu, reduce, grad_input); everything per
// channel (C-sized tensors) is done here with ATen ops, which run on the input's device, unless the device
// also supplies the optional Prims::affine and Prims::coefs (CUDA does: a launch each instead of a dozen
// small ATen kernels per unit and step), or Prims::stats_affine and Prims::reduce_coefs, which do the
// per-channel step inside the reduction's own finishing launch (CUDA's default primitives do).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include "common.h"

#include <tuple>
#include <vector>

namespace lightcnn {
namespace bn_relu_conv {

// The dtype of per-channel statistics: float for half/bfloat16 inputs (as ATen's batch norm), else the input's.
inline c10::ScalarType stats_dtype(c10::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// The layouts the elementwise kernels take (common.h). Anything else is made NCHW-contiguous first.
inline at::MemoryFormat format_of(const at::Tensor& x) { return kernel_memory_format(x); }

inline bool is_channels_last(const at::Tensor& x) { return format_of(x) == at::MemoryFormat::ChannelsLast; }

inline at::Tensor dense(const at::Tensor& x) { return x.contiguous(format_of(x)); }

inline void check_param(const char* op, const char* name, const at::Tensor& p, const at::Tensor& input) {
  if (!p.defined()) return;
  const int64_t C = input.size(1);
  TORCH_CHECK(p.device() == input.device(), op, ": ", name, " is on ", p.device(), " but input is on ",
              input.device(), "; move both to the same device");
  TORCH_CHECK(p.dim() == 1 && p.size(0) == C, op, ": ", name, " must have shape (", C,
              ",) (one value per input channel), got ", p.sizes());
  TORCH_CHECK(p.scalar_type() == input.scalar_type() || p.scalar_type() == stats_dtype(input.scalar_type()), op,
              ": ", name, " has dtype ", p.scalar_type(), " but input has dtype ", input.scalar_type(),
              "; BN parameters must have the input's dtype (or float32 for a float16/bfloat16 input)");
}

// The dropout keep mask: a bool tensor of the input's shape on its device (any layout), and 0 <= p < 1.
inline void check_drop(const char* op, const at::Tensor& mask, double p, const at::Tensor& input) {
  if (!mask.defined()) return;
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.sizes() == input.sizes() && mask.device() == input.device(),
              op, ": drop_mask must be a bool tensor of the input's shape ", input.sizes(), " on ", input.device(),
              ", got ", mask.scalar_type(), " ", mask.sizes(), " on ", mask.device());
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": drop_rate must be in [0, 1) with a drop_mask, got ", p);
}

inline void check_args(const char* op, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& mean, const at::Tensor& var, const at::Tensor& conv_weight,
                       const at::Tensor& conv_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, c10::DeviceType device_type,
                       std::initializer_list<c10::ScalarType> dtypes) {
  TORCH_CHECK(input.device().type() == device_type, op, ": this is the ", c10::DeviceTypeName(device_type),
              " kernel but input is on ", input.device());
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D (N, C, H, W), got shape ", input.sizes());
  bool ok = false;
  for (auto t : dtypes) ok |= input.scalar_type() == t;
  TORCH_CHECK(ok, op, ": input dtype ", input.scalar_type(), " is not supported by the ",
              c10::DeviceTypeName(device_type), " kernel");
  TORCH_CHECK(input.size(1) > 0, op, ": input has no channels (shape ", input.sizes(), ")");
  check_param(op, "weight", weight, input);
  check_param(op, "bias", bias, input);
  check_param(op, "mean", mean, input);
  check_param(op, "var", var, input);
  TORCH_CHECK(conv_weight.device() == input.device(), op, ": conv_weight is on ", conv_weight.device(),
              " but input is on ", input.device());
  TORCH_CHECK(conv_weight.dim() == 4, op, ": conv_weight must be 4-D (C_out, C_in / groups, kH, kW), got shape ",
              conv_weight.sizes());
  TORCH_CHECK(at::isFloatingType(conv_weight.scalar_type()), op, ": conv_weight must be floating point, got ",
              conv_weight.scalar_type());
  TORCH_CHECK(groups >= 1 && input.size(1) % groups == 0 && conv_weight.size(0) % groups == 0, op,
              ": groups=", groups, " must be >= 1 and divide both input channels (", input.size(1),
              ") and output channels (", conv_weight.size(0), ")");
  TORCH_CHECK(conv_weight.size(1) * groups == input.size(1), op, ": conv_weight expects ",
              conv_weight.size(1) * groups, " input channels (", conv_weight.size(1), " x groups=", groups,
              ") but input has ", input.size(1));
  if (conv_bias.defined()) {
    TORCH_CHECK(conv_bias.device() == input.device() && conv_bias.dim() == 1 &&
                    conv_bias.size(0) == conv_weight.size(0) && conv_bias.scalar_type() == conv_weight.scalar_type(),
                op, ": conv_bias must be a 1-D tensor of ", conv_weight.size(0), " values on ", input.device(),
                " with conv_weight's dtype ", conv_weight.scalar_type(), ", got shape ", conv_bias.sizes(), " ",
                conv_bias.scalar_type(), " on ", conv_bias.device());
  }
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 values each");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(stride[i] >= 1 && dilation[i] >= 1 && padding[i] >= 0, op,
                ": stride and dilation must be >= 1 and padding >= 0, got stride=", stride, " padding=", padding,
                " dilation=", dilation);
    const int64_t extent = dilation[i] * (conv_weight.size(2 + i) - 1) + 1;
    TORCH_CHECK(input.size(2 + i) + 2 * padding[i] >= extent, op, ": the padded input (", input.sizes(),
                " with padding ", padding, ") is smaller than the dilated kernel (", conv_weight.sizes(),
                ", dilation ", dilation, ")");
  }
}

// The dropout that a device's kernels apply themselves (Prims::fuses_dropout): the keep mask (bool, x's
// shape and layout) and 1/(1-p); an undefined mask means none. The fused kernels round as the reference's
// ATen calls do: forward y = y * m * s (in x's dtype: relu rounded, then times s rounded), backward
// g = (g * s) * m, so that both give the same bits.
struct Drop {
  at::Tensor mask;
  double scale = 1.0;
};

// y = relu(x * scale + shift) per channel (then the dropout), in x's dtype and layout. scale/shift: (C,)
// in stats dtype.
using BnReluFn = at::Tensor (*)(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                const Drop& drop);
// (mean, biased var) per channel, in stats dtype.
using StatsFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor& x);
// (sum dz, sum dz * (x - mean)) per channel with dz = grad_y' * [x * scale + shift > 0], grad_y' = grad_y
// through the dropout.
using ReduceFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor& grad_y, const at::Tensor& x,
                                                        const at::Tensor& scale, const at::Tensor& shift,
                                                        const at::Tensor& mean, const Drop& drop);
// grad_x = dz * alpha + x * beta + gamma per channel, dz as above; in x's dtype and layout.
using GradInputFn = at::Tensor (*)(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale,
                                   const at::Tensor& shift, const at::Tensor& alpha, const at::Tensor& beta,
                                   const at::Tensor& gamma, const Drop& drop);

// Optional per-channel primitives (nullptr: the ATen ops of forward() and backward() below). On a GPU
// each small ATen op is a kernel launch; these do a step's per-channel arithmetic in one launch each.
// (scale, shift, invstd) from (mean, var), all (C,) in the stats dtype; weight and bias may be undefined.
using AffineFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(const at::Tensor& mean, const at::Tensor& var,
                                                                    const at::Tensor& weight, const at::Tensor& bias,
                                                                    double eps);
// The BN backward's (alpha, beta, gamma, grad_weight, grad_bias) from the reduce's sums (see backward()).
using CoefsFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor& sum_dz, const at::Tensor& sum_dzx, const at::Tensor& invstd, const at::Tensor& mean,
    const at::Tensor& weight, int64_t M, bool training);

// Optional: stats followed by the affine step, as one primitive (mean, var, scale, shift, invstd): a device
// whose reduction ends in a per-channel finishing launch does the affine step there (no launch of its own).
using StatsAffineFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);
// Optional: reduce followed by backward_coefs, as one primitive (alpha, beta, gamma, grad_weight, grad_bias),
// for the same reason.
using ReduceCoefsFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight, bool training, const Drop& drop);

struct Prims {
  StatsFn stats;
  BnReluFn bn_relu;
  ReduceFn reduce;
  GradInputFn grad_input;
  bool fuses_dropout;  // false: the primitives get no mask, and the logic below applies it with ATen
  AffineFn affine = nullptr;
  CoefsFn coefs = nullptr;
  StatsAffineFn stats_affine = nullptr;  // when set, used instead of stats + affine in a training forward
  ReduceCoefsFn reduce_coefs = nullptr;  // when set, used instead of reduce + coefs in the backward
};

// The dropout handed to the primitives (when they fuse it) or applied with ATen calls (when not).
inline Drop fused_drop(const Prims& prims, const at::Tensor& mask, double p, const at::Tensor& input) {
  if (!prims.fuses_dropout || !mask.defined()) return {};
  return {mask.contiguous(format_of(input)), 1.0 / (1.0 - p)};
}

// A primitive that does not fuse the dropout says so if handed one (a programming error).
inline void no_fused_drop(const Drop& drop, const char* prim) {
  TORCH_CHECK(!drop.mask.defined(), prim, ": this primitive does not fuse the dropout");
}

inline std::tuple<at::Tensor, at::Tensor> affine(const at::Tensor& weight, const at::Tensor& bias,
                                                 const at::Tensor& mean, const at::Tensor& invstd) {
  at::Tensor scale = weight.defined() ? weight.to(invstd.scalar_type()) * invstd : invstd;
  at::Tensor shift = -mean * scale;
  if (bias.defined()) shift = shift + bias.to(invstd.scalar_type());
  return {scale.contiguous(), shift.contiguous()};
}

// (scale, shift, invstd) from the statistics: the device's one-launch primitive when it has one, else ATen.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_shift(AffineFn fn, const at::Tensor& mean,
                                                                  const at::Tensor& var, const at::Tensor& weight,
                                                                  const at::Tensor& bias, double eps) {
  if (fn) return fn(mean, var, weight, bias, eps);
  at::Tensor invstd = (var + eps).rsqrt(), scale, shift;
  std::tie(scale, shift) = affine(weight, bias, mean, invstd);
  return {scale, shift, invstd};
}

// The BN backward per channel from sum dz and sum dz * (x - mean) over the M values of each channel:
// d/dx of gamma * (x - mean) * invstd with batch statistics (Ioffe & Szegedy 2015, section 3) is
//   grad_x = gamma * invstd * (dz - mean(dz) - (x - mean) * invstd^2 * mean(dz * (x - mean)))
//          = dz * alpha + x * beta + gamma   (beta = gamma = 0 in eval: the statistics are constants);
// returns (alpha, beta, gamma, grad_weight, grad_bias): the device's one-launch primitive, or ATen.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_coefs(
    CoefsFn fn, const at::Tensor& sum_dz, const at::Tensor& sum_dzx, const at::Tensor& invstd, const at::Tensor& mean,
    const at::Tensor& weight, int64_t M, bool training) {
  if (fn) return fn(sum_dz, sum_dzx, invstd, mean, weight, M, training);
  const at::Tensor alpha = weight.defined() ? weight.to(invstd.scalar_type()) * invstd : invstd;
  at::Tensor beta, gamma;
  if (training) {
    beta = -alpha * invstd * invstd * sum_dzx / static_cast<double>(M);
    gamma = -alpha * sum_dz / static_cast<double>(M) - beta * mean;
  } else {
    beta = at::zeros_like(invstd);
    gamma = at::zeros_like(invstd);
  }
  return {alpha.contiguous(), beta.contiguous(), gamma.contiguous(), sum_dzx * invstd, sum_dz};
}

// Eval mode (training=False): copies of the running statistics in the stats dtype, as (mean, var).
// bn_relu_conv2d and dense_bn_relu_conv2d (dense.h) both use it.
inline std::tuple<at::Tensor, at::Tensor> running_stats(const char* op, const at::Tensor& running_mean,
                                                        const at::Tensor& running_var, c10::ScalarType sdt) {
  TORCH_CHECK(running_mean.defined() && running_var.defined(), op,
              ": eval mode (training=False) needs running_mean and running_var");
  at::Tensor mean = running_mean.to(sdt, /*non_blocking=*/false, /*copy=*/true);
  at::Tensor var = running_var.to(sdt, false, true);
  return {mean, var};
}

// Autocast applies to the op as a whole (the Python side casts conv_weight as the reference sequence
// would be cast); the ATen calls inside must not be cast a second time.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const Prims& prims, const char* op, const at::Tensor& input_, const std::optional<at::Tensor>& weight_,
    const std::optional<at::Tensor>& bias_, const std::optional<at::Tensor>& running_mean_,
    const std::optional<at::Tensor>& running_var_, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias_, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool training, double eps, const std::optional<at::Tensor>& drop_mask_,
    double drop_rate, c10::DeviceType device_type, std::initializer_list<c10::ScalarType> dtypes) {
  NoAutocast no_autocast;
  const at::Tensor weight = weight_.value_or(at::Tensor()), bias = bias_.value_or(at::Tensor());
  const at::Tensor drop_mask = drop_mask_.value_or(at::Tensor());
  const at::Tensor running_mean = running_mean_.value_or(at::Tensor()),
                   running_var = running_var_.value_or(at::Tensor());
  const at::Tensor conv_bias = conv_bias_.value_or(at::Tensor());
  check_args(op, input_, weight, bias, running_mean, running_var, conv_weight, conv_bias, stride, padding, dilation,
             groups, device_type, dtypes);
  check_drop(op, drop_mask, drop_rate, input_);
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  const at::Tensor input = dense(input_);
  const auto sdt = stats_dtype(input.scalar_type());
  at::Tensor mean, var;
  if (training) {
    TORCH_CHECK(input.numel() / input.size(1) > 1, op,
                ": expected more than 1 value per channel when training, got input of shape ",
                input.sizes(), " (batch statistics need at least 2 values)");
  }
  at::Tensor scale, shift;
  if (training && prims.stats_affine) {
    std::tie(mean, var, scale, shift, std::ignore) = prims.stats_affine(input, weight, bias, eps);
  } else {
    std::tie(mean, var) = training ? prims.stats(input) : running_stats(op, running_mean, running_var, sdt);
    std::tie(scale, shift, std::ignore) = scale_shift(prims.affine, mean, var, weight, bias, eps);
  }
  const Drop drop = fused_drop(prims, drop_mask, drop_rate, input);
  at::Tensor y = prims.bn_relu(input, scale, shift, drop);
  // The same two ATen multiplications as the reference's y * mask * (1 / (1 - p)): bit-identical outputs.
  if (drop_mask.defined() && !drop.mask.defined()) y.mul_(drop_mask).mul_(1.0 / (1.0 - drop_rate));
  at::Tensor out = at::convolution(y.to(conv_weight.scalar_type()), conv_weight, conv_bias, stride, padding, dilation,
                                   /*transposed=*/false, /*output_padding=*/{0, 0}, groups);
  return {out, mean, var};
}

// Returns grad of (input, weight, bias, conv_weight, conv_bias); the BN ones in the stats dtype
// (the Python side casts them to the parameters' dtypes), conv ones as ATen's convolution_backward
// (grad of conv_bias: an empty tensor when has_conv_bias is false).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const Prims& prims, const char* op, const at::Tensor& grad_output, const at::Tensor& input_,
    const std::optional<at::Tensor>& weight_, const std::optional<at::Tensor>& bias_, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& conv_weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool training, double eps, bool has_conv_bias,
    const std::optional<at::Tensor>& drop_mask_, double drop_rate, c10::DeviceType device_type,
    std::initializer_list<c10::ScalarType> dtypes) {
  NoAutocast no_autocast;
  const at::Tensor weight = weight_.value_or(at::Tensor()), bias = bias_.value_or(at::Tensor());
  const at::Tensor drop_mask = drop_mask_.value_or(at::Tensor());
  check_args(op, input_, weight, bias, mean, var, conv_weight, at::Tensor(), stride, padding, dilation, groups,
             device_type, dtypes);
  check_drop(op, drop_mask, drop_rate, input_);
  TORCH_CHECK(grad_output.device() == input_.device() && grad_output.dim() == 4 &&
                  grad_output.size(0) == input_.size(0) && grad_output.size(1) == conv_weight.size(0),
              op, ": grad_output must be (N, C_out, H_out, W_out) = (", input_.size(0), ", ", conv_weight.size(0),
              ", ...) on ", input_.device(), ", got ", grad_output.sizes(), " on ", grad_output.device());
  const at::Tensor input = dense(input_);
  const auto sdt = stats_dtype(input.scalar_type());
  const at::Tensor mean_s = mean.to(sdt).contiguous(), var_s = var.to(sdt).contiguous();
  at::Tensor invstd, scale, shift;
  std::tie(scale, shift, invstd) = scale_shift(prims.affine, mean_s, var_s, weight, bias, eps);

  const Drop drop = fused_drop(prims, drop_mask, drop_rate, input);
  // Recompute the BN-ReLU output (the forward did not keep it) and back-propagate through the conv.
  at::Tensor grad_y, grad_conv_weight, grad_conv_bias;
  {
    at::Tensor y = prims.bn_relu(input, scale, shift, drop);
    if (drop_mask.defined() && !drop.mask.defined()) y.mul_(drop_mask).mul_(1.0 / (1.0 - drop_rate));  // as forward
    y = y.to(conv_weight.scalar_type());
    const int64_t cout = conv_weight.size(0);
    // The bias gradient only when there is a bias: oneDNN's backward is slower when asked for it.
    std::tie(grad_y, grad_conv_weight, grad_conv_bias) = at::convolution_backward(
        grad_output.to(conv_weight.scalar_type()), y, conv_weight,
        has_conv_bias ? at::OptionalIntArrayRef(at::IntArrayRef(&cout, 1)) : at::OptionalIntArrayRef(), stride,
        padding, dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups, {true, true, has_conv_bias});
  }  // y is freed here, before the BN-ReLU backward allocates grad_input
  if (!has_conv_bias) grad_conv_bias = at::empty({0}, conv_weight.options());  // the schema returns a Tensor
  grad_y = grad_y.to(input.scalar_type()).contiguous(format_of(input));
  // Through the dropout: the reference's autograd multiplies by 1/(1-p), then by the mask (exact).
  if (drop_mask.defined() && !drop.mask.defined()) grad_y.mul_(1.0 / (1.0 - drop_rate)).mul_(drop_mask);

  at::Tensor alpha, beta, gamma, grad_weight, grad_bias;
  if (prims.reduce_coefs) {
    std::tie(alpha, beta, gamma, grad_weight, grad_bias) =
        prims.reduce_coefs(grad_y, input, scale, shift, mean_s, invstd, weight, training, drop);
  } else {
    at::Tensor sum_dz, sum_dz_xmu;
    std::tie(sum_dz, sum_dz_xmu) = prims.reduce(grad_y, input, scale, shift, mean_s, drop);
    std::tie(alpha, beta, gamma, grad_weight, grad_bias) = backward_coefs(
        prims.coefs, sum_dz, sum_dz_xmu, invstd, mean_s, weight, input.numel() / input.size(1), training);
  }
  at::Tensor grad_input = prims.grad_input(grad_y, input, scale, shift, alpha, beta, gamma, drop);
  return {grad_input, grad_weight, grad_bias, grad_conv_weight, grad_conv_bias};
}

}  // namespace bn_relu_conv
}  // namespace lightcnn
