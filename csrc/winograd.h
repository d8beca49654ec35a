// Winograd F(4, 3) in one dimension (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
// 2016; interpolation points 0, +-1, +-2, infinity): 4 outputs of a 3-tap correlation from 6 products,
// between a transform of the 6 inputs (B^T) and one of the 6 products (A^T), the taps transformed once (G).
// The CPU kernels apply it along both axes (the low-resolution stage's conv1, 4x4 tiles) or along rows (the
// heads). Additions and constant multiplications only: built with -ffp-contract=off, every lane type (a
// float, or a GCC vector of them) transforms to the same bits.
#pragma once

#if defined(__GNUC__)
#define PYBILAYER_INLINE inline __attribute__((always_inline))
#else
#define PYBILAYER_INLINE inline
#endif

namespace pybilayer {
namespace winograd {

constexpr int kTile = 4, kWindow = 6;  // outputs, and inputs (= products) per transform

// r = B^T d: the 6 points of 6 consecutive inputs. T: float, or a vector of them.
template <typename T>
PYBILAYER_INLINE void input_1d(const T d[kWindow], T r[kWindow]) {
  r[0] = (d[0] * 4.f - d[2] * 5.f) + d[4];
  r[1] = (d[3] + d[4]) - (d[1] + d[2]) * 4.f;
  r[2] = (d[4] - d[3]) + (d[1] - d[2]) * 4.f;
  r[3] = (d[4] - d[2]) + (d[3] - d[1]) * 2.f;
  r[4] = (d[4] - d[2]) - (d[3] - d[1]) * 2.f;
  r[5] = (d[1] * 4.f - d[3] * 5.f) + d[5];
}

// r = A^T m: 4 outputs from 6 products.
template <typename T>
PYBILAYER_INLINE void output_1d(const T m[kWindow], T r[kTile]) {
  const T even = m[1] + m[2], odd = m[1] - m[2], even_far = m[3] + m[4], odd_far = m[3] - m[4];
  r[0] = (m[0] + even) + even_far;
  r[1] = odd + odd_far * 2.f;
  r[2] = even + even_far * 4.f;
  r[3] = (odd + odd_far * 8.f) + m[5];
}

// u = G g, in float64: the 6 interpolated values of 3 taps.
inline void kernel_1d(const double g[3], double u[kWindow]) {
  u[0] = g[0] / 4;
  u[1] = -(g[0] + g[1] + g[2]) / 6;
  u[2] = -(g[0] - g[1] + g[2]) / 6;
  u[3] = g[0] / 24 + g[1] / 12 + g[2] / 6;
  u[4] = g[0] / 24 - g[1] / 12 + g[2] / 6;
  u[5] = g[2];
}

}  // namespace winograd
}  // namespace pybilayer
