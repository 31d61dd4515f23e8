// Local response normalisation: argument checks and the (N, C, S) view shared by the CPU and CUDA kernels.
//
// b_c = a_c * (k + alpha/n * sum_{c' = c - n/2}^{c + (n-1)/2} a_c'^2)^-beta, the window clipped to [0, C)
// and always divided by n (exactly torch.nn.functional.local_response_norm).
//
// Gradient (s_c the bracket above, W(c) its window):
//   da_j = g_j * s_j^-beta - (2 alpha beta / n) * a_j * sum_{c : j in W(c)} g_c a_c s_c^(-beta-1)
// and j in W(c) <=> c in [j - (n-1)/2, j + n/2]: a window sum again, over the mirrored window.
//
// NaN and Inf land where the reference puts them: window sums are recomputed from their n terms (a sum
// carried from channel to channel would keep a NaN/Inf, or the rounding of a huge term, for every later
// channel), s^-beta is 0 at s = Inf and Inf at s = 0, and the backward follows grad_nan_above().
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common.h"

namespace lightcnn {

// How s^-beta is computed, shared by the CPU and CUDA kernels: exact-rounding fast paths for the betas
// people use (AlexNet and GoogLeNet use 0.75), a general power (exp(-beta * log s)) otherwise.
enum class PowMode : int { ThreeQuarters, Half, One, General };

inline PowMode pow_mode(double beta) {
  if (beta == 0.75) return PowMode::ThreeQuarters;
  if (beta == 0.5) return PowMode::Half;
  if (beta == 1.0) return PowMode::One;
  return PowMode::General;
}

// The backward's g_c a_c s_c^(-beta-1) is NaN where s_c is above this, as the reference's gradient is:
// its chain rule multiplies -g (a / s^beta) / s^beta, 0 once s^beta overflows, by the pow's derivative
// beta * s^(beta-1), and that is 0 * Inf where beta * s^(beta-1) overflows acc_t (s = Inf included). That
// needs beta > 1; for beta <= 1 the derivative is finite (+Inf returned, never exceeded).
template <typename acc_t>
inline acc_t grad_nan_above(double beta) {
  const double max = static_cast<double>(std::numeric_limits<acc_t>::max());
  if (!(beta > 1.0)) return std::numeric_limits<acc_t>::infinity();
  return static_cast<acc_t>(std::min(max, std::pow(max / beta, 1.0 / (beta - 1.0))));
}

// An LRN input seen as (N, C, S) with S the product of the spatial sizes, in one of two layouts:
// channels-first (element (n, c, s) at (n*C + c)*S + s) or channels-last (at (n*S + s)*C + c).
struct LrnView {
  at::Tensor x;
  int64_t N, C, S;
  bool channels_last;
};

inline c10::MemoryFormat lrn_memory_format(const at::Tensor& input) { return kernel_memory_format(input); }

inline void lrn_check(const at::Tensor& input, int64_t size, const char* op) {
  TORCH_CHECK(input.dim() >= 3, op, ": input must have at least 3 dimensions (N, C, ...), got ", input.dim(),
              "-D input of shape ", input.sizes(), "; add a batch dimension with input.unsqueeze(0)");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op, ": input must be a floating-point tensor, got ",
              input.scalar_type(), "; convert it with input.float()");
  TORCH_CHECK(size >= 1, op, ": size must be >= 1 (the number of channels summed), got ", size);
}

inline void lrn_check_grad(const at::Tensor& grad, const at::Tensor& input, const char* op) {
  TORCH_CHECK(grad.sizes() == input.sizes(), op, ": grad_output has shape ", grad.sizes(),
              " but input has shape ", input.sizes());
  TORCH_CHECK(grad.scalar_type() == input.scalar_type(), op, ": grad_output has dtype ", grad.scalar_type(),
              " but input has dtype ", input.scalar_type());
  TORCH_CHECK(grad.device() == input.device(), op, ": grad_output is on ", grad.device(), " but input is on ",
              input.device());
}

inline LrnView lrn_view(const at::Tensor& input) {
  const auto fmt = lrn_memory_format(input);
  at::Tensor x = input.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = (N * C == 0) ? 0 : x.numel() / (N * C);
  return {x, N, C, S, fmt != c10::MemoryFormat::Contiguous};
}

// The backward's operands after the checks: the input's view, grad_output in the same layout, and an
// empty gradient of that layout (the CPU and CUDA kernels share this prologue).
struct LrnBackwardOperands {
  LrnView v;
  at::Tensor grad, grad_input;
};

inline LrnBackwardOperands lrn_backward_operands(const at::Tensor& grad_output, const at::Tensor& input,
                                                 int64_t size) {
  lrn_check(input, size, "lightcnn::lrn_backward");
  lrn_check_grad(grad_output, input, "lightcnn::lrn_backward");
  LrnView v = lrn_view(input);
  at::Tensor grad = grad_output.contiguous(lrn_memory_format(input));
  at::Tensor grad_input = at::empty_like(v.x);
  return {std::move(v), std::move(grad), std::move(grad_input)};
}

}  // namespace lightcnn
