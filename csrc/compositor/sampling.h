// The one bilinear sampling routine, shared by the CPU twin and the CUDA twin (see compositor.h for
// the convention). Everything here is __host__ __device__ and works on raw pointers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "compositor.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define PYBILAYER_HD __host__ __device__ __forceinline__
#else
#define PYBILAYER_HD inline
#endif

namespace pybilayer {

// fp16 travels as its raw bits so that host code needs no half type.
struct Half {
  uint16_t bits;
};

PYBILAYER_HD float to_float(float v) { return v; }

PYBILAYER_HD float to_float(Half h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h.bits));
#else
  // Exact widening: shift exponent and mantissa into place, then rescale by 2^112 (the exponent bias
  // difference), which also turns fp16 subnormals into fp32 normals exactly; Inf/NaN land at >= 2^16.
  uint32_t magnitude = static_cast<uint32_t>(h.bits & 0x7fffu) << 13;
  float f;
  std::memcpy(&f, &magnitude, sizeof f);
  f *= 5.192296858534828e33f;  // 2^112
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if (f >= 65536.0f) bits |= 0x7f800000u;
  bits |= static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// Element i of an fp32 or fp16 array whose type is only known at run time.
PYBILAYER_HD float load_float(const void* data, ScalarType type, int64_t i) {
  return type == ScalarType::kFloat16 ? to_float(static_cast<const Half*>(data)[i])
                                      : static_cast<const float*>(data)[i];
}

// min(max(v, lo), hi) with NaN mapped to lo; plain compares, which compilers inline (fminf/fmaxf
// stay library calls on x86 unless NaN semantics are relaxed).
PYBILAYER_HD float clamp(float v, float lo, float hi) {
  v = v > lo ? v : lo;
  return v < hi ? v : hi;
}

// Identity grid at pixel centres, in [-1, 1]: (i + 0.5) / size * 2 - 1, as the correctly rounded fp32
// quotient (2i + 1 - size) / size (exact integers for size < 2^24; no fp64, which consumer GPUs run
// slowly). The reference builds its grid in fp64 and rounds once, which gives the same bits.
PYBILAYER_HD float identity_coordinate(int64_t i, int64_t size) {
  return static_cast<float>(2 * i + 1 - size) / static_cast<float>(size);
}

// The four taps of one bilinear sample, in the order nw, ne, sw, se. Taps outside the texture get
// weight 0 and offset 0, so reads stay in bounds and zeros padding costs no branch per channel.
struct BilinearTaps {
  int32_t offset[4];
  float weight[4];
};

// (gx, gy): normalised coordinates in [-1, 1] (any value is allowed), align_corners=False.
// The multiply-adds are explicitly fused (fmaf) where ATen's AVX2 grid sampler fuses them, so both twins
// reproduce the reference's rounding instead of depending on the compiler's contraction choices.
PYBILAYER_HD BilinearTaps bilinear_taps(float gx, float gy, int32_t width, int32_t height) {
  // Unnormalise, (g + 1) * (size / 2) - 0.5, then clamp far-away coordinates to just outside the
  // texture (all taps stay out of bounds, and the int cast is safe).
  float ix = fmaf(gx + 1.f, 0.5f * static_cast<float>(width), -0.5f);
  float iy = fmaf(gy + 1.f, 0.5f * static_cast<float>(height), -0.5f);
  ix = clamp(ix, -2.f, static_cast<float>(width) + 1.f);
  iy = clamp(iy, -2.f, static_cast<float>(height) + 1.f);
  const float fx = floorf(ix), fy = floorf(iy);
  const int32_t x0 = static_cast<int32_t>(fx), y0 = static_cast<int32_t>(fy);
  const float east = ix - fx, south = iy - fy;  // distances from the west column and north row
  const float west = 1.f - east, north = 1.f - south;

  // Bitwise & rather than &&: no control flow, so loops over pixels stay vectorisable.
  const bool x0_in = (x0 >= 0) & (x0 < width), x1_in = (x0 + 1 >= 0) & (x0 + 1 < width);
  const bool y0_in = (y0 >= 0) & (y0 < height), y1_in = (y0 + 1 >= 0) & (y0 + 1 < height);
  const bool nw_in = x0_in & y0_in, ne_in = x1_in & y0_in, sw_in = x0_in & y1_in, se_in = x1_in & y1_in;
  const int32_t row0 = y0 * width, row1 = row0 + width;
  BilinearTaps t;
  t.weight[0] = nw_in ? west * north : 0.f;
  t.weight[1] = ne_in ? east * north : 0.f;
  t.weight[2] = sw_in ? west * south : 0.f;
  t.weight[3] = se_in ? east * south : 0.f;
  t.offset[0] = nw_in ? row0 + x0 : 0;
  t.offset[1] = ne_in ? row0 + x0 + 1 : 0;
  t.offset[2] = sw_in ? row1 + x0 : 0;
  t.offset[3] = se_in ? row1 + x0 + 1 : 0;
  return t;
}

// One channel plane sampled at the taps, summed in ATen's order: ((nw + ne) + sw) + se, fused.
template <typename T>
PYBILAYER_HD float sample_plane(const T* __restrict__ plane, const BilinearTaps& t) {
  float sum = to_float(plane[t.offset[0]]) * t.weight[0];
  sum = fmaf(to_float(plane[t.offset[1]]), t.weight[1], sum);
  sum = fmaf(to_float(plane[t.offset[2]]), t.weight[2], sum);
  return fmaf(to_float(plane[t.offset[3]]), t.weight[3], sum);
}

// e^x within about 1 ulp, in plain arithmetic so that a loop of it vectorises and both twins round alike:
// x = k ln2 + r with |r| <= ln2/2 (ln2 split in two for exactness), e^r by Cephes' expf polynomial,
// 2^k through the exponent bits. Inputs are clamped to [-87, 88], where e^x is a normal float.
PYBILAYER_HD float exp_poly(float x) {
  x = clamp(x, -87.f, 88.f);
  const float k = floorf(fmaf(x, 1.44269504088896341f, 0.5f));
  float r = fmaf(k, -0.693359375f, x);
  r = fmaf(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  const float e_r = fmaf(p, r * r, r) + 1.f;
  const int32_t exponent_bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_to_k;
  std::memcpy(&two_to_k, &exponent_bits, sizeof two_to_k);
  return e_r * two_to_k;
}

PYBILAYER_HD float sigmoid(float x) { return 1.f / (1.f + exp_poly(-x)); }

// The displayable value: round(clamp((v + 1) * 127.5, 0, 255)), ties to even like torch.round.
// Adding and subtracting 2^23 rounds a value in [0, 255] to the nearest integer, ties to even, in the
// default rounding mode, without a library call.
PYBILAYER_HD uint8_t to_uint8(float v) {
  const float scaled = clamp((v + 1.f) * 127.5f, 0.f, 255.f);
  return static_cast<uint8_t>((scaled + 8388608.f) - 8388608.f);
}

}  // namespace pybilayer
