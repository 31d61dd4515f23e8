// Local response normalisation on the CPU, and the schemas of torch.ops.lightcnn.lrn / lrn_backward.
//
// Every window sum is recomputed from its n terms (rows still in the cache), never carried from one
// channel to the next by adding the entering term and subtracting the leaving one: such a running sum
// cancels catastrophically after a large term and keeps a NaN or Inf for every later channel, where
// torch.nn.functional.local_response_norm (an average pool: n terms per output too) confines them to the
// windows that hold them.
//
// Channels-first layout: each task takes one image and a tile of L spatial positions and walks the
// channels; for float and double, channel c's window sum over the tile's rows c - n/2 .. c + (n-1)/2, its
// scale and its output are one vectorised pass along contiguous memory, so the input is read from memory
// about once and the output written once. Channels-last layout: each task takes spatial positions, whose
// channels are contiguous, and forms the window sums as n shifted adds along the row.
//
// The backward saves nothing but the input: it recomputes the scale, then sums g*a*s^(-beta-1) over the
// mirrored window, pipelined over the channels through a ring of the last n rows.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <limits>
#include <type_traits>
#include <vector>

#include "lrn.h"

namespace lightcnn {
namespace {

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
// 1/sqrt(x) to ~2 ulp for normal finite x: the hardware estimate (12 bits) and one Newton step, 4x cheaper
// than sqrt + div. Not for 0, denormals or Inf (the Newton step makes 0 * Inf = NaN there).
inline __m256 rsqrt_nr(__m256 x) {
  const __m256 r = _mm256_rsqrt_ps(x);
  const __m256 hx_r = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), r);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(hx_r, r, _mm256_set1_ps(1.5f)));
}

// Whether all eight lanes are normal finite numbers (NaN is not).
inline bool all_normal(__m256 x) {
  const __m256 ge = _mm256_cmp_ps(x, _mm256_set1_ps(FLT_MIN), _CMP_GE_OQ);
  const __m256 le = _mm256_cmp_ps(x, _mm256_set1_ps(FLT_MAX), _CMP_LE_OQ);
  return _mm256_movemask_ps(_mm256_and_ps(ge, le)) == 0xFF;
}
#define LIGHTCNN_FAST_RSQRT 1
#endif

// s^-beta. At s = Inf it is 0 and at s = 0 Inf, so that x * s^-beta has the NaN/Inf pattern of the
// reference's x / s^beta.
template <typename acc_t>
inline Vec<acc_t> neg_pow(Vec<acc_t> s, PowMode mode, acc_t beta) {
#ifdef LIGHTCNN_FAST_RSQRT
  if constexpr (std::is_same_v<acc_t, float>) {
    if (mode == PowMode::ThreeQuarters && all_normal(s)) {
      const __m256 r = rsqrt_nr(s);  // s^-1/2
      return Vec<acc_t>(_mm256_mul_ps(r, rsqrt_nr(_mm256_mul_ps(s, r))));  // s^-1/2 * (s^1/2)^-1/2
    }
  }
#endif
  switch (mode) {
    case PowMode::ThreeQuarters: {
      Vec<acc_t> r = s.rsqrt();  // s^-1/2
      return r * r.sqrt();  // s^-1/2 * s^-1/4
    }
    case PowMode::Half:
      return s.rsqrt();
    case PowMode::One:
      return s.reciprocal();
    default:
      return (s.log() * Vec<acc_t>(-beta)).exp();
  }
}

// What the backward multiplies g*a*s^-beta by: 1/s, NaN where s > nan_above (see grad_nan_above).
template <typename acc_t>
inline Vec<acc_t> inv_scale(Vec<acc_t> s, Vec<acc_t> nan_above) {
  return Vec<acc_t>::blendv(Vec<acc_t>(acc_t(1)) / s, Vec<acc_t>(std::numeric_limits<acc_t>::quiet_NaN()),
                            s > nan_above);
}

// scale[i] = s^-beta with s = k + coef * sum[i]; if inv_s is given, also inv_s[i] = inv_scale(s).
template <typename acc_t>
inline void scale_from_sum(const acc_t* __restrict sum, acc_t* __restrict scale, acc_t* __restrict inv_s, int64_t len,
                           acc_t k, acc_t coef, PowMode mode, acc_t beta) {
  const Vec<acc_t> vk(k), vcoef(coef), nan_above(grad_nan_above<acc_t>(beta));
  for (int64_t i = 0; i < len; i += Vec<acc_t>::size()) {
    const int64_t rest = std::min<int64_t>(Vec<acc_t>::size(), len - i);
    const Vec<acc_t> s = at::vec::fmadd(vcoef, Vec<acc_t>::loadu(sum + i, rest), vk);
    neg_pow(s, mode, beta).store(scale + i, rest);
    if (inv_s) inv_scale(s, nan_above).store(inv_s + i, rest);
  }
}

// y[i] = x[i] * (k + coef * sum[i])^-beta. float and double: one vectorised pass over the row;
// reduced precision: the scale in acc_t into `scratch` first, then the rounding multiply.
template <typename scalar_t, typename acc_t>
inline void normalize_row(const acc_t* __restrict sum, const scalar_t* __restrict x, scalar_t* __restrict y,
                          acc_t* __restrict scratch, int64_t len, acc_t k, acc_t coef, PowMode mode, acc_t beta) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const Vec<acc_t> vk(k), vcoef(coef);
    for (int64_t i = 0; i < len; i += Vec<acc_t>::size()) {
      const int64_t rest = std::min<int64_t>(Vec<acc_t>::size(), len - i);
      const Vec<acc_t> s = at::vec::fmadd(vcoef, Vec<acc_t>::loadu(sum + i, rest), vk);
      (Vec<acc_t>::loadu(x + i, rest) * neg_pow(s, mode, beta)).store(y + i, rest);
    }
  } else {
    scale_from_sum<acc_t>(sum, scratch, nullptr, len, k, coef, mode, beta);
    for (int64_t i = 0; i < len; ++i) y[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * scratch[i]);
  }
}

// sum[i] = the sum of x[r * S + i]^2 over the rows r in [0, rows), in acc_t, row after row.
template <typename scalar_t, typename acc_t>
inline void square_sum_rows(const scalar_t* __restrict x, int64_t S, int64_t rows, int64_t len,
                            acc_t* __restrict sum) {
  for (int64_t i = 0; i < len; ++i) {
    const acc_t a = x[i];
    sum[i] = a * a;
  }
  for (int64_t r = 1; r < rows; ++r) {
    const scalar_t* xr = x + r * S;
    for (int64_t i = 0; i < len; ++i) {
      const acc_t a = xr[i];
      sum[i] += a * a;
    }
  }
}

// sum[i] = the sum of rows[r][i] over r in [0, n).
template <typename acc_t>
inline void sum_rows(const acc_t* const* rows, int64_t n, int64_t len, acc_t* __restrict sum) {
  std::copy(rows[0], rows[0] + len, sum);
  for (int64_t r = 1; r < n; ++r) {
    const acc_t* __restrict row = rows[r];
    for (int64_t i = 0; i < len; ++i) sum[i] += row[i];
  }
}

// The window of channel c is [c - lo, c + hi], clipped to [0, C).
struct Window {
  int64_t lo, hi, C;
  Window(int64_t size, int64_t C_) : lo(size / 2), hi((size - 1) / 2), C(C_) {}
  int64_t first(int64_t c) const { return std::max<int64_t>(c - lo, 0); }
  int64_t last(int64_t c) const { return std::min<int64_t>(c + hi, C - 1); }
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

// Calls f(std::integral_constant<int, K>) with K = rows for the common window sizes (loops over the rows then
// unroll at compile time), K = 0 (rows known at run time) otherwise.
template <typename F>
inline void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// One vector at p: all of it, or (Tail) its first `count` elements and zeros.
template <bool Tail, typename acc_t>
inline Vec<acc_t> load(const acc_t* p, int64_t count) {
  if constexpr (Tail) return Vec<acc_t>::loadu(p, count);
  else return Vec<acc_t>::loadu(p);
}

template <bool Tail, typename acc_t>
inline void store(Vec<acc_t> v, acc_t* p, int64_t count) {
  if constexpr (Tail) v.store(p, count);
  else v.store(p);
}

// The sum of x[r * S]^2 over r in [0, rows) (rows = K when K > 0), one vector of positions.
// Two chains (even and odd rows) halve the dependent fused multiply-adds.
template <int K, bool Tail, typename acc_t>
inline Vec<acc_t> square_sum(const acc_t* x, int64_t S, int64_t rows, int64_t count) {
  const int64_t R = K > 0 ? K : rows;
  Vec<acc_t> a = load<Tail>(x, count);
  Vec<acc_t> even = a * a, odd(acc_t(0));
  int64_t r = 1;
  for (; r + 1 < R; r += 2) {
    a = load<Tail>(x + r * S, count);
    odd = at::vec::fmadd(a, a, odd);
    a = load<Tail>(x + (r + 1) * S, count);
    even = at::vec::fmadd(a, a, even);
  }
  if (r < R) {
    a = load<Tail>(x + r * S, count);
    odd = at::vec::fmadd(a, a, odd);
  }
  return even + odd;
}

// The sum of rows[r][0..] over r in [0, m) (m = K when K > 0), one vector of positions.
template <int K, bool Tail, typename acc_t>
inline Vec<acc_t> rows_sum(const acc_t* const* rows, int64_t i, int64_t m, int64_t count) {
  const int64_t R = K > 0 ? K : m;
  Vec<acc_t> sum = load<Tail>(rows[0] + i, count);
  for (int64_t r = 1; r < R; ++r) sum = sum + load<Tail>(rows[r] + i, count);
  return sum;
}

// Runs body<Tail>(i, count) over the vectors of [0, len): full vectors, then the remainder.
template <typename acc_t, typename Body>
inline void for_vectors(int64_t len, Body&& body) {
  constexpr int64_t V = Vec<acc_t>::size();
  int64_t i = 0;
  for (; i + V <= len; i += V) body(std::false_type{}, i, V);
  if (i < len) body(std::true_type{}, i, len - i);
}

// The constants of s = k + coef * sum and s^-beta.
template <typename acc_t>
struct ScaleArgs {
  Vec<acc_t> k, coef, nan_above;
  PowMode mode;
  acc_t beta;
  ScaleArgs(double k_, double coef_, double beta_)
      : k(acc_t(k_)), coef(acc_t(coef_)), nan_above(grad_nan_above<acc_t>(beta_)), mode(pow_mode(beta_)),
        beta(acc_t(beta_)) {}
};

// Forward of one channel row, float and double: y = x_c * (k + coef * the sum of x^2 over the `rows` rows
// from xw)^-beta, the window's squares summed in registers: one vectorised pass.
template <int K, typename acc_t>
inline void forward_row(const acc_t* __restrict xw, int64_t S, int64_t rows, const acc_t* __restrict xc,
                        acc_t* __restrict y, int64_t len, const ScaleArgs<acc_t>& a) {
  for_vectors<acc_t>(len, [&](auto tail, int64_t i, int64_t count) {
    constexpr bool T = decltype(tail)::value;
    const Vec<acc_t> s = at::vec::fmadd(a.coef, square_sum<K, T>(xw + i, S, rows, count), a.k);
    store<T>(load<T>(xc + i, count) * neg_pow(s, a.mode, a.beta), y + i, count);
  });
}

template <typename scalar_t>
void forward_channels_first(const scalar_t* x, scalar_t* y, int64_t N, int64_t C, int64_t S, int64_t size,
                            double alpha, double beta, double k) {
  using acc_t = at::opmath_type<scalar_t>;
  const Window w(size, C);
  const acc_t coef = alpha / size;
  const PowMode mode = pow_mode(beta);
  const ScaleArgs<acc_t> args(k, alpha / size, beta);
  const Tiling tl = tiling(N, S);
  at::parallel_for(0, N * tl.tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(tl.len), scale(tl.len);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tl.tiles, s0 = (t % tl.tiles) * tl.len, len = std::min(tl.len, S - s0);
      const scalar_t* xb = x + n * C * S + s0;
      scalar_t* yb = y + n * C * S + s0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t j0 = w.first(c), rows = w.last(c) - j0 + 1;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          with_rows(rows, [&](auto K) {
            forward_row<decltype(K)::value, acc_t>(xb + j0 * S, S, rows, xb + c * S, yb + c * S, len, args);
          });
        } else {
          square_sum_rows<scalar_t, acc_t>(xb + j0 * S, S, rows, len, sum.data());
          normalize_row<scalar_t, acc_t>(sum.data(), xb + c * S, yb + c * S, scale.data(), len, k, coef, mode, beta);
        }
      }
    }
  });
}

// Backward step 1 of one channel row, float and double: p = s^-beta and t = g x p / s (inv_scale) of
// channel c into the rings, the window's squares summed in registers.
template <int K, typename acc_t>
inline void backward_scale_row(const acc_t* __restrict xw, int64_t S, int64_t rows, const acc_t* __restrict xc,
                               const acc_t* __restrict gc, acc_t* __restrict pc, acc_t* __restrict tc, int64_t len,
                               const ScaleArgs<acc_t>& a) {
  for_vectors<acc_t>(len, [&](auto tail, int64_t i, int64_t count) {
    constexpr bool T = decltype(tail)::value;
    const Vec<acc_t> s = at::vec::fmadd(a.coef, square_sum<K, T>(xw + i, S, rows, count), a.k);
    const Vec<acc_t> p = neg_pow(s, a.mode, a.beta);
    store<T>(p, pc + i, count);
    store<T>(load<T>(gc + i, count) * load<T>(xc + i, count) * p * inv_scale(s, a.nan_above), tc + i, count);
  });
}

// Backward step 2 of one channel row j, float and double: da = g p - coef2 x (the sum of the m rows of t).
template <int K, typename acc_t>
inline void backward_grad_row(const acc_t* const* trows, int64_t m, const acc_t* __restrict pj,
                              const acc_t* __restrict xj, const acc_t* __restrict gj, acc_t* __restrict dj,
                              int64_t len, Vec<acc_t> coef2) {
  for_vectors<acc_t>(len, [&](auto tail, int64_t i, int64_t count) {
    constexpr bool T = decltype(tail)::value;
    const Vec<acc_t> tsum = rows_sum<K, T>(trows, i, m, count);
    store<T>(load<T>(gj + i, count) * load<T>(pj + i, count) - coef2 * load<T>(xj + i, count) * tsum, dj + i, count);
  });
}

// One pipelined pass over the channels: step c computes s_c^-beta and t_c = g_c a_c s_c^-beta / s_c
// into a ring of R rows, and emits da_j for j = c - lo, whose mirrored window [j - hi, j + lo] of t
// is then complete. That window and row j lie in [c - n + 1, c], so R = min(n, C) rows suffice.
template <typename scalar_t>
void backward_channels_first(const scalar_t* g, const scalar_t* x, scalar_t* dx, int64_t N, int64_t C, int64_t S,
                             int64_t size, double alpha, double beta, double k) {
  using acc_t = at::opmath_type<scalar_t>;
  const Window w(size, C);
  const acc_t coef = alpha / size, coef2 = 2.0 * alpha * beta / size;
  const PowMode mode = pow_mode(beta);
  const ScaleArgs<acc_t> args(k, alpha / size, beta);
  const Tiling tl = tiling(N, S);
  const int64_t R = std::min(size, C), L = tl.len;
  at::parallel_for(0, N * tl.tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scale_ring(R * L), t_ring(R * L), sum(L), inv_s(L);
    std::vector<const acc_t*> rows(R);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tl.tiles, s0 = (t % tl.tiles) * L, len = std::min(L, S - s0);
      const int64_t off = n * C * S + s0;
      const scalar_t *xb = x + off, *gb = g + off;
      scalar_t* db = dx + off;
      for (int64_t c = 0; c < C + w.lo; ++c) {
        if (c < C) {  // t_c enters the window sum of j = c - lo
          acc_t* sc = scale_ring.data() + (c % R) * L;
          acc_t* tc = t_ring.data() + (c % R) * L;
          const int64_t j0 = w.first(c), wrows = w.last(c) - j0 + 1;
          const scalar_t *xc = xb + c * S, *gc = gb + c * S;
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            with_rows(wrows, [&](auto K) {
              backward_scale_row<decltype(K)::value, acc_t>(xb + j0 * S, S, wrows, xc, gc, sc, tc, len, args);
            });
          } else {
            square_sum_rows<scalar_t, acc_t>(xb + j0 * S, S, wrows, len, sum.data());
            scale_from_sum<acc_t>(sum.data(), sc, inv_s.data(), len, k, coef, mode, beta);
            for (int64_t i = 0; i < len; ++i)
              tc[i] = static_cast<acc_t>(gc[i]) * static_cast<acc_t>(xc[i]) * sc[i] * inv_s[i];
          }
        }
        const int64_t j = c - w.lo;
        if (j < 0) continue;
        const int64_t m0 = std::max<int64_t>(j - w.hi, 0), m1 = std::min<int64_t>(j + w.lo, C - 1), m = m1 - m0 + 1;
        for (int64_t r = m0; r <= m1; ++r) rows[r - m0] = t_ring.data() + (r % R) * L;
        const acc_t* sj = scale_ring.data() + (j % R) * L;
        const scalar_t *xj = xb + j * S, *gj = gb + j * S;
        scalar_t* dj = db + j * S;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          with_rows(m, [&](auto K) {
            backward_grad_row<decltype(K)::value, acc_t>(rows.data(), m, sj, xj, gj, dj, len, Vec<acc_t>(coef2));
          });
        } else {
          sum_rows<acc_t>(rows.data(), m, len, sum.data());
          for (int64_t i = 0; i < len; ++i)
            dj[i] = static_cast<scalar_t>(static_cast<acc_t>(gj[i]) * sj[i] - coef2 * static_cast<acc_t>(xj[i]) * sum[i]);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Channels-last: x is (N, S, C) contiguous; each position's C channels are one contiguous row.

// out[c] = the sum of v[j] over j in [c - left, c - left + size - 1], clipped to [0, C), along one row:
// `size` shifted adds over a zero-padded copy, which vectorise (no serial dependency from channel to
// channel) and keep a NaN or Inf inside the windows that hold it.
template <typename acc_t>
inline void window_sum(const acc_t* __restrict v, acc_t* __restrict out, acc_t* __restrict pad, int64_t C,
                       int64_t left, int64_t size) {
  std::fill(pad, pad + left, acc_t(0));
  std::copy(v, v + C, pad + left);
  std::fill(pad + left + C, pad + C + size - 1, acc_t(0));
  // only the shifts d that bring some of the C values under some window (a window wider than 2C - 1
  // channels adds zeros elsewhere)
  const int64_t d0 = std::max<int64_t>(0, left - C + 1), d1 = std::min<int64_t>(size - 1, left + C - 1);
  std::copy(pad + d0, pad + d0 + C, out);
  for (int64_t d = d0 + 1; d <= d1; ++d)
    for (int64_t c = 0; c < C; ++c) out[c] += pad[c + d];
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
