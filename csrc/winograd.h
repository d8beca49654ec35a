// Winograd's minimal filtering in one dimension (Lavin & Gray, "Fast Algorithms for Convolutional Neural
// Networks", 2016): kTile outputs of a 3-tap correlation from kWindow products, between a transform of the
// kWindow inputs (B^T) and one of the products (A^T), the taps transformed once (G, in float64).
//   F4x3: F(4, 3), interpolation points 0, +-1, +-2, infinity: 6 products per 4 outputs (12 direct).
//   F2x3: F(2, 3), points 0, +-1, infinity: 4 products per 2 outputs (6 direct); its transforms are exact
//         additions, and a 2-D tile has 16 points against F4x3's 36 (weights 2.25x smaller).
// The CPU kernels apply them along both axes (the low-resolution stage's conv1) or along rows (the heads).
// Additions and constant multiplications only: built with -ffp-contract=off, every lane type (a float, or
// a GCC vector of them) transforms to the same bits.
#pragma once

#if defined(__GNUC__)
#define PYBILAYER_INLINE inline __attribute__((always_inline))
#else
#define PYBILAYER_INLINE inline
#endif

namespace pybilayer {
namespace winograd {

struct F4x3 {
  static constexpr int kTile = 4, kWindow = 6;

  // r = B^T d. T: float, or a vector of them.
  template <typename T>
  static PYBILAYER_INLINE void input(const T d[kWindow], T r[kWindow]) {
    r[0] = (d[0] * 4.f - d[2] * 5.f) + d[4];
    r[1] = (d[3] + d[4]) - (d[1] + d[2]) * 4.f;
    r[2] = (d[4] - d[3]) + (d[1] - d[2]) * 4.f;
    r[3] = (d[4] - d[2]) + (d[3] - d[1]) * 2.f;
    r[4] = (d[4] - d[2]) - (d[3] - d[1]) * 2.f;
    r[5] = (d[1] * 4.f - d[3] * 5.f) + d[5];
  }

  // r = A^T m.
  template <typename T>
  static PYBILAYER_INLINE void output(const T m[kWindow], T r[kTile]) {
    const T even = m[1] + m[2], odd = m[1] - m[2], even_far = m[3] + m[4], odd_far = m[3] - m[4];
    r[0] = (m[0] + even) + even_far;
    r[1] = odd + odd_far * 2.f;
    r[2] = even + even_far * 4.f;
    r[3] = (odd + odd_far * 8.f) + m[5];
  }

  // u = G g.
  static void kernel(const double g[3], double u[kWindow]) {
    u[0] = g[0] / 4;
    u[1] = -(g[0] + g[1] + g[2]) / 6;
    u[2] = -(g[0] - g[1] + g[2]) / 6;
    u[3] = g[0] / 24 + g[1] / 12 + g[2] / 6;
    u[4] = g[0] / 24 - g[1] / 12 + g[2] / 6;
    u[5] = g[2];
  }
};

struct F2x3 {
  static constexpr int kTile = 2, kWindow = 4;

  template <typename T>
  static PYBILAYER_INLINE void input(const T d[kWindow], T r[kWindow]) {
    r[0] = d[0] - d[2];
    r[1] = d[1] + d[2];
    r[2] = d[2] - d[1];
    r[3] = d[1] - d[3];
  }

  template <typename T>
  static PYBILAYER_INLINE void output(const T m[kWindow], T r[kTile]) {
    r[0] = (m[0] + m[1]) + m[2];
    r[1] = (m[1] - m[2]) - m[3];
  }

  static void kernel(const double g[3], double u[kWindow]) {
    u[0] = g[0];
    u[1] = (g[0] + g[1] + g[2]) / 2;
    u[2] = (g[0] - g[1] + g[2]) / 2;
    u[3] = g[2];
  }
};

}  // namespace winograd
}  // namespace pybilayer
