// Fused pre-activation BN -> ReLU -> Conv2d: the schemas of torch.ops.lightcnn.bn_relu_conv2d{,_backward}
// and their CPU kernels. The shared forward/backward logic is in bn_relu_conv.h; here are the four CPU
// primitives (batch statistics, BN-ReLU, the backward's per-channel sums, the input gradient), for NCHW
// rows (one channel of one image: vectorised with at::vec, the BN-ReLU ones shared with dense.cpp in
// bn_relu_rows.h) and NHWC rows (all channels of one pixel).
// Sums accumulate in double so that float32 statistics match ATen's to rounding.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "bn_relu_conv.h"
#include "bn_relu_rows.h"

namespace lightcnn {
namespace bn_relu_conv {
namespace {

using bn_relu_rows::hsum;
using bn_relu_rows::relu_of;
using bn_relu_rows::row_bn_relu;
using bn_relu_rows::row_grad_input;
using bn_relu_rows::row_reduce;
using bn_relu_rows::Vec;

// ---- NCHW: a row is the H*W values of one (n, c); scale/shift are per-row scalars ----

template <typename T>
void row_stats_sum(const T* x, int64_t n, double& sum) {
  Vec<T> acc(T(0));
  int64_t i = 0;
  for (; i + Vec<T>::size() <= n; i += Vec<T>::size()) acc += Vec<T>::loadu(x + i);
  double s = hsum(acc);
  for (; i < n; ++i) s += x[i];
  sum += s;
}

template <typename T>
void row_stats_sqdev(const T* x, int64_t n, T m, double& sum) {
  Vec<T> acc(T(0)), vm(m);
  int64_t i = 0;
  for (; i + Vec<T>::size() <= n; i += Vec<T>::size()) {
    Vec<T> d = Vec<T>::loadu(x + i) - vm;
    acc = at::vec::fmadd(d, d, acc);
  }
  double s = hsum(acc);
  for (; i < n; ++i) s += double(x[i] - m) * double(x[i] - m);
  sum += s;
}

// ---- NHWC: a row is the C values of one pixel; scale/shift are per-element arrays ----

template <typename T>
void pixel_bn_relu(const T* x, T* y, int64_t C, const T* s, const T* b) {
  const Vec<T> zero(T(0));
  int64_t c = 0;
  for (; c + Vec<T>::size() <= C; c += Vec<T>::size())
    at::vec::maximum(at::vec::fmadd(Vec<T>::loadu(x + c), Vec<T>::loadu(s + c), Vec<T>::loadu(b + c)), zero)
        .store(y + c);
  for (; c < C; ++c) y[c] = relu_of(std::fma(x[c], s[c], b[c]));
}

// The mask of one pixel, in the same arithmetic as pixel_bn_relu.
template <typename T>
void pixel_dz(const T* g, const T* x, T* dz, int64_t C, const T* s, const T* b) {
  const Vec<T> zero(T(0));
  int64_t c = 0;
  for (; c + Vec<T>::size() <= C; c += Vec<T>::size()) {
    const Vec<T> v = at::vec::fmadd(Vec<T>::loadu(x + c), Vec<T>::loadu(s + c), Vec<T>::loadu(b + c));
    Vec<T>::blendv(zero, Vec<T>::loadu(g + c), v > zero).store(dz + c);
  }
  for (; c < C; ++c) dz[c] = std::fma(x[c], s[c], b[c]) > T(0) ? g[c] : T(0);
}

// Per-thread partial sums over NHWC rows, combined at the end: out[k][c] for k < K quantities.
template <typename F>
std::vector<double> nhwc_reduce(int64_t rows, int64_t C, int K, const F& body) {
  const int nt = at::get_num_threads();
  std::vector<double> parts(static_cast<size_t>(nt) * K * C, 0.0);
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / C), [&](int64_t begin, int64_t end) {
    double* acc = parts.data() + static_cast<size_t>(at::get_thread_num()) * K * C;
    for (int64_t r = begin; r < end; ++r) body(r, acc);
  });
  std::vector<double> out(static_cast<size_t>(K) * C, 0.0);
  for (int t = 0; t < nt; ++t)
    for (int64_t j = 0; j < K * C; ++j) out[j] += parts[static_cast<size_t>(t) * K * C + j];
  return out;
}

struct Shape {
  int64_t N, C, HW;
  explicit Shape(const at::Tensor& x) : N(x.size(0)), C(x.size(1)), HW(x.size(2) * x.size(3)) {}
};

std::tuple<at::Tensor, at::Tensor> stats_cpu(const at::Tensor& x) {
  const Shape sh(x);
  at::Tensor mean = at::empty({sh.C}, x.options()), var = at::empty({sh.C}, x.options());
  const double M = static_cast<double>(sh.N * sh.HW);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_conv2d_stats", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* mp = mean.mutable_data_ptr<scalar_t>();
    scalar_t* vp = var.mutable_data_ptr<scalar_t>();
    if (!is_channels_last(x)) {
      // Two passes per channel (mean, then squared deviations) for the accuracy of ATen's batch norm.
      at::parallel_for(0, sh.C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          double s = 0, q = 0;
          for (int64_t n = 0; n < sh.N; ++n) row_stats_sum(xp + (n * sh.C + c) * sh.HW, sh.HW, s);
          const scalar_t m = static_cast<scalar_t>(s / M);
          for (int64_t n = 0; n < sh.N; ++n) row_stats_sqdev(xp + (n * sh.C + c) * sh.HW, sh.HW, m, q);
          mp[c] = m;
          vp[c] = static_cast<scalar_t>(q / M);
        }
      });
    } else {
      const int64_t C = sh.C, rows = sh.N * sh.HW;
      std::vector<double> sums = nhwc_reduce(rows, C, 1, [&](int64_t r, double* acc) {
        const scalar_t* row = xp + r * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += row[c];
      });
      std::vector<scalar_t> m(C);
      for (int64_t c = 0; c < C; ++c) m[c] = mp[c] = static_cast<scalar_t>(sums[c] / M);
      std::vector<double> sq = nhwc_reduce(rows, C, 1, [&](int64_t r, double* acc) {
        const scalar_t* row = xp + r * C;
        for (int64_t c = 0; c < C; ++c) {
          const double d = double(row[c] - m[c]);
          acc[c] += d * d;
        }
      });
      for (int64_t c = 0; c < C; ++c) vp[c] = static_cast<scalar_t>(sq[c] / M);
    }
  });
  return {mean, var};
}

at::Tensor bn_relu_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const Drop& drop) {
  no_fused_drop(drop, "bn_relu_cpu");
  const Shape sh(x);
  at::Tensor y = at::empty_like(x, x.options(), format_of(x));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_conv2d_bn_relu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const scalar_t* sp = scale.const_data_ptr<scalar_t>();
    const scalar_t* bp = shift.const_data_ptr<scalar_t>();
    if (!is_channels_last(x)) {
      at::parallel_for(0, sh.N * sh.C, std::max<int64_t>(1, 32768 / sh.HW), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          row_bn_relu(xp + r * sh.HW, yp + r * sh.HW, sh.HW, sp[r % sh.C], bp[r % sh.C]);
      });
    } else {
      at::parallel_for(0, sh.N * sh.HW, std::max<int64_t>(1, 32768 / sh.C), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) pixel_bn_relu(xp + r * sh.C, yp + r * sh.C, sh.C, sp, bp);
      });
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> reduce_cpu(const at::Tensor& g, const at::Tensor& x, const at::Tensor& scale,
                                              const at::Tensor& shift, const at::Tensor& mean, const Drop& drop) {
  no_fused_drop(drop, "reduce_cpu");
  const Shape sh(x);
  at::Tensor sum_dz = at::empty({sh.C}, scale.options()), sum_dzx = at::empty({sh.C}, scale.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_conv2d_reduce", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = scale.const_data_ptr<scalar_t>();
    const scalar_t* bp = shift.const_data_ptr<scalar_t>();
    const scalar_t* mp = mean.const_data_ptr<scalar_t>();
    scalar_t* o1 = sum_dz.mutable_data_ptr<scalar_t>();
    scalar_t* o2 = sum_dzx.mutable_data_ptr<scalar_t>();
    if (!is_channels_last(x)) {
      at::parallel_for(0, sh.C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          double s1 = 0, s2 = 0;
          for (int64_t n = 0; n < sh.N; ++n) {
            const int64_t off = (n * sh.C + c) * sh.HW;
            row_reduce(gp + off, xp + off, sh.HW, sp[c], bp[c], mp[c], s1, s2);
          }
          o1[c] = static_cast<scalar_t>(s1);
          o2[c] = static_cast<scalar_t>(s2);
        }
      });
    } else {
      const int64_t C = sh.C;
      std::vector<double> sums = nhwc_reduce(sh.N * sh.HW, C, 2, [&](int64_t r, double* acc) {
        scalar_t dz[256];
        for (int64_t c0 = 0; c0 < C; c0 += 256) {
          const int64_t n = std::min<int64_t>(256, C - c0);
          const int64_t off = r * C + c0;
          pixel_dz(gp + off, xp + off, dz, n, sp + c0, bp + c0);
          for (int64_t c = 0; c < n; ++c) {
            acc[c0 + c] += dz[c];
            acc[C + c0 + c] += double(dz[c]) * double(xp[off + c] - mp[c0 + c]);
          }
        }
      });
      for (int64_t c = 0; c < C; ++c) {
        o1[c] = static_cast<scalar_t>(sums[c]);
        o2[c] = static_cast<scalar_t>(sums[C + c]);
      }
    }
  });
  return {sum_dz, sum_dzx};
}

at::Tensor grad_input_cpu(const at::Tensor& g, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                          const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& gamma, const Drop& drop) {
  no_fused_drop(drop, "grad_input_cpu");
  const Shape sh(x);
  at::Tensor gx = at::empty_like(x, x.options(), format_of(x));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_conv2d_grad_input", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = gx.mutable_data_ptr<scalar_t>();
    const scalar_t* sp = scale.const_data_ptr<scalar_t>();
    const scalar_t* bp = shift.const_data_ptr<scalar_t>();
    const scalar_t* ap = alpha.const_data_ptr<scalar_t>();
    const scalar_t* betap = beta.const_data_ptr<scalar_t>();
    const scalar_t* gap = gamma.const_data_ptr<scalar_t>();
    if (!is_channels_last(x)) {
      at::parallel_for(0, sh.N * sh.C, std::max<int64_t>(1, 32768 / sh.HW), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t c = r % sh.C, off = r * sh.HW;
          row_grad_input(gp + off, xp + off, op + off, sh.HW, sp[c], bp[c], ap[c], betap[c], gap[c]);
        }
      });
    } else {
      const int64_t C = sh.C;
      at::parallel_for(0, sh.N * sh.HW, std::max<int64_t>(1, 32768 / C), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t off = r * C;
          pixel_dz(gp + off, xp + off, op + off, C, sp, bp);  // dz first, in place in grad_input's row
          for (int64_t c = 0; c < C; ++c) op[off + c] = op[off + c] * ap[c] + (xp[off + c] * betap[c] + gap[c]);
        }
      });
    }
  });
  return gx;
}

const Prims kCpuPrims{stats_cpu, bn_relu_cpu, reduce_cpu, grad_input_cpu, /*fuses_dropout=*/false};

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_conv2d_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool training, double eps,
    const std::optional<at::Tensor>& drop_mask, double drop_rate) {
  return forward(kCpuPrims, "bn_relu_conv2d", input, weight, bias, running_mean, running_var, conv_weight, conv_bias,
                 stride, padding, dilation, groups, training, eps, drop_mask, drop_rate, c10::DeviceType::CPU, {at::kFloat, at::kDouble});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& conv_weight, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, bool training, double eps, bool has_conv_bias, const std::optional<at::Tensor>& drop_mask,
    double drop_rate) {
  return backward(kCpuPrims, "bn_relu_conv2d_backward", grad_output, input, weight, bias, mean, var, conv_weight,
                  stride, padding, dilation, groups, training, eps, has_conv_bias, drop_mask, drop_rate, c10::DeviceType::CPU,
                  {at::kFloat, at::kDouble});
}

}  // namespace
}  // namespace bn_relu_conv
}  // namespace lightcnn

TORCH_LIBRARY_FRAGMENT(lightcnn, m) {
  // Returns (output, mean, var): the batch mean and biased variance in training, copies of the running
  // statistics in eval; the caller updates the running statistics from them (the op is functional).
  // With drop_mask (bool, the input's shape) the BN-ReLU output is multiplied by mask / (1 - drop_rate).
  m.def(
      "bn_relu_conv2d(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "Tensor conv_weight, Tensor? conv_bias, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "bool training, float eps, Tensor? drop_mask=None, float drop_rate=0.) -> (Tensor, Tensor, Tensor)");
  // Returns grads of (input, weight, bias, conv_weight, conv_bias); recomputes relu(bn(input)).
  m.def(
      "bn_relu_conv2d_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor var, Tensor conv_weight, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "bool training, float eps, bool has_conv_bias, Tensor? drop_mask=None, float drop_rate=0.) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lightcnn, CPU, m) {
  m.impl("bn_relu_conv2d", &lightcnn::bn_relu_conv::bn_relu_conv2d_cpu);
  m.impl("bn_relu_conv2d_backward", &lightcnn::bn_relu_conv::bn_relu_conv2d_backward_cpu);
}
