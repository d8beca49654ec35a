// The fused heads and the block output (depth-to-space + box sum) on the CPU (convention in heads.h).
//
// Work is split into output rows. A worker keeps, per channel, the box-filtered rows of V it needs
// (R(m)[x] = V[m][x+1] + V[m][x+2], so x = R(y+1) + R(y+2) and each row of the tap groups is used once)
// and, for the heads, a ring of three activation rows t(y-1), t(y), t(y+1) with a zero column on each
// side. The heads read only that ring, which stays in L2 (C = 32, S = 256: 170 KiB with the box rows),
// instead of the full-resolution activation that a graph would write out and read back.
//
// Tap groups given as an UpsampleConv are computed a row at a time (GroupRows): row g of the groups of
// one row parity needs input rows g-1 and g only, kept zero-padded per worker. The AVX2 version computes
// 2 output channels x 16 pixels per step, pixels along the vector; the odd-column group's two taps,
// w0 * in[k-1] + w2 * in[k], are accumulated as U[k] = w0 * in[k-1] and T[k] = w2 * in[k-1] and added as
// U[k] + T[k+1] afterwards, so every accumulator takes one multiply-add per input channel (no chain of
// two dependent ones) and each step loads one input vector per 16 pixels' half.
//
// Each row kernel has an AVX2+FMA version (the heads: 16 pixels x 6 outputs per step in 12 registers,
// pixels along the vector, weights broadcast) and a portable one (plain loops), picked at run time. Both
// round the box sum and the activation identically; the heads' sums (fused multiply-adds or not) and
// tanh differ by float rounding only.
#include <cmath>
#include <cstring>
#include <utility>
#include <variant>
#include <vector>

#include "../cpu_features.h"
#include "../parallel.h"
#include "heads.h"

namespace pybilayer {
namespace {

constexpr int64_t kMinPixelsPerThread = 8 * 1024;  // ~0.25 ms of work at C = 32, against ~10 us per thread
constexpr int64_t kBlock = 16;                     // pixels per vector step of the heads
constexpr int kTanhChannels = 5;                   // delta_uv and lf; the mask stays logits

#ifdef PYBILAYER_X86_AVX2

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

#ifdef PYBILAYER_X86_AVX2
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

struct GroupsShape {
  int64_t batch, channels, low_size;
};

GroupsShape shape_of(const TapGroups& groups) {
  if (const Phases* p = std::get_if<Phases>(&groups)) return {p->batch, p->channels, p->low_size};
  const UpsampleConv& c = std::get<UpsampleConv>(groups);
  return {c.batch, c.channels, c.low_size};
}

// An UpsampleConv's weights in the order the AVX2 group rows read them: per kernel row ky, output channel
// pair and input channel, {w[ky][1], w[ky][0], w[ky][2]} of the pair's first channel, then of its second
// (zeros for the missing second channel of an odd C). Built once per call, shared by the workers.
std::vector<float> pack_upsample_weights(const UpsampleConv& conv) {
  const int64_t C = conv.channels, Cin = conv.in_channels, pairs = (C + 1) / 2;
  std::vector<float> packed(3 * pairs * Cin * 6, 0.f);
  for (int64_t ky = 0; ky < 3; ++ky)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t ci = 0; ci < Cin; ++ci) {
        const float* w = conv.weight + ((c * Cin + ci) * 3 + ky) * 3;
        float* out = packed.data() + ((ky * pairs + c / 2) * Cin + ci) * 6 + (c % 2) * 3;
        out[0] = w[1], out[1] = w[0], out[2] = w[2];
      }
  return packed;
}

// One kernel row's contribution to a row of tap groups: input row (zero-padded, channel 0; channel ci at
// + ci * stride) and its weights (kernel row ky of `pack_upsample_weights`, or of conv.weight).
struct GroupTap {
  const float* row;
  int64_t ky;
};

#ifdef PYBILAYER_X86_AVX2
// One weight times one or two vectors of input columns (a, b), into their accumulators.
template <int NV>
PYBILAYER_AVX2 inline void accumulate_columns_avx2(float weight, __m256 a, __m256 b, __m256& into_a, __m256& into_b) {
  const __m256 x = _mm256_set1_ps(weight);
  into_a = _mm256_fmadd_ps(a, x, into_a);
  if (NV == 2) into_b = _mm256_fmadd_ps(b, x, into_b);
}

// Columns [k, k + 8 NV), NV = 1 or 2, of the group rows of output channels c0 = 2 * pair and c0 + 1:
// even-column group E, and U, T of the odd-column group (file comment). `init` (or null): E's starting
// values, channel c0's row (c0 + 1 at + init_stride). Padded index k holds input column k - 1. Named
// accumulators, not arrays: GCC kept arrays of them in memory, storing all twelve in every step.
template <int NV>
PYBILAYER_AVX2 inline void group_columns_avx2(const GroupTap* taps, int ntaps, const float* packed, int64_t pairs,
                                              int64_t pair, int64_t cin, int64_t stride, int64_t k,
                                              const float* init, int64_t init_stride, float* e0, float* u0,
                                              float* t0, float* e1, float* u1, float* t1) {
  static_assert(NV == 1 || NV == 2, "one or two vectors of pixels");
  const __m256 zero = _mm256_setzero_ps();
  __m256 e0a = init ? _mm256_loadu_ps(init + k) : zero, e1a = init ? _mm256_loadu_ps(init + init_stride + k) : zero;
  __m256 e0b = zero, e1b = zero;
  if (NV == 2 && init) e0b = _mm256_loadu_ps(init + k + 8), e1b = _mm256_loadu_ps(init + init_stride + k + 8);
  __m256 u0a = zero, u0b = zero, t0a = zero, t0b = zero, u1a = zero, u1b = zero, t1a = zero, t1b = zero;
  for (int t = 0; t < ntaps; ++t) {
    const float* in = taps[t].row + k;
    const float* w = packed + (taps[t].ky * pairs + pair) * cin * 6;
    for (int64_t ci = 0; ci < cin; ++ci, in += stride, w += 6) {
      const __m256 a = _mm256_loadu_ps(in), b = NV == 2 ? _mm256_loadu_ps(in + 8) : zero;
      accumulate_columns_avx2<NV>(w[0], a, b, e0a, e0b);
      accumulate_columns_avx2<NV>(w[1], a, b, u0a, u0b);
      accumulate_columns_avx2<NV>(w[2], a, b, t0a, t0b);
      accumulate_columns_avx2<NV>(w[3], a, b, e1a, e1b);
      accumulate_columns_avx2<NV>(w[4], a, b, u1a, u1b);
      accumulate_columns_avx2<NV>(w[5], a, b, t1a, t1b);
    }
  }
  _mm256_storeu_ps(e0 + k, e0a), _mm256_storeu_ps(u0 + k, u0a), _mm256_storeu_ps(t0 + k, t0a);
  _mm256_storeu_ps(e1 + k, e1a), _mm256_storeu_ps(u1 + k, u1a), _mm256_storeu_ps(t1 + k, t1a);
  if (NV == 2) {
    _mm256_storeu_ps(e0 + k + 8, e0b), _mm256_storeu_ps(u0 + k + 8, u0b), _mm256_storeu_ps(t0 + k + 8, t0b);
    _mm256_storeu_ps(e1 + k + 8, e1b), _mm256_storeu_ps(u1 + k + 8, u1b), _mm256_storeu_ps(t1 + k + 8, t1b);
  }
}
#endif

// A worker's rows of the four tap groups: views into `phases`, or computed from an UpsampleConv.
class GroupRows {
 public:
  GroupRows(const TapGroups& groups, const float* packed)
      : groups_(groups), packed_(packed), shape_(shape_of(groups)), P_(shape_.low_size + 1) {
    if (const UpsampleConv* conv = std::get_if<UpsampleConv>(&groups_)) {
      conv_ = conv;
      const int64_t padded_channels = 2 * ((conv->channels + 1) / 2);
      // Group columns 0 .. s, rounded up to whole vectors: the last vector's extra columns cost less than
      // finishing one at a time. Input columns -1 .. s and beyond, zero outside 0 .. s-1.
      width_ = (P_ + 7) / 8 * 8;
      input_.assign(2 * conv->in_channels * width_, 0.f);
      init_.assign(padded_channels * width_, 0.f);
      even_.assign(padded_channels * width_, 0.f);
      odd_.assign(padded_channels * width_, 0.f);
      odd_shift_.assign(padded_channels * width_, 0.f);
    }
  }

  // Row g of the even- and odd-column groups of row parity `parity` for item b, channel 0; channel c's rows
  // at + c * stride(). Rows computed for an UpsampleConv stay valid until the next call.
  std::pair<const float*, const float*> get(int64_t b, int64_t parity, int64_t g, bool avx2) {
    if (conv_ == nullptr) {
      const Phases& p = std::get<Phases>(groups_);
      const int64_t plane = P_ * P_, group = shape_.channels * plane;
      const float* base = p.data + (b * 4 + parity * 2) * group + g * P_;
      return {base, base + group};
    }
    compute(b, parity, g, avx2);
    return {even_.data(), odd_.data()};
  }
  int64_t stride() const { return conv_ == nullptr ? P_ * P_ : width_; }

 private:
  // Input row r of item b, zero-padded (nullptr outside the image): slot r % 2, loaded once.
  const float* input_row(int64_t b, int64_t r) {
    const int64_t s = shape_.low_size, cin = conv_->in_channels;
    if (r < 0 || r >= s) return nullptr;
    float* row = input_.data() + (r % 2) * cin * width_;
    if (loaded_[r % 2] != b * s + r) {
      const float* src = conv_->input + (b * cin * s + r) * s;
      for (int64_t ci = 0; ci < cin; ++ci) std::memcpy(row + ci * width_ + 1, src + ci * s * s, sizeof(float) * s);
      loaded_[r % 2] = b * s + r;
    }
    return row;
  }

  void compute(int64_t b, int64_t parity, int64_t g, bool avx2) {
    const UpsampleConv& conv = *conv_;
    const int64_t C = conv.channels, s = shape_.low_size;
    // Kernel rows: the even parity reads input row g-1 with w[1]; the odd one g-1 with w[0], g with w[2].
    GroupTap taps[2];
    int ntaps = 0;
    if (parity == 0) {
      if (const float* row = input_row(b, g - 1)) taps[ntaps++] = {row, 1};
    } else {
      if (const float* row = input_row(b, g - 1)) taps[ntaps++] = {row, 0};
      if (const float* row = input_row(b, g)) taps[ntaps++] = {row, 2};
    }
    // The even-parity, even-column group (ee) starts from the bias and the skip (row g-1, column k-1).
    const bool with_init = parity == 0;
    const bool has_skip = conv.skip != nullptr && g >= 1;
    if (with_init)
      for (int64_t c = 0; c < C; ++c) {
        float* init = init_.data() + c * width_;
        init[0] = conv.bias[c];
        for (int64_t x = 0; x < s; ++x)
          init[x + 1] = conv.bias[c] + (has_skip ? conv.skip[((b * C + c) * s + g - 1) * s + x] : 0.f);
      }
#ifdef PYBILAYER_X86_AVX2
    if (avx2) return compute_avx2(taps, ntaps, with_init);
#endif
    compute_portable(taps, ntaps, with_init);
  }

#ifdef PYBILAYER_X86_AVX2
  PYBILAYER_AVX2 void compute_avx2(const GroupTap* taps, int ntaps, bool with_init) {
    const int64_t C = conv_->channels, cin = conv_->in_channels, pairs = (C + 1) / 2, W = width_;
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const int64_t c0 = 2 * pair;
      float *e0 = even_.data() + c0 * W, *u0 = odd_.data() + c0 * W, *t0 = odd_shift_.data() + c0 * W;
      const float* init = with_init ? init_.data() + c0 * W : nullptr;
      int64_t k = 0;
      for (; k + 16 <= W; k += 16)
        group_columns_avx2<2>(taps, ntaps, packed_, pairs, pair, cin, W, k, init, W, e0, u0, t0, e0 + W, u0 + W, t0 + W);
      if (k < W)
        group_columns_avx2<1>(taps, ntaps, packed_, pairs, pair, cin, W, k, init, W, e0, u0, t0, e0 + W, u0 + W, t0 + W);
    }
    finish_odd();
  }
#endif

  void compute_portable(const GroupTap* taps, int ntaps, bool with_init) {
    const UpsampleConv& conv = *conv_;
    const int64_t C = conv.channels, cin = conv.in_channels, W = width_;
    for (int64_t c = 0; c < C; ++c) {
      float *e = even_.data() + c * W, *u = odd_.data() + c * W, *t_row = odd_shift_.data() + c * W;
      for (int64_t k = 0; k < P_; ++k) e[k] = with_init ? init_[c * W + k] : 0.f, u[k] = t_row[k] = 0.f;
      for (int t = 0; t < ntaps; ++t)
        for (int64_t ci = 0; ci < cin; ++ci) {
          const float* w = conv.weight + ((c * cin + ci) * 3 + taps[t].ky) * 3;
          const float* in = taps[t].row + ci * W;
          for (int64_t k = 0; k < P_; ++k) {
            e[k] += w[1] * in[k];
            u[k] += w[0] * in[k];
            t_row[k] += w[2] * in[k];
          }
        }
    }
    finish_odd();
  }

  // odd[k] = U[k] + T[k + 1] for k < s; T[s + 1] (input column s) is zero.
  void finish_odd() {
    for (int64_t c = 0; c < conv_->channels; ++c) {
      float* u = odd_.data() + c * width_;
      const float* t = odd_shift_.data() + c * width_ + 1;
      for (int64_t k = 0; k + 1 < P_; ++k) u[k] += t[k];
    }
  }

  const TapGroups& groups_;
  const float* packed_;
  const GroupsShape shape_;
  const int64_t P_;
  const UpsampleConv* conv_ = nullptr;
  int64_t width_ = 0;  // columns of every row buffer below
  std::vector<float> input_, init_, even_, odd_, odd_shift_;
  int64_t loaded_[2] = {-1, -1};
};

// A worker's box rows: R(y+1) and R(y+2) of every channel, the two that output row y reads, made from the
// group rows of their parity as the worker's rows advance (each row of the groups is then used once).
class BoxRows {
 public:
  BoxRows(const TapGroups& groups, const float* packed_conv, bool avx2)
      : groups_(groups, packed_conv), avx2_(avx2), C_(shape_of(groups).channels), s_(shape_of(groups).low_size),
        box_(2 * C_ * 2 * s_) {}

  // Makes R(y+1) and R(y+2) of item b available: only R(y+2) is new when row y-1 of b came last.
  void advance(int64_t b, int64_t y) {
    for (int64_t m = (b == item_ && last_ == y + 1) ? y + 2 : y + 1; m <= y + 2; ++m) {
      const auto [even, odd] = groups_.get(b, m % 2, m / 2, avx2_);
      const int64_t stride = groups_.stride();
      for (int64_t c = 0; c < C_; ++c) {
        float* out = box_.data() + (c * 2 + m % 2) * 2 * s_;
#ifdef PYBILAYER_X86_AVX2
        if (avx2_) {
          box_row_avx2(even + c * stride, odd + c * stride, out, s_);
          continue;
        }
#endif
        box_row_portable(even + c * stride, odd + c * stride, out, 0, s_);
      }
    }
    item_ = b, last_ = y + 2;
  }

  // Box row R(m) of channel c, for m = y+1 or y+2 of the last advance(b, y).
  const float* row(int64_t c, int64_t m) const { return box_.data() + (c * 2 + m % 2) * 2 * s_; }

 private:
  GroupRows groups_;
  const bool avx2_;
  const int64_t C_, s_;
  std::vector<float> box_;          // R(m) of channel c at (c * 2 + m % 2) * 2s
  int64_t item_ = -1, last_ = -1;  // the rows hold R(last_ - 1) and R(last_) of item_
};

// A worker's rows; see the file comment.
class Rows {
 public:
  Rows(const HeadsParams& p, bool avx2, const float* packed_conv)
      : p_(p), avx2_(avx2), box_rows_(p.groups, packed_conv, avx2), C_(shape_of(p.groups).channels),
        S_(2 * shape_of(p.groups).low_size), stride_(S_ + 2 + kBlock), act_(3 * C_ * stride_, 0.f) {}

  // Activation row t(y) of channel c, with t(y)[-1] and t(y)[S] zero; valid after fill(b, y). Channel c's
  // row is channel 0's plus c * channel_stride().
  const float* act(int64_t c, int64_t y) const { return act_.data() + (c * 3 + slot(y)) * stride_ + 1; }
  int64_t channel_stride() const { return 3 * stride_; }

  // Makes t(y) of item b available: from the box rows R(y+1) and R(y+2), zeros outside the frame.
  void fill(int64_t b, int64_t y) {
    if (y < 0 || y >= S_) {
      for (int64_t c = 0; c < C_; ++c)
        std::memset(act_.data() + (c * 3 + slot(y)) * stride_, 0, sizeof(float) * stride_);
      return;
    }
    box_rows_.advance(b, y);
    for (int64_t c = 0; c < C_; ++c) {
      float* t = act_.data() + (c * 3 + slot(y)) * stride_ + 1;
      const float *r0 = box_rows_.row(c, y + 1), *r1 = box_rows_.row(c, y + 2);
#ifdef PYBILAYER_X86_AVX2
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

  const HeadsParams& p_;
  const bool avx2_;
  BoxRows box_rows_;
  const int64_t C_, S_, stride_;
  std::vector<float> act_;
};

// Output row y of item b: channel o's row pointer.
struct OutputRows {
  float* row[kHeadChannels];
  OutputRows(const HeadsParams& p, int64_t b, int64_t y) {
    const int64_t S = 2 * shape_of(p.groups).low_size, plane = S * S;
    for (int o = 0; o < 2; ++o) row[o] = p.delta_uv + (b * 2 + o) * plane + y * S;
    for (int o = 0; o < 3; ++o) row[2 + o] = p.lf + (b * 3 + o) * plane + y * S;
    row[5] = p.mask_logits + b * plane + y * S;
  }
};

// The heads of pixels [x_begin, S) of row y, one output channel at a time.
void heads_row_portable(const HeadsParams& p, const Rows& rows, int64_t y, int64_t x_begin, const OutputRows& out) {
  const GroupsShape shape = shape_of(p.groups);
  const int64_t C = shape.channels, S = 2 * shape.low_size;
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

#ifdef PYBILAYER_X86_AVX2
// `packed`: the weights as (C, 3, 3, 6), so one step's six weights are adjacent.
PYBILAYER_AVX2 void heads_row_avx2(const HeadsParams& p, const Rows& rows, int64_t y, const float* packed,
                                   const OutputRows& out) {
  const GroupsShape shape = shape_of(p.groups);
  const int64_t C = shape.channels, S = 2 * shape.low_size, vector_end = S - S % kBlock;
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

// Output rows [row_begin, row_end) of B x S of every channel: x(y) = R(y+1) + R(y+2).
void block_output_rows(const BlockOutputParams& p, int64_t row_begin, int64_t row_end, bool avx2,
                       const float* packed_conv) {
  const GroupsShape shape = shape_of(p.groups);
  const int64_t C = shape.channels, S = 2 * shape.low_size;
  BoxRows box_rows(p.groups, packed_conv, avx2);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t b = r / S, y = r % S;
    box_rows.advance(b, y);
    for (int64_t c = 0; c < C; ++c) {
      const float *upper = box_rows.row(c, y + 1), *lower = box_rows.row(c, y + 2);
      float* __restrict__ x = p.out + ((b * C + c) * S + y) * S;
      for (int64_t i = 0; i < S; ++i) x[i] = upper[i] + lower[i];
    }
  }
}

void heads_rows(const HeadsParams& p, int64_t row_begin, int64_t row_end, const float* packed,
                const float* packed_conv) {
  const int64_t S = 2 * shape_of(p.groups).low_size;
  Rows rows(p, packed != nullptr, packed_conv);
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
#ifdef PYBILAYER_X86_AVX2
    if (packed != nullptr) {
      heads_row_avx2(p, rows, y, packed, out);
      continue;
    }
#endif
    heads_row_portable(p, rows, y, 0, out);
  }
}

// The AVX2 group rows' weights for an UpsampleConv (else empty).
std::vector<float> packed_conv_weights(const TapGroups& groups, bool avx2) {
  const UpsampleConv* conv = std::get_if<UpsampleConv>(&groups);
  return conv != nullptr && avx2 ? pack_upsample_weights(*conv) : std::vector<float>();
}

// Multiply-adds per output row spent on the tap groups (0 for given ones).
int64_t group_work_per_row(const TapGroups& groups) {
  const UpsampleConv* conv = std::get_if<UpsampleConv>(&groups);
  return conv == nullptr ? 0 : conv->in_channels * conv->channels * (conv->low_size + 1) * 9 / 2;
}

}  // namespace

void heads_cpu(const HeadsParams& p, int num_threads, bool vectorized) {
  const GroupsShape shape = shape_of(p.groups);
  const int64_t S = 2 * shape.low_size, rows = shape.batch * S, C = shape.channels;
  if (rows == 0 || C == 0) return;
  const bool avx2 = vectorized && has_avx2_fma();
  std::vector<float> packed;
  if (avx2) {
    packed.resize(C * 9 * kHeadChannels);
    for (int o = 0; o < kHeadChannels; ++o)
      for (int64_t k = 0; k < C * 9; ++k) packed[k * kHeadChannels + o] = p.weight[o * C * 9 + k];
  }
  const std::vector<float> packed_conv = packed_conv_weights(p.groups, avx2);
  // A null `packed` selects the portable path.
  const int64_t row_work = S + group_work_per_row(p.groups) / (C * 9 * kHeadChannels);  // in pixels of the heads
  parallel_rows(rows, worker_count(rows, row_work, kMinPixelsPerThread, num_threads), [&](int64_t begin, int64_t end) {
    heads_rows(p, begin, end, avx2 ? packed.data() : nullptr, packed_conv.data());
  });
}

void block_output_cpu(const BlockOutputParams& p, int num_threads, bool vectorized) {
  const GroupsShape shape = shape_of(p.groups);
  const int64_t S = 2 * shape.low_size, rows = shape.batch * S, C = shape.channels;
  if (rows == 0 || C == 0) return;
  const bool avx2 = vectorized && has_avx2_fma();
  const std::vector<float> packed_conv = packed_conv_weights(p.groups, avx2);
  // From given groups a memory-bound pass: a thread pays off from ~64K output values.
  const int64_t row_work = C * S + group_work_per_row(p.groups) / 8;
  parallel_rows(rows, worker_count(rows, row_work, 8 * kMinPixelsPerThread, num_threads),
                [&](int64_t begin, int64_t end) { block_output_rows(p, begin, end, avx2, packed_conv.data()); });
}

}  // namespace pybilayer
