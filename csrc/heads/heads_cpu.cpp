// The fused heads and the plain depth-to-space + box sum on the CPU (convention in heads.h).
//
// Work is split into output rows. A worker keeps, per channel, the box-filtered rows of V it needs
// (R(m)[x] = V[m][x+1] + V[m][x+2], so x = R(y+1) + R(y+2) and each row of `phases` is read once) and
// a ring of three activation rows t(y-1), t(y), t(y+1) with a zero column on each side. The heads read
// only that ring, which stays in L2 (C = 32, S = 256: 170 KiB with the box rows), instead of the
// full-resolution activation that a graph would write out and read back.
//
// Each row kernel has an AVX2+FMA version (the heads: 16 pixels x 6 outputs per step in 12 registers,
// pixels along the vector, weights broadcast) and a portable one (plain loops), picked at run time. Both
// round the box sum and the activation identically; the heads' sums (fused multiply-adds or not) and
// tanh differ by float rounding only.
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "../parallel.h"
#include "heads.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define PYBILAYER_HEADS_AVX2 1
#include <immintrin.h>
#endif

namespace pybilayer {
namespace {

constexpr int64_t kMinPixelsPerThread = 8 * 1024;  // ~0.25 ms of work at C = 32, against ~10 us per thread
constexpr int64_t kBlock = 16;                     // pixels per vector step of the heads
constexpr int kTanhChannels = 5;                   // delta_uv and lf; the mask stays logits

#ifdef PYBILAYER_HEADS_AVX2
#define PYBILAYER_AVX2 __attribute__((target("avx2,fma")))

// exp(x) for |x| <= 88.38: Cody-Waite reduction by ln 2 and a degree-6 polynomial (Cephes expf), ~1 ulp.
PYBILAYER_AVX2 inline __m256 exp_avx2(__m256 x) {
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
}

// tanh(x) = 1 - 2 / (exp(2x) + 1): absolute error ~1e-7. The clamp keeps exp finite and lets NaN through
// (min/max return their second operand when either is NaN).
PYBILAYER_AVX2 inline __m256 tanh_avx2(__m256 x) {
  const __m256 limit = _mm256_set1_ps(44.f);  // tanh(44) == 1 in float
  x = _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), limit), _mm256_min_ps(limit, x));
  const __m256 e = exp_avx2(_mm256_add_ps(x, x));
  return _mm256_sub_ps(_mm256_set1_ps(1.f), _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(e, _mm256_set1_ps(1.f))));
}
#endif

// Row kernels of the box sum and the activation (portable; AVX2 twins below). Column 2k of a box row
// sums V[m][2k+1] + V[m][2k+2], column 2k+1 sums V[m][2k+2] + V[m][2k+3], read from the two phase groups
// of row m's parity: V[m][2k] = even[k], V[m][2k+1] = odd[k].
void box_row_portable(const float* even, const float* odd, float* out, int64_t k_begin, int64_t s) {
  for (int64_t k = k_begin; k < s; ++k) {
    out[2 * k] = odd[k] + even[k + 1];
    out[2 * k + 1] = even[k + 1] + odd[k + 1];
  }
}

void activate_portable(const float* r0, const float* r1, float scale, float shift, float slope, float* t,
                       int64_t x_begin, int64_t S) {
  for (int64_t x = x_begin; x < S; ++x) {
    const float v = (r0[x] + r1[x]) * scale + shift;
    t[x] = v < 0.f ? v * slope : v;
  }
}

#ifdef PYBILAYER_HEADS_AVX2
PYBILAYER_AVX2 void box_row_avx2(const float* even, const float* odd, float* out, int64_t s) {
  int64_t k = 0;
  for (; k + 8 <= s; k += 8) {
    const __m256 next_even = _mm256_loadu_ps(even + k + 1);
    const __m256 left = _mm256_add_ps(_mm256_loadu_ps(odd + k), next_even);
    const __m256 right = _mm256_add_ps(next_even, _mm256_loadu_ps(odd + k + 1));
    const __m256 lo = _mm256_unpacklo_ps(left, right), hi = _mm256_unpackhi_ps(left, right);
    _mm256_storeu_ps(out + 2 * k, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(out + 2 * k + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
  box_row_portable(even, odd, out, k, s);
}

PYBILAYER_AVX2 void activate_avx2(const float* r0, const float* r1, float scale, float shift, float slope, float* t,
                                  int64_t S) {
  const __m256 vscale = _mm256_set1_ps(scale), vshift = _mm256_set1_ps(shift), vslope = _mm256_set1_ps(slope);
  int64_t x = 0;
  for (; x + 8 <= S; x += 8) {
    const __m256 sum = _mm256_add_ps(_mm256_loadu_ps(r0 + x), _mm256_loadu_ps(r1 + x));
    const __m256 v = _mm256_add_ps(_mm256_mul_ps(sum, vscale), vshift);  // not fused: as the portable path
    const __m256 negative = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ);
    _mm256_storeu_ps(t + x, _mm256_blendv_ps(v, _mm256_mul_ps(v, vslope), negative));
  }
  activate_portable(r0, r1, scale, shift, slope, t, x, S);
}
#endif

bool has_avx2_fma() {
#ifdef PYBILAYER_HEADS_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// A worker's rows; see the file comment.
class Rows {
 public:
  Rows(const HeadsParams& p, bool avx2)
      : p_(p), avx2_(avx2), C_(p.phases.channels), s_(p.phases.low_size), S_(2 * s_), stride_(S_ + 2 + kBlock),
        box_(2 * C_ * S_), act_(3 * C_ * stride_, 0.f) {}

  // Activation row t(y) of channel c, with t(y)[-1] and t(y)[S] zero; valid after fill(b, y). Channel c's
  // row is channel 0's plus c * channel_stride().
  const float* act(int64_t c, int64_t y) const { return act_.data() + (c * 3 + slot(y)) * stride_ + 1; }
  int64_t channel_stride() const { return 3 * stride_; }

  // Makes t(y) of item b available: from the box rows R(y+1) and R(y+2), zeros outside the frame.
  void fill(int64_t b, int64_t y) {
    if (b != item_) {
      item_ = b;
      last_box_row_ = -1;
    }
    if (y < 0 || y >= S_) {
      for (int64_t c = 0; c < C_; ++c)
        std::memset(act_.data() + (c * 3 + slot(y)) * stride_, 0, sizeof(float) * stride_);
      return;
    }
    if (last_box_row_ != y + 1) box_rows(y + 1);
    box_rows(y + 2);
    for (int64_t c = 0; c < C_; ++c) {
      float* t = act_.data() + (c * 3 + slot(y)) * stride_ + 1;
      const float *r0 = box(c, y + 1), *r1 = box(c, y + 2);
#ifdef PYBILAYER_HEADS_AVX2
      if (avx2_)
        activate_avx2(r0, r1, p_.scale[c], p_.shift[c], p_.slope[c], t, S_);
      else
#endif
        activate_portable(r0, r1, p_.scale[c], p_.shift[c], p_.slope[c], t, 0, S_);
      t[-1] = 0.f;
      t[S_] = 0.f;
    }
  }

 private:
  static int64_t slot(int64_t y) { return (y % 3 + 3) % 3; }
  float* box(int64_t c, int64_t m) { return box_.data() + (c * 2 + (m & 1)) * S_; }

  // Box row R(m) of every channel of the current item.
  void box_rows(int64_t m) {
    const int64_t P = s_ + 1, plane = P * P, group = C_ * plane, parity = m % 2;
    const float* base = p_.phases.data + item_ * 4 * group + (m / 2) * P;
    for (int64_t c = 0; c < C_; ++c) {
      const float* even = base + (parity * 2 + 0) * group + c * plane;
      const float* odd = base + (parity * 2 + 1) * group + c * plane;
#ifdef PYBILAYER_HEADS_AVX2
      if (avx2_) {
        box_row_avx2(even, odd, box(c, m), s_);
        continue;
      }
#endif
      box_row_portable(even, odd, box(c, m), 0, s_);
    }
    last_box_row_ = m;
  }

  const HeadsParams& p_;
  const bool avx2_;
  const int64_t C_, s_, S_, stride_;
  std::vector<float> box_, act_;
  int64_t item_ = -1, last_box_row_ = -1;
};

// Output row y of item b: channel o's row pointer.
struct OutputRows {
  float* row[kHeadChannels];
  OutputRows(const HeadsParams& p, int64_t b, int64_t y) {
    const int64_t S = 2 * p.phases.low_size, plane = S * S;
    for (int o = 0; o < 2; ++o) row[o] = p.delta_uv + (b * 2 + o) * plane + y * S;
    for (int o = 0; o < 3; ++o) row[2 + o] = p.lf + (b * 3 + o) * plane + y * S;
    row[5] = p.mask_logits + b * plane + y * S;
  }
};

// The heads of pixels [x_begin, S) of row y, one output channel at a time.
void heads_row_portable(const HeadsParams& p, const Rows& rows, int64_t y, int64_t x_begin, const OutputRows& out) {
  const int64_t C = p.phases.channels, S = 2 * p.phases.low_size;
  for (int o = 0; o < kHeadChannels; ++o) {
    float* __restrict__ h = out.row[o];
    for (int64_t x = x_begin; x < S; ++x) h[x] = p.bias[o];
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < 3; ++i) {
        const float* __restrict__ t = rows.act(c, y + i - 1);
        for (int j = 0; j < 3; ++j) {
          const float w = p.weight[((o * C + c) * 3 + i) * 3 + j];
          for (int64_t x = x_begin; x < S; ++x) h[x] += w * t[x + j - 1];
        }
      }
    if (o < kTanhChannels)
      for (int64_t x = x_begin; x < S; ++x) h[x] = std::tanh(h[x]);
  }
}

#ifdef PYBILAYER_HEADS_AVX2
// `packed`: the weights as (C, 3, 3, 6), so one step's six weights are adjacent.
PYBILAYER_AVX2 void heads_row_avx2(const HeadsParams& p, const Rows& rows, int64_t y, const float* packed,
                                   const OutputRows& out) {
  const int64_t C = p.phases.channels, S = 2 * p.phases.low_size, vector_end = S - S % kBlock;
  const int64_t cs = rows.channel_stride();
  const float* const above = rows.act(0, y - 1) - 1;
  const float* const here = rows.act(0, y) - 1;
  const float* const below = rows.act(0, y + 1) - 1;
  for (int64_t x = 0; x < vector_end; x += kBlock) {
    __m256 a0 = _mm256_set1_ps(p.bias[0]), b0 = a0, a1 = _mm256_set1_ps(p.bias[1]), b1 = a1;
    __m256 a2 = _mm256_set1_ps(p.bias[2]), b2 = a2, a3 = _mm256_set1_ps(p.bias[3]), b3 = a3;
    __m256 a4 = _mm256_set1_ps(p.bias[4]), b4 = a4, a5 = _mm256_set1_ps(p.bias[5]), b5 = a5;
    const float* w = packed;
    for (int64_t c = 0; c < C; ++c)
      for (const float* row : {above, here, below}) {
        const float* t = row + c * cs + x;
        // Not unrolled: unrolling let GCC hoist the next taps' loads and spill an accumulator to the stack,
        // which made the whole kernel ~1.4x slower (3.0 against 2.2 ms at 256 px, C = 32, 2 threads).
#pragma GCC unroll 1
        for (int j = 0; j < 3; ++j, w += kHeadChannels) {
          const __m256 lo = _mm256_loadu_ps(t + j), hi = _mm256_loadu_ps(t + j + 8);
          __m256 v = _mm256_broadcast_ss(w + 0);
          a0 = _mm256_fmadd_ps(lo, v, a0), b0 = _mm256_fmadd_ps(hi, v, b0);
          v = _mm256_broadcast_ss(w + 1);
          a1 = _mm256_fmadd_ps(lo, v, a1), b1 = _mm256_fmadd_ps(hi, v, b1);
          v = _mm256_broadcast_ss(w + 2);
          a2 = _mm256_fmadd_ps(lo, v, a2), b2 = _mm256_fmadd_ps(hi, v, b2);
          v = _mm256_broadcast_ss(w + 3);
          a3 = _mm256_fmadd_ps(lo, v, a3), b3 = _mm256_fmadd_ps(hi, v, b3);
          v = _mm256_broadcast_ss(w + 4);
          a4 = _mm256_fmadd_ps(lo, v, a4), b4 = _mm256_fmadd_ps(hi, v, b4);
          v = _mm256_broadcast_ss(w + 5);
          a5 = _mm256_fmadd_ps(lo, v, a5), b5 = _mm256_fmadd_ps(hi, v, b5);
        }
      }
    const __m256 sums[kHeadChannels][2] = {{a0, b0}, {a1, b1}, {a2, b2}, {a3, b3}, {a4, b4}, {a5, b5}};
    for (int o = 0; o < kHeadChannels; ++o) {
      const bool squash = o < kTanhChannels;
      _mm256_storeu_ps(out.row[o] + x, squash ? tanh_avx2(sums[o][0]) : sums[o][0]);
      _mm256_storeu_ps(out.row[o] + x + 8, squash ? tanh_avx2(sums[o][1]) : sums[o][1]);
    }
  }
  if (vector_end < S) heads_row_portable(p, rows, y, vector_end, out);
}
#endif

// Planes [begin, end) of B x C: box row R(m) of one plane into `out`.
void depth_to_space_box_planes(const DepthToSpaceBoxParams& p, int64_t begin, int64_t end, bool avx2) {
  const int64_t C = p.phases.channels, s = p.phases.low_size, S = 2 * s, P = s + 1, plane = P * P, group = C * plane;
  std::vector<float> rows(2 * S);
  for (int64_t bc = begin; bc < end; ++bc) {
    const float* base = p.phases.data + (bc / C) * 4 * group + (bc % C) * plane;
    const auto box_row = [&](int64_t m, float* out) {
      const float* even = base + ((m % 2) * 2 + 0) * group + (m / 2) * P;
      const float* odd = base + ((m % 2) * 2 + 1) * group + (m / 2) * P;
#ifdef PYBILAYER_HEADS_AVX2
      if (avx2) return box_row_avx2(even, odd, out, s);
#endif
      box_row_portable(even, odd, out, 0, s);
    };
    float* upper = rows.data();  // R(y+1)
    float* lower = upper + S;    // R(y+2)
    box_row(1, upper);
    float* __restrict__ x = p.out + bc * S * S;
    for (int64_t y = 0; y < S; ++y, x += S) {
      box_row(y + 2, lower);
      for (int64_t i = 0; i < S; ++i) x[i] = upper[i] + lower[i];
      std::swap(upper, lower);
    }
  }
}

void heads_rows(const HeadsParams& p, int64_t row_begin, int64_t row_end, const float* packed) {
  const int64_t S = 2 * p.phases.low_size;
  Rows rows(p, packed != nullptr);
  int64_t item = -1, next = 0;  // t rows of `item` are filled up to, not including, row `next`
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t b = r / S, y = r % S;
    if (b != item || next != y + 1) {  // a new item or the worker's first row: t(y-1) and t(y) first
      item = b;
      rows.fill(b, y - 1);
      rows.fill(b, y);
    }
    rows.fill(b, y + 1);
    next = y + 2;
    const OutputRows out(p, b, y);
#ifdef PYBILAYER_HEADS_AVX2
    if (packed != nullptr) {
      heads_row_avx2(p, rows, y, packed, out);
      continue;
    }
#endif
    heads_row_portable(p, rows, y, 0, out);
  }
}

}  // namespace

void heads_cpu(const HeadsParams& p, int num_threads, bool vectorized) {
  const int64_t S = 2 * p.phases.low_size, rows = p.phases.batch * S, C = p.phases.channels;
  if (rows == 0 || C == 0) return;
  const bool avx2 = vectorized && has_avx2_fma();
  std::vector<float> packed;
  if (avx2) {
    packed.resize(C * 9 * kHeadChannels);
    for (int o = 0; o < kHeadChannels; ++o)
      for (int64_t k = 0; k < C * 9; ++k) packed[k * kHeadChannels + o] = p.weight[o * C * 9 + k];
  }
  // A null `packed` selects the portable path.
  parallel_rows(rows, worker_count(rows, S, kMinPixelsPerThread, num_threads),
                [&](int64_t begin, int64_t end) { heads_rows(p, begin, end, avx2 ? packed.data() : nullptr); });
}

void depth_to_space_box_cpu(const DepthToSpaceBoxParams& p, int num_threads, bool vectorized) {
  const int64_t planes = p.phases.batch * p.phases.channels, S = 2 * p.phases.low_size;
  if (planes == 0 || S == 0) return;
  const bool avx2 = vectorized && has_avx2_fma();
  // A memory-bound pass: a thread pays off from ~64K output pixels.
  parallel_rows(planes, worker_count(planes, S * S, 8 * kMinPixelsPerThread, num_threads),
                [&](int64_t begin, int64_t end) { depth_to_space_box_planes(p, begin, end, avx2); });
}

}  // namespace pybilayer
