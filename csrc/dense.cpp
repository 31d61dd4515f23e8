// BN -> ReLU -> Conv2d over a list of feature maps (a DenseNet layer's bottleneck, or a transition):
// the schemas of torch.ops.lightcnn.dense_bn_relu_conv2d{,_backward} and their CPU kernels. The shared
// logic is in dense.h; here are the three CPU primitives, for NCHW rows (one channel of one image: the
// same H*W values in the feature and in its slice of the buffer; bn_relu_conv's row primitives, from
// bn_relu_rows.h) and NHWC pixels (the feature's k channels of a pixel are a run of the buffer's C
// channels of that pixel). The pre-activation v = fma(x, scale, shift) is rounded once in every path, so
// that the backward's ReLU mask (v > 0) is the forward's bit for bit. Sums accumulate in double.
#include "dense.h"

#include "bn_relu_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace lightcnn {
namespace dense {
namespace {

using bn_relu_rows::relu_of;
using bn_relu_rows::row_bn_relu;
using bn_relu_rows::row_grad_input;
using bn_relu_rows::row_reduce;

// Where each channel of the concatenation lives: feature j holds channels [c0[j], c0[j] + k[j]).
struct Pieces {
  std::vector<int64_t> c0, k, piece_of;  // piece_of[c] = j
  int64_t N, C, HW;
  Pieces(const std::vector<at::Tensor>& feats, int64_t C_)
      : N(feats[0].size(0)), C(C_), HW(feats[0].size(2) * feats[0].size(3)) {
    int64_t c = 0;
    for (size_t j = 0; j < feats.size(); ++j) {
      c0.push_back(c);
      k.push_back(feats[j].size(1));
      for (int64_t i = 0; i < feats[j].size(1); ++i) piece_of.push_back(static_cast<int64_t>(j));
      c += feats[j].size(1);
    }
  }
};

template <typename T>
std::vector<const T*> in_ptrs(const std::vector<at::Tensor>& feats) {
  std::vector<const T*> p;
  for (const auto& f : feats) p.push_back(f.const_data_ptr<T>());
  return p;
}

// Row r = n * C + c of the buffer is row n * k_j + (c - c0_j) of feature j.
inline int64_t feature_row(const Pieces& P, int64_t r, int64_t& j, int64_t& c) {
  const int64_t n = r / P.C;
  c = r - n * P.C;
  j = P.piece_of[c];
  return n * P.k[j] + (c - P.c0[j]);
}

void bn_relu_into_cpu(at::Tensor& y, const std::vector<at::Tensor>& feats, const at::Tensor& scale,
                      const at::Tensor& shift) {
  const Pieces P(feats, y.size(1));
  const bool cl = common_format(feats) == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "dense_bn_relu_conv2d_bn_relu", [&] {
    const auto xs = in_ptrs<scalar_t>(feats);
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const scalar_t* sp = scale.const_data_ptr<scalar_t>();
    const scalar_t* bp = shift.const_data_ptr<scalar_t>();
    if (!cl) {
      at::parallel_for(0, P.N * P.C, std::max<int64_t>(1, 32768 / P.HW), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          int64_t j, c;
          const int64_t fr = feature_row(P, r, j, c);
          row_bn_relu(xs[j] + fr * P.HW, yp + r * P.HW, P.HW, sp[c], bp[c]);
        }
      });
    } else {
      at::parallel_for(0, P.N * P.HW, std::max<int64_t>(1, 32768 / P.C), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p)
          for (size_t j = 0; j < xs.size(); ++j) {
            const scalar_t* x = xs[j] + p * P.k[j];
            scalar_t* yr = yp + p * P.C + P.c0[j];
            const scalar_t *s = sp + P.c0[j], *b = bp + P.c0[j];
            for (int64_t c = 0; c < P.k[j]; ++c) yr[c] = relu_of(std::fma(x[c], s[c], b[c]));
          }
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> reduce_from_cpu(const at::Tensor& g, const std::vector<at::Tensor>& feats,
                                                   const at::Tensor& scale, const at::Tensor& shift,
                                                   const at::Tensor& mean) {
  const Pieces P(feats, g.size(1));
  const bool cl = common_format(feats) == at::MemoryFormat::ChannelsLast;
  at::Tensor sum_dz = at::empty({P.C}, scale.options()), sum_dzx = at::empty({P.C}, scale.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "dense_bn_relu_conv2d_reduce", [&] {
    const auto xs = in_ptrs<scalar_t>(feats);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* sp = scale.const_data_ptr<scalar_t>();
    const scalar_t* bp = shift.const_data_ptr<scalar_t>();
    const scalar_t* mp = mean.const_data_ptr<scalar_t>();
    scalar_t* o1 = sum_dz.mutable_data_ptr<scalar_t>();
    scalar_t* o2 = sum_dzx.mutable_data_ptr<scalar_t>();
    if (!cl) {
      at::parallel_for(0, P.C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t j = P.piece_of[c], lc = c - P.c0[j];
          double s1 = 0, s2 = 0;
          for (int64_t n = 0; n < P.N; ++n)
            row_reduce(gp + (n * P.C + c) * P.HW, xs[j] + (n * P.k[j] + lc) * P.HW, P.HW, sp[c], bp[c], mp[c], s1,
                       s2);
          o1[c] = static_cast<scalar_t>(s1);
          o2[c] = static_cast<scalar_t>(s2);
        }
      });
    } else {
      // Per-thread partial sums over pixels, combined at the end.
      const int nt = at::get_num_threads();
      std::vector<double> parts(static_cast<size_t>(nt) * 2 * P.C, 0.0);
      at::parallel_for(0, P.N * P.HW, std::max<int64_t>(1, 32768 / P.C), [&](int64_t p0, int64_t p1) {
        double* acc = parts.data() + static_cast<size_t>(at::get_thread_num()) * 2 * P.C;
        for (int64_t p = p0; p < p1; ++p)
          for (size_t j = 0; j < xs.size(); ++j) {
            const scalar_t* x = xs[j] + p * P.k[j];
            const scalar_t* gr = gp + p * P.C + P.c0[j];
            for (int64_t lc = 0; lc < P.k[j]; ++lc) {
              const int64_t c = P.c0[j] + lc;
              const scalar_t dz = std::fma(x[lc], sp[c], bp[c]) > scalar_t(0) ? gr[lc] : scalar_t(0);
              acc[c] += dz;
              acc[P.C + c] += double(dz) * double(x[lc] - mp[c]);
            }
          }
      });
      for (int64_t c = 0; c < P.C; ++c) {
        double s1 = 0, s2 = 0;
        for (int t = 0; t < nt; ++t) {
          s1 += parts[static_cast<size_t>(t) * 2 * P.C + c];
          s2 += parts[static_cast<size_t>(t) * 2 * P.C + P.C + c];
        }
        o1[c] = static_cast<scalar_t>(s1);
        o2[c] = static_cast<scalar_t>(s2);
      }
    }
  });
  return {sum_dz, sum_dzx};
}

std::vector<at::Tensor> grad_inputs_cpu(const at::Tensor& g, const std::vector<at::Tensor>& feats,
                                        const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& alpha,
                                        const at::Tensor& beta, const at::Tensor& gamma) {
  const Pieces P(feats, g.size(1));
  const bool cl = common_format(feats) == at::MemoryFormat::ChannelsLast;
  std::vector<at::Tensor> grads;
  for (const auto& f : feats) grads.push_back(at::empty_like(f, f.options(), common_format(feats)));
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "dense_bn_relu_conv2d_grad_input", [&] {
    const auto xs = in_ptrs<scalar_t>(feats);
    std::vector<scalar_t*> os;
    for (auto& t : grads) os.push_back(t.mutable_data_ptr<scalar_t>());
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* sp = scale.const_data_ptr<scalar_t>();
    const scalar_t* bp = shift.const_data_ptr<scalar_t>();
    const scalar_t* ap = alpha.const_data_ptr<scalar_t>();
    const scalar_t* betap = beta.const_data_ptr<scalar_t>();
    const scalar_t* gap = gamma.const_data_ptr<scalar_t>();
    if (!cl) {
      at::parallel_for(0, P.N * P.C, std::max<int64_t>(1, 32768 / P.HW), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          int64_t j, c;
          const int64_t fr = feature_row(P, r, j, c);
          row_grad_input(gp + r * P.HW, xs[j] + fr * P.HW, os[j] + fr * P.HW, P.HW, sp[c], bp[c], ap[c], betap[c],
                         gap[c]);
        }
      });
    } else {
      at::parallel_for(0, P.N * P.HW, std::max<int64_t>(1, 32768 / P.C), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p)
          for (size_t j = 0; j < xs.size(); ++j) {
            const scalar_t* x = xs[j] + p * P.k[j];
            const scalar_t* gr = gp + p * P.C + P.c0[j];
            scalar_t* o = os[j] + p * P.k[j];
            for (int64_t lc = 0; lc < P.k[j]; ++lc) {
              const int64_t c = P.c0[j] + lc;
              const scalar_t dz = std::fma(x[lc], sp[c], bp[c]) > scalar_t(0) ? gr[lc] : scalar_t(0);
              o[lc] = dz * ap[c] + (x[lc] * betap[c] + gap[c]);
            }
          }
      });
    }
  });
  return grads;
}

const DensePrims kCpuPrims{bn_relu_into_cpu, reduce_from_cpu, grad_inputs_cpu};

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_bn_relu_conv2d_cpu(
    at::TensorList features, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const at::Tensor& conv_weight, at::IntArrayRef padding, bool training, double eps) {
  return forward(kCpuPrims, "dense_bn_relu_conv2d", features, weight, bias, running_mean, running_var, conv_weight,
                 padding, training, eps, c10::DeviceType::CPU, {at::kFloat, at::kDouble});
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> dense_bn_relu_conv2d_backward_cpu(
    const at::Tensor& grad_output, at::TensorList features, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& conv_weight, at::IntArrayRef padding, bool training, double eps) {
  return backward(kCpuPrims, "dense_bn_relu_conv2d_backward", grad_output, features, weight, bias, mean, var,
                  conv_weight, padding, training, eps, c10::DeviceType::CPU, {at::kFloat, at::kDouble});
}

}  // namespace
}  // namespace dense
}  // namespace lightcnn

TORCH_LIBRARY_FRAGMENT(lightcnn, m) {
  // conv2d(relu(batch_norm(cat(features, 1)))) with stride 1, no conv bias; returns (output, mean, var):
  // the batch mean and biased variance of the concatenation's channels in training, copies of the running
  // statistics in eval. The caller updates the running statistics from them (the op is functional).
  m.def(
      "dense_bn_relu_conv2d(Tensor[] features, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, Tensor conv_weight, int[2] padding, bool training, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  // Returns grads of (features, weight, bias, conv_weight); recomputes relu(bn(cat(features))).
  m.def(
      "dense_bn_relu_conv2d_backward(Tensor grad_output, Tensor[] features, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor var, Tensor conv_weight, int[2] padding, bool training, float eps) "
      "-> (Tensor[], Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lightcnn, CPU, m) {
  m.impl("dense_bn_relu_conv2d", &lightcnn::dense::dense_bn_relu_conv2d_cpu);
  m.impl("dense_bn_relu_conv2d_backward", &lightcnn::dense::dense_bn_relu_conv2d_backward_cpu);
}
