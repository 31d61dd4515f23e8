// Local response normalisation on the CPU, and the schemas of torch.ops.lightcnn.lrn / lrn_backward.
//
// Channels-first layout: each task takes one image and a tile of L spatial positions, and walks the
// channels once with a running sum of squares per position (one add and one subtract per channel,
// whatever the window size), so the input is read about once and the output written once. The
// running sums live in an L1-sized buffer and the inner loops run along contiguous memory, vectorised.
// Channels-last layout: each task takes spatial positions, whose channels are contiguous.
//
// The backward saves nothing but the input: it recomputes the scale with the same running sum,
// then sums g*a*s^(-beta-1) over the mirrored window with a second running sum.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "lrn.h"

namespace lightcnn {
namespace {

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
// 1/sqrt(x) to ~2 ulp: the hardware estimate (12 bits) and one Newton step, 4x cheaper than sqrt + div.
inline __m256 rsqrt_nr(__m256 x) {
  const __m256 r = _mm256_rsqrt_ps(x);
  const __m256 hx_r = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), r);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(hx_r, r, _mm256_set1_ps(1.5f)));
}
#define LIGHTCNN_FAST_RSQRT 1
#endif

template <typename acc_t>
inline at::vec::Vectorized<acc_t> neg_pow(at::vec::Vectorized<acc_t> s, PowMode mode, acc_t beta) {
  using Vec = at::vec::Vectorized<acc_t>;
#ifdef LIGHTCNN_FAST_RSQRT
  if constexpr (std::is_same_v<acc_t, float>) {
    if (mode == PowMode::ThreeQuarters) {
      const __m256 r = rsqrt_nr(s);  // s^-1/2
      return Vec(_mm256_mul_ps(r, rsqrt_nr(_mm256_mul_ps(s, r))));  // s^-1/2 * (s^1/2)^-1/2
    }
  }
#endif
  switch (mode) {
    case PowMode::ThreeQuarters: {
      Vec r = s.rsqrt();  // s^-1/2
      return r * r.sqrt();  // s^-1/2 * s^-1/4
    }
    case PowMode::Half:
      return s.rsqrt();
    case PowMode::One:
      return s.reciprocal();
    default:
      return (s.log() * Vec(-beta)).exp();
  }
}

// scale[i] = s^-beta with s = k + coef * sum[i]; if inv_s is given, also inv_s[i] = 1 / s.
template <typename acc_t>
inline void scale_from_sum(const acc_t* __restrict sum, acc_t* __restrict scale, acc_t* __restrict inv_s, int64_t len,
                           acc_t k, acc_t coef, PowMode mode, acc_t beta) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vk(k), vcoef(coef), one(acc_t(1));
  int64_t i = 0;
  for (; i + Vec::size() <= len; i += Vec::size()) {
    Vec s = at::vec::fmadd(vcoef, Vec::loadu(sum + i), vk);
    neg_pow(s, mode, beta).store(scale + i);
    if (inv_s) (one / s).store(inv_s + i);
  }
  if (i < len) {
    const int64_t rest = len - i;
    Vec s = at::vec::fmadd(vcoef, Vec::loadu(sum + i, rest), vk);
    neg_pow(s, mode, beta).store(scale + i, rest);
    if (inv_s) (one / s).store(inv_s + i, rest);
  }
}

// y[i] = x[i] * (k + coef * sum[i])^-beta. float and double: one vectorised pass over the row;
// reduced precision: the scale in acc_t into `scratch` first, then the rounding multiply.
template <typename scalar_t, typename acc_t>
inline void normalize_row(const acc_t* __restrict sum, const scalar_t* __restrict x, scalar_t* __restrict y,
                          acc_t* __restrict scratch, int64_t len, acc_t k, acc_t coef, PowMode mode, acc_t beta) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = at::vec::Vectorized<acc_t>;
    const Vec vk(k), vcoef(coef);
    int64_t i = 0;
    for (; i + Vec::size() <= len; i += Vec::size()) {
      const Vec s = at::vec::fmadd(vcoef, Vec::loadu(sum + i), vk);
      (Vec::loadu(x + i) * neg_pow(s, mode, beta)).store(y + i);
    }
    if (i < len) {
      const int64_t rest = len - i;
      const Vec s = at::vec::fmadd(vcoef, Vec::loadu(sum + i, rest), vk);
      (Vec::loadu(x + i, rest) * neg_pow(s, mode, beta)).store(y + i, rest);
    }
  } else {
    scale_from_sum<acc_t>(sum, scratch, nullptr, len, k, coef, mode, beta);
    for (int64_t i = 0; i < len; ++i) y[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * scratch[i]);
  }
}

// sum[i] += add[i]^2 - sub[i]^2, either pointer may be null.
template <typename scalar_t, typename acc_t>
inline void slide_sq(acc_t* __restrict sum, const scalar_t* __restrict add, const scalar_t* __restrict sub,
                     int64_t len) {
  if (add && sub) {
    for (int64_t i = 0; i < len; ++i) {
      const acc_t a = add[i], b = sub[i];
      sum[i] += a * a - b * b;
    }
  } else if (add) {
    for (int64_t i = 0; i < len; ++i) {
      const acc_t a = add[i];
      sum[i] += a * a;
    }
  } else if (sub) {
    for (int64_t i = 0; i < len; ++i) {
      const acc_t b = sub[i];
      sum[i] -= b * b;
    }
  }
}

// sum[i] += add[i] - sub[i] on acc_t rows, either pointer may be null.
template <typename acc_t>
inline void slide(acc_t* __restrict sum, const acc_t* __restrict add, const acc_t* __restrict sub, int64_t len) {
  if (add) for (int64_t i = 0; i < len; ++i) sum[i] += add[i];
  if (sub) for (int64_t i = 0; i < len; ++i) sum[i] -= sub[i];
}

struct Window {
  int64_t lo, hi;  // the window of channel c is [c - lo, c + hi]
  explicit Window(int64_t size) : lo(size / 2), hi((size - 1) / 2) {}
};

// For a tile of `len` positions of one image (channel rows S apart), the running sums of a^2 over the
// window of channel 0, then 1, 2, ...: `next()` adds the row entering and subtracts the row leaving.
template <typename scalar_t, typename acc_t>
class SquareWindowRows {
 public:
  SquareWindowRows(const scalar_t* xb, int64_t C, int64_t S, int64_t len, const Window& w, acc_t* sum)
      : xb_(xb), C_(C), S_(S), len_(len), w_(w), sum_(sum) {
    std::fill(sum_, sum_ + len_, acc_t(0));
    for (int64_t j = 0; j <= std::min(w_.hi, C_ - 1); ++j) slide_sq<scalar_t, acc_t>(sum_, xb_ + j * S_, nullptr, len_);
  }
  const acc_t* next() {
    if (c_ > 0) {
      const int64_t in = c_ + w_.hi, out = c_ - w_.lo - 1;
      slide_sq<scalar_t, acc_t>(sum_, in < C_ ? xb_ + in * S_ : nullptr, out >= 0 ? xb_ + out * S_ : nullptr, len_);
    }
    ++c_;
    return sum_;
  }

 private:
  const scalar_t* xb_;
  int64_t C_, S_, len_;
  Window w_;
  acc_t* sum_;
  int64_t c_ = 0;
};

// ---------------------------------------------------------------------------------------------------
// Channels-first: x is (N, C, S) contiguous. A task takes one image and a tile of up to kMaxTile
// spatial positions: whole planes where they fit, so that every channel row is one long contiguous
// stream (short strided segments defeat the hardware prefetcher and cost ~1.6x).

constexpr int64_t kMaxTile = 4096;

struct Tiling {
  int64_t len, tiles;  // positions per tile (a multiple of 16 unless the plane is smaller), tiles per image
};

// Whole planes up to kMaxTile positions, split further when there are too few tasks for the threads.
inline Tiling tiling(int64_t N, int64_t S) {
  int64_t tiles = (S + kMaxTile - 1) / kMaxTile;
  const int64_t want = 4 * at::get_num_threads();
  if (N * tiles < want) tiles = std::min<int64_t>((want + N - 1) / N, (S + 15) / 16);
  int64_t len = (S + tiles - 1) / tiles;
  if (len < S) len = (len + 15) / 16 * 16;
  return {len, (S + len - 1) / len};
}

template <typename scalar_t>
void forward_channels_first(const scalar_t* x, scalar_t* y, int64_t N, int64_t C, int64_t S, int64_t size,
                            double alpha, double beta, double k) {
  using acc_t = at::opmath_type<scalar_t>;
  const Window w(size);
  const acc_t coef = alpha / size;
  const PowMode mode = pow_mode(beta);
  const Tiling tl = tiling(N, S);
  at::parallel_for(0, N * tl.tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(tl.len), scale(tl.len);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tl.tiles, s0 = (t % tl.tiles) * tl.len, len = std::min(tl.len, S - s0);
      const scalar_t* xb = x + n * C * S + s0;
      scalar_t* yb = y + n * C * S + s0;
      SquareWindowRows<scalar_t, acc_t> window(xb, C, S, len, w, sum.data());
      for (int64_t c = 0; c < C; ++c)
        normalize_row<scalar_t, acc_t>(window.next(), xb + c * S, yb + c * S, scale.data(), len, k, coef, mode, beta);
    }
  });
}

// One pipelined pass over the channels: step c computes s_c^-beta and t_c = g_c a_c s_c^-beta / s_c
// into a ring of R rows, and emits da_j for j = c - lo, whose mirrored window [j - hi, j + lo] of t
// is then complete. The ring holds rows j - hi - 1 .. j + lo, so R = size + 1 (at most C + 1) rows.
template <typename scalar_t>
void backward_channels_first(const scalar_t* g, const scalar_t* x, scalar_t* dx, int64_t N, int64_t C, int64_t S,
                             int64_t size, double alpha, double beta, double k) {
  using acc_t = at::opmath_type<scalar_t>;
  const Window w(size);
  const acc_t coef = alpha / size, coef2 = 2.0 * alpha * beta / size;
  const PowMode mode = pow_mode(beta);
  const Tiling tl = tiling(N, S);
  const int64_t R = std::min(size + 1, C + 1), L = tl.len;
  at::parallel_for(0, N * tl.tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scale_ring(R * L), t_ring(R * L), sum(L), inv_s(L), tsum(L);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tl.tiles, s0 = (t % tl.tiles) * L, len = std::min(L, S - s0);
      const int64_t off = n * C * S + s0;
      const scalar_t *xb = x + off, *gb = g + off;
      scalar_t* db = dx + off;
      SquareWindowRows<scalar_t, acc_t> window(xb, C, S, len, w, sum.data());
      std::fill(tsum.begin(), tsum.begin() + len, acc_t(0));
      for (int64_t c = 0; c < C + w.lo; ++c) {
        if (c < C) {  // t_c enters the window sum of j = c - lo
          acc_t* sc = scale_ring.data() + (c % R) * L;
          acc_t* tc = t_ring.data() + (c % R) * L;
          scale_from_sum<acc_t>(window.next(), sc, inv_s.data(), len, k, coef, mode, beta);
          const scalar_t *xc = xb + c * S, *gc = gb + c * S;
          for (int64_t i = 0; i < len; ++i) {
            tc[i] = static_cast<acc_t>(gc[i]) * static_cast<acc_t>(xc[i]) * sc[i] * inv_s[i];
            tsum[i] += tc[i];
          }
        }
        const int64_t j = c - w.lo, out = j - w.hi - 1;
        if (j < 0) continue;
        if (out >= 0) slide<acc_t>(tsum.data(), nullptr, t_ring.data() + (out % R) * L, len);
        const acc_t* sj = scale_ring.data() + (j % R) * L;
        const scalar_t *xj = xb + j * S, *gj = gb + j * S;
        scalar_t* dj = db + j * S;
        for (int64_t i = 0; i < len; ++i)
          dj[i] = static_cast<scalar_t>(static_cast<acc_t>(gj[i]) * sj[i] - coef2 * static_cast<acc_t>(xj[i]) * tsum[i]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Channels-last: x is (N, S, C) contiguous; each position's C channels are one contiguous row.

// out[c] = the sum of v[j] over j in [c - left, c - left + size - 1], clipped to [0, C), along one row.
// Windows of up to 16 channels: `size` shifted adds over a zero-padded copy, which vectorise (no serial
// dependency from channel to channel); wider windows: one running sum.
template <typename acc_t>
inline void window_sum(const acc_t* __restrict v, acc_t* __restrict out, acc_t* __restrict pad, int64_t C,
                       int64_t left, int64_t size) {
  if (size <= 16) {
    std::fill(pad, pad + left, acc_t(0));
    std::copy(v, v + C, pad + left);
    std::fill(pad + left + C, pad + C + size - 1, acc_t(0));
    std::copy(pad, pad + C, out);
    for (int64_t d = 1; d < size; ++d)
      for (int64_t c = 0; c < C; ++c) out[c] += pad[c + d];
    return;
  }
  acc_t run = 0;
  for (int64_t j = 0; j <= std::min(size - 1 - left, C - 1); ++j) run += v[j];
  for (int64_t c = 0; c < C; ++c) {
    if (c > 0) {
      const int64_t in = c - left + size - 1, gone = c - left - 1;
      if (in < C) run += v[in];
      if (gone >= 0) run -= v[gone];
    }
    out[c] = run;
  }
}

// sum[c] = the sum of a^2 over the window of channel c, for one pixel's contiguous row of channels.
template <typename scalar_t, typename acc_t>
inline void window_sums_row(const scalar_t* xr, acc_t* sum, acc_t* sq, acc_t* pad, int64_t C, int64_t size) {
  for (int64_t c = 0; c < C; ++c) sq[c] = static_cast<acc_t>(xr[c]) * static_cast<acc_t>(xr[c]);
  window_sum<acc_t>(sq, sum, pad, C, size / 2, size);
}

template <typename scalar_t>
void forward_channels_last(const scalar_t* x, scalar_t* y, int64_t N, int64_t C, int64_t S, int64_t size,
                           double alpha, double beta, double k) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t coef = alpha / size;
  const PowMode mode = pow_mode(beta);
  at::parallel_for(0, N * S, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(C), scale(C), sq(C), pad(C + size);
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* xr = x + p * C;
      scalar_t* yr = y + p * C;
      window_sums_row<scalar_t, acc_t>(xr, sum.data(), sq.data(), pad.data(), C, size);
      normalize_row<scalar_t, acc_t>(sum.data(), xr, yr, scale.data(), C, k, coef, mode, beta);
    }
  });
}

template <typename scalar_t>
void backward_channels_last(const scalar_t* g, const scalar_t* x, scalar_t* dx, int64_t N, int64_t C, int64_t S,
                            int64_t size, double alpha, double beta, double k) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t coef = alpha / size, coef2 = 2.0 * alpha * beta / size;
  const PowMode mode = pow_mode(beta);
  at::parallel_for(0, N * S, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(C), scale(C), inv_s(C), tv(C), sq(C), pad(C + size);
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t *xr = x + p * C, *gr = g + p * C;
      scalar_t* dr = dx + p * C;
      window_sums_row<scalar_t, acc_t>(xr, sum.data(), sq.data(), pad.data(), C, size);
      scale_from_sum<acc_t>(sum.data(), scale.data(), inv_s.data(), C, k, coef, mode, beta);
      for (int64_t c = 0; c < C; ++c)
        tv[c] = static_cast<acc_t>(gr[c]) * static_cast<acc_t>(xr[c]) * scale[c] * inv_s[c];
      window_sum<acc_t>(tv.data(), sum.data(), pad.data(), C, (size - 1) / 2, size);  // mirrored window
      for (int64_t j = 0; j < C; ++j) {
        dr[j] = static_cast<scalar_t>(static_cast<acc_t>(gr[j]) * scale[j] - coef2 * static_cast<acc_t>(xr[j]) * sum[j]);
      }
    }
  });
}

void check_cpu(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected a CPU tensor, got one on ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, op,
              ": the CPU kernel takes float32, float64 or bfloat16, got ", st,
              " (lightcnn.ops.local_response_norm runs other dtypes on the PyTorch reference)");
}

at::Tensor lrn_cpu(const at::Tensor& input, int64_t size, double alpha, double beta, double k) {
  lrn_check(input, size, "lightcnn::lrn");
  check_cpu(input, "lightcnn::lrn");
  const LrnView v = lrn_view(input);
  at::Tensor out = at::empty_like(v.x);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, v.x.scalar_type(), "lrn_cpu", [&] {
    (v.channels_last ? forward_channels_last<scalar_t> : forward_channels_first<scalar_t>)(
        v.x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), v.N, v.C, v.S, size, alpha, beta, k);
  });
  return out;
}

at::Tensor lrn_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input, int64_t size, double alpha,
                            double beta, double k) {
  check_cpu(input, "lightcnn::lrn_backward");
  const auto [v, g, grad_input] = lrn_backward_operands(grad_output, input, size);
  if (grad_input.numel() == 0) return grad_input;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, v.x.scalar_type(), "lrn_backward_cpu", [&] {
    (v.channels_last ? backward_channels_last<scalar_t> : backward_channels_first<scalar_t>)(
        g.const_data_ptr<scalar_t>(), v.x.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(), v.N,
        v.C, v.S, size, alpha, beta, k);
  });
  return grad_input;
}

}  // namespace

}  // namespace lightcnn

TORCH_LIBRARY_FRAGMENT(lightcnn, m) {
  // b = a * (k + alpha/size * window sum of a^2)^-beta, exactly torch.nn.functional.local_response_norm.
  m.def("lrn(Tensor input, int size, float alpha, float beta, float k) -> Tensor");
  // The input gradient; recomputes the scale from the input (the forward keeps nothing else).
  m.def("lrn_backward(Tensor grad_output, Tensor input, int size, float alpha, float beta, float k) -> Tensor");
}

TORCH_LIBRARY_IMPL(lightcnn, CPU, m) {
  m.impl("lrn", &lightcnn::lrn_cpu);
  m.impl("lrn_backward", &lightcnn::lrn_backward_cpu);
}
