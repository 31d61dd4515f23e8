// CPU BN-ReLU primitives over NCHW rows (the H*W values of one channel of one image; scale/shift are
// per-row scalars), vectorised with at::vec: both bn_relu_conv.cpp and dense.cpp use them.
// v = x * scale + shift with one rounding (fma) in every path, so that the backward's ReLU mask
// (v > 0) is bit-identical to the forward's, whichever path (vector or scalar tail) an element takes.
// Sums accumulate in double.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>

namespace lightcnn {
namespace bn_relu_rows {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline double hsum(const Vec<T>& v) {
  T tmp[Vec<T>::size()];
  v.store(tmp);
  double s = 0;
  for (int k = 0; k < Vec<T>::size(); ++k) s += tmp[k];
  return s;
}

template <typename T>
inline T relu_of(T v) {
  return v > T(0) ? v : (std::isnan(v) ? v : T(0));  // NaN propagates, as in F.relu
}

template <typename T>
inline void row_bn_relu(const T* x, T* y, int64_t n, T s, T b) {
  const Vec<T> vs(s), vb(b), zero(T(0));
  int64_t i = 0;
  for (; i + Vec<T>::size() <= n; i += Vec<T>::size())
    at::vec::maximum(at::vec::fmadd(Vec<T>::loadu(x + i), vs, vb), zero).store(y + i);
  for (; i < n; ++i) y[i] = relu_of(std::fma(x[i], s, b));
}

template <typename T>
inline void row_reduce(const T* g, const T* x, int64_t n, T s, T b, T m, double& sum_dz, double& sum_dzx) {
  const Vec<T> vs(s), vb(b), vm(m), zero(T(0));
  Vec<T> a1(T(0)), a2(T(0));
  int64_t i = 0;
  for (; i + Vec<T>::size() <= n; i += Vec<T>::size()) {
    const Vec<T> xv = Vec<T>::loadu(x + i);
    const Vec<T> dz = Vec<T>::blendv(zero, Vec<T>::loadu(g + i), at::vec::fmadd(xv, vs, vb) > zero);
    a1 += dz;
    a2 = at::vec::fmadd(dz, xv - vm, a2);
  }
  double s1 = hsum(a1), s2 = hsum(a2);
  for (; i < n; ++i) {
    const T dz = std::fma(x[i], s, b) > T(0) ? g[i] : T(0);
    s1 += dz;
    s2 += double(dz) * double(x[i] - m);
  }
  sum_dz += s1;
  sum_dzx += s2;
}

template <typename T>
inline void row_grad_input(const T* g, const T* x, T* gx, int64_t n, T s, T b, T alpha, T beta, T gamma) {
  const Vec<T> vs(s), vb(b), va(alpha), vbeta(beta), vg(gamma), zero(T(0));
  int64_t i = 0;
  for (; i + Vec<T>::size() <= n; i += Vec<T>::size()) {
    const Vec<T> xv = Vec<T>::loadu(x + i);
    const Vec<T> dz = Vec<T>::blendv(zero, Vec<T>::loadu(g + i), at::vec::fmadd(xv, vs, vb) > zero);
    at::vec::fmadd(dz, va, at::vec::fmadd(xv, vbeta, vg)).store(gx + i);
  }
  for (; i < n; ++i) {
    const T dz = std::fma(x[i], s, b) > T(0) ? g[i] : T(0);
    gx[i] = dz * alpha + (x[i] * beta + gamma);
  }
}

}  // namespace bn_relu_rows
}  // namespace lightcnn
