// The fused heads and the block output (depth-to-space + box sum) on the CPU (convention in heads.h).
//
// Work is split into bands of 4 output rows, which the workers take from StealingRanges (parallel.h): against
// fixed halves, the heads alone in turns 0.07-0.34 ms faster at p10 and 0.1-0.4 ms at p50 (3 runs, a busy
// host), where one worker used to wait for the other 0.27 ms a call at the median. A worker keeps, per
// channel, the box-filtered rows of V it needs (R(m)[x] = V[m][x+1] + V[m][x+2], so x = R(y+1) + R(y+2) and
// each row of the tap groups is used once) and, for the heads, a ring of the six activation rows t(y0-1) ..
// t(y0+4) that band y0 reads, with a zero column on each side. The heads read only that ring (C = 32, S =
// 256: 210 KiB), instead of the full-resolution activation that a graph would write out and read back.
//
// Tap groups given as an UpsampleConv are computed a row at a time (GroupRows): row g of the groups of
// one row parity needs input rows g-1 and g only, kept zero-padded per worker (the vector versions compute
// odd rows by pairs, which read row g+1 too: GroupRows::compute_pair). A vector step computes 2 output
// channels x 2 registers of pixels (16 with AVX2, 32 with AVX-512), pixels along the vector; the odd-column
// group's two taps, w0 * in[k-1] + w2 * in[k], are accumulated as U[k] = w0 * in[k-1] and T[k] = w2 *
// in[k-1] and added as U[k] + T[k+1] afterwards, so every accumulator takes one multiply-add per input
// channel (no chain of two dependent ones) and each step loads one input register per half.
//
// Each row kernel has vector versions (AVX2+FMA; the convolutions also AVX-512, the same sums 16 lanes a
// register: the same bits) and a portable one (plain loops), picked at run time. The vector heads compute a
// band's 3x3 convolution as Winograd F(4, 3) along y (half the multiply-adds of a direct one; 2 registers of
// pixels x 6 outputs per step in 12 registers, pixels along the vector, weights broadcast), the portable
// heads directly, a row at a time. Both round the box sum and the activation identically; the heads differ
// by float rounding (up to ~3e-6 of the heads' magnitude) and a NaN reaches the rest of its band in the
// Winograd path.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <utility>
#include <variant>
#include <vector>

#include "../cpu_features.h"
#include "../parallel.h"
#include "../winograd.h"
#include "heads.h"

namespace pybilayer {
namespace {

constexpr int64_t kMinPixelsPerThread = 8 * 1024;  // ~0.25 ms of work at C = 32, against ~10 us per thread
// The heads' vector steps take 2 registers of pixels (16 with AVX2, 32 with AVX-512; a last 16 alone) over
// the columns [0, S - S % kBlock) on both paths (the rest directly), and read the row points of those pixels,
// +-1, rounded up to whole registers: 3 registers' worth a row, kMaxPointColumns at the most.
constexpr int64_t kBlock = 16, kMaxPointColumns = 48;
constexpr int kTanhChannels = 5;                   // delta_uv and lf; the mask stays logits

#ifdef PYBILAYER_X86_AVX2

// The vector operations of the convolution kernels below, W floats a register: 8 (AVX2+FMA) or 16 (AVX-512).
// Each kernel is written once over them and compiled per width (its _avx2 and _avx512 entry points); every
// lane takes the same operations at both widths, so the two give the same bits.
// Those kernels are always inlined into their entry points, so no vector crosses a call between code of
// different targets: GCC's note that such calls would change the ABI does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
template <int W>
struct Simd;
template <>
struct Simd<8> {
  using T = __m256;
  static PYBILAYER_AVX2 T load(const float* p) { return _mm256_loadu_ps(p); }
  static PYBILAYER_AVX2 T load_or(const float* base, int64_t offset) { return base ? load(base + offset) : zero(); }
  static PYBILAYER_AVX2 void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static PYBILAYER_AVX2 T set1(float v) { return _mm256_set1_ps(v); }
  static PYBILAYER_AVX2 T zero() { return _mm256_setzero_ps(); }
  static PYBILAYER_AVX2 T add(T a, T b) { return _mm256_add_ps(a, b); }
  static PYBILAYER_AVX2 T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static PYBILAYER_AVX2 T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static PYBILAYER_AVX2 T div(T a, T b) { return _mm256_div_ps(a, b); }
  static PYBILAYER_AVX2 T min(T a, T b) { return _mm256_min_ps(a, b); }
  static PYBILAYER_AVX2 T max(T a, T b) { return _mm256_max_ps(a, b); }
  static PYBILAYER_AVX2 T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static PYBILAYER_AVX2 T fnmadd(T a, T b, T c) { return _mm256_fnmadd_ps(a, b, c); }
  static PYBILAYER_AVX2 T floor(T a) { return _mm256_floor_ps(a); }
  // 2^n for whole n (|n| < 127), through the exponent field
  static PYBILAYER_AVX2 T pow2(T n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
};
template <>
struct Simd<16> {
  using T = __m512;
  static PYBILAYER_AVX512 T load(const float* p) { return _mm512_loadu_ps(p); }
  static PYBILAYER_AVX512 T load_or(const float* base, int64_t offset) { return base ? load(base + offset) : zero(); }
  static PYBILAYER_AVX512 void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static PYBILAYER_AVX512 T set1(float v) { return _mm512_set1_ps(v); }
  static PYBILAYER_AVX512 T zero() { return _mm512_setzero_ps(); }
  static PYBILAYER_AVX512 T add(T a, T b) { return _mm512_add_ps(a, b); }
  static PYBILAYER_AVX512 T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static PYBILAYER_AVX512 T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static PYBILAYER_AVX512 T div(T a, T b) { return _mm512_div_ps(a, b); }
  static PYBILAYER_AVX512 T min(T a, T b) { return _mm512_min_ps(a, b); }
  static PYBILAYER_AVX512 T max(T a, T b) { return _mm512_max_ps(a, b); }
  static PYBILAYER_AVX512 T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static PYBILAYER_AVX512 T fnmadd(T a, T b, T c) { return _mm512_fnmadd_ps(a, b, c); }
  static PYBILAYER_AVX512 T floor(T a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static PYBILAYER_AVX512 T pow2(T n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
};

// exp(x) for |x| <= 88.38: Cody-Waite reduction by ln 2 and a degree-6 polynomial (Cephes expf), ~1 ulp.
template <int W>
PYBILAYER_INLINE typename Simd<W>::T exp_lanes(typename Simd<W>::T x) {
  using V = Simd<W>;
  const typename V::T fx = V::floor(V::fmadd(x, V::set1(1.44269504088896341f), V::set1(0.5f)));
  x = V::fnmadd(fx, V::set1(0.693359375f), x);
  x = V::fnmadd(fx, V::set1(-2.12194440e-4f), x);
  typename V::T y = V::set1(1.9875691500e-4f);
  y = V::fmadd(y, x, V::set1(1.3981999507e-3f));
  y = V::fmadd(y, x, V::set1(8.3334519073e-3f));
  y = V::fmadd(y, x, V::set1(4.1665795894e-2f));
  y = V::fmadd(y, x, V::set1(1.6666665459e-1f));
  y = V::fmadd(y, x, V::set1(5.0000001201e-1f));
  y = V::add(V::fmadd(y, V::mul(x, x), x), V::set1(1.f));
  return V::mul(y, V::pow2(fx));
}

// tanh(x) = 1 - 2 / (exp(2x) + 1): absolute error ~1e-7. The clamp keeps exp finite and lets NaN through
// (min/max return their second operand when either is NaN).
template <int W>
PYBILAYER_INLINE typename Simd<W>::T tanh_lanes(typename Simd<W>::T x) {
  using V = Simd<W>;
  const typename V::T limit = V::set1(44.f);  // tanh(44) == 1 in float
  x = V::max(V::sub(V::zero(), limit), V::min(limit, x));
  const typename V::T e = exp_lanes<W>(V::add(x, x));
  return V::sub(V::set1(1.f), V::div(V::set1(2.f), V::add(e, V::set1(1.f))));
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

// Channels-last inputs (UpsampleConv::channels_last) -> the rows the group kernels read.
// `pixels` pixels of `channels` values each (pixel stride `pixel`) -> channel c at planes + c * plane.
void to_planes(const float* in, int64_t pixel, int64_t pixels, int64_t channels, float* planes, int64_t plane) {
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t x = 0; x < pixels; ++x) planes[c * plane + x] = in[x * pixel + c];
}

#ifdef PYBILAYER_X86_AVX2
// The same, 8 pixels x 8 channels at a time through registers (the strided scalar reads cost ~4x more).
PYBILAYER_AVX2 void to_planes_avx2(const float* in, int64_t pixel, int64_t pixels, int64_t channels, float* planes,
                                   int64_t plane) {
  const int64_t vector_channels = channels - channels % 8;
  int64_t x = 0;
  for (; x + 8 <= pixels; x += 8)  // 8 pixels' channels, read in order
    for (int64_t c = 0; c < vector_channels; c += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + (x + i) * pixel + c);  // pixel x+i's channels
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      const __m256 columns[8] = {  // channel c+j's 8 pixels
          _mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
          _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
          _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
          _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(planes + (c + j) * plane + x, columns[j]);
    }
  to_planes(in + x * pixel, pixel, pixels - x, vector_channels, planes + x, plane);
  to_planes(in + vector_channels, pixel, pixels, channels - vector_channels, planes + vector_channels * plane, plane);
}
#endif

// u[k] += t[k] for k in [begin, n).
void add_portable(float* u, const float* t, int64_t begin, int64_t n) {
  for (int64_t k = begin; k < n; ++k) u[k] += t[k];
}

#ifdef PYBILAYER_X86_AVX2
PYBILAYER_AVX2 void add_avx2(float* u, const float* t, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(u + k, _mm256_add_ps(_mm256_loadu_ps(u + k), _mm256_loadu_ps(t + k)));
  add_portable(u, t, k, n);
}
#endif

// std::vector's allocator whose element kAligned sits on a 64-byte boundary (a cache line: an AVX-512 load
// from there reads one), where the vector loops' registers start. The heads at p50 (2 threads, released
// size, AVX2): 0.23-0.32 ms faster with the group rows' buffers aligned at column 1 (8 runs), ~0.1 ms more
// with the activation ring and points aligned (4 runs).
template <typename T, size_t kAligned>
struct AlignedAt {
  using value_type = T;
  template <typename U>
  struct rebind {
    using other = AlignedAt<U, kAligned>;
  };
  static constexpr size_t kShift = (64 - kAligned * sizeof(T) % 64) % 64;  // bytes before the data
  AlignedAt() = default;
  template <typename U>
  AlignedAt(const AlignedAt<U, kAligned>&) {}

  T* allocate(size_t n) {
    char* block = static_cast<char*>(::operator new(kShift + n * sizeof(T), std::align_val_t(64)));
    return reinterpret_cast<T*>(block + kShift);
  }
  void deallocate(T* p, size_t) { ::operator delete(reinterpret_cast<char*>(p) - kShift, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const AlignedAt<U, kAligned>&) const { return true; }
  template <typename U>
  bool operator!=(const AlignedAt<U, kAligned>&) const { return false; }
};
using RowBuffer = std::vector<float, AlignedAt<float, 1>>;  // column 1 aligned: where the group steps start
using AlignedFloats = std::vector<float, AlignedAt<float, 0>>;

struct GroupsShape {
  int64_t batch, channels, low_size;
};

GroupsShape shape_of(const TapGroups& groups) {
  if (const Phases* p = std::get_if<Phases>(&groups)) return {p->batch, p->channels, p->low_size};
  const UpsampleConv& c = std::get<UpsampleConv>(groups);
  return {c.batch, c.channels, c.low_size};
}

// Kernel rows of the packed weights below: w[0], w[1], w[2], then w[0] + w[2] and -w[0] for the odd rows'
// pairs (GroupRows::compute_pair).
constexpr int64_t kPackedKernelRows = 5, kSharedRow = 3, kFirstRow = 4;

// An UpsampleConv's weights in the order the vector group rows read them: per kernel row (kPackedKernelRows),
// output channel pair and input channel, {w[1], w[0], w[2]} of the row for the pair's first channel, then
// for its second (zeros for the missing second channel of an odd C). Built once per call, shared by the
// workers.
std::vector<float> pack_upsample_weights(const UpsampleConv& conv) {
  const int64_t C = conv.channels, Cin = conv.in_channels, pairs = (C + 1) / 2;
  std::vector<float> packed(kPackedKernelRows * pairs * Cin * 6, 0.f);
  for (int64_t row = 0; row < kPackedKernelRows; ++row)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t ci = 0; ci < Cin; ++ci) {
        const float* w = conv.weight + (c * Cin + ci) * 9;
        float tap[3];
        for (int kx = 0; kx < 3; ++kx)
          tap[kx] = row < 3 ? w[row * 3 + kx] : row == kSharedRow ? w[kx] + w[6 + kx] : -w[kx];
        float* out = packed.data() + ((row * pairs + c / 2) * Cin + ci) * 6 + (c % 2) * 3;
        out[0] = tap[1], out[1] = tap[0], out[2] = tap[2];
      }
  return packed;
}

// One kernel row's contribution to a row of tap groups: input row (zero-padded, channel 0; channel ci at
// + ci * stride) and its weights (row `ky` of `pack_upsample_weights`, or of conv.weight).
struct GroupTap {
  const float* row;
  int64_t ky;
};

// A row of the even-column group (E) and of the odd-column group's two parts (U, T: file comment), channel
// c at + c * width.
struct GroupRowSet {
  RowBuffer even, odd, odd_shift;
};

#ifdef PYBILAYER_X86_AVX2
// One weight times one or two vectors of input columns (a, b), into their accumulators.
template <int W, int NV>
PYBILAYER_INLINE void accumulate_columns(float weight, const typename Simd<W>::T& a, const typename Simd<W>::T& b,
                                         typename Simd<W>::T& into_a, typename Simd<W>::T& into_b) {
  const typename Simd<W>::T x = Simd<W>::set1(weight);
  into_a = Simd<W>::fmadd(a, x, into_a);
  if (NV == 2) into_b = Simd<W>::fmadd(b, x, into_b);
}

// Where a group_columns step starts and ends: its accumulators start from `init` (E's starting values, or
// null for zeros) or, with `accumulate`, from the rows of `out`; the sums go to `out` and, where set, to
// `also` too. Row pointers at channel c0 = 2 * pair; channel c0 + 1 at + width.
struct GroupStep {
  const float* init;
  bool accumulate;
  float *even, *odd, *odd_shift;
  float *also_even, *also_odd, *also_odd_shift;
  int64_t width;
};

// Columns [k, k + W NV), NV = 1 or 2, of the group rows E, U, T of output channels c0 = 2 * pair and c0 + 1.
// Padded index k holds input column k - 1. Named accumulators, not arrays: GCC kept arrays of them in
// memory, storing all twelve in every step.
template <int W, int NV>
PYBILAYER_INLINE void group_columns(const GroupTap* taps, int ntaps, const float* packed, int64_t pairs, int64_t pair,
                                    int64_t cin, int64_t stride, int64_t k, const GroupStep& step) {
  static_assert(NV == 1 || NV == 2, "one or two vectors of pixels");
  using V = Simd<W>;
  using T = typename V::T;
  const T zero = V::zero();
  const int64_t row_width = step.width;
  const float* e_start = step.accumulate ? step.even : step.init;  // where each accumulator starts (null: zero)
  const float* u_start = step.accumulate ? step.odd : nullptr;
  const float* t_start = step.accumulate ? step.odd_shift : nullptr;
  T e0a = V::load_or(e_start, k), e1a = V::load_or(e_start, row_width + k);
  T u0a = V::load_or(u_start, k), u1a = V::load_or(u_start, row_width + k);
  T t0a = V::load_or(t_start, k), t1a = V::load_or(t_start, row_width + k);
  T e0b = zero, e1b = zero, u0b = zero, u1b = zero, t0b = zero, t1b = zero;
  if (NV == 2) {
    e0b = V::load_or(e_start, k + W), e1b = V::load_or(e_start, row_width + k + W);
    u0b = V::load_or(u_start, k + W), u1b = V::load_or(u_start, row_width + k + W);
    t0b = V::load_or(t_start, k + W), t1b = V::load_or(t_start, row_width + k + W);
  }
  for (int t = 0; t < ntaps; ++t) {
    const float* in = taps[t].row + k;
    const float* w = packed + (taps[t].ky * pairs + pair) * cin * 6;
#pragma GCC unroll 4  // the heads 0.05-0.13 ms faster at p50 (2 threads, released size)
    for (int64_t ci = 0; ci < cin; ++ci, in += stride, w += 6) {
      const T a = V::load(in), b = NV == 2 ? V::load(in + W) : zero;
      accumulate_columns<W, NV>(w[0], a, b, e0a, e0b);
      accumulate_columns<W, NV>(w[1], a, b, u0a, u0b);
      accumulate_columns<W, NV>(w[2], a, b, t0a, t0b);
      accumulate_columns<W, NV>(w[3], a, b, e1a, e1b);
      accumulate_columns<W, NV>(w[4], a, b, u1a, u1b);
      accumulate_columns<W, NV>(w[5], a, b, t1a, t1b);
    }
  }
  for (int copy = 0; copy < (step.also_even ? 2 : 1); ++copy) {
    float *e = copy ? step.also_even : step.even, *u = copy ? step.also_odd : step.odd;
    float* t = copy ? step.also_odd_shift : step.odd_shift;
    V::store(e + k, e0a), V::store(u + k, u0a), V::store(t + k, t0a);
    V::store(e + row_width + k, e1a), V::store(u + row_width + k, u1a), V::store(t + row_width + k, t1a);
    if (NV == 2) {
      V::store(e + k + W, e0b), V::store(u + k + W, u0b), V::store(t + k + W, t0b);
      V::store(e + row_width + k + W, e1b), V::store(u + row_width + k + W, u1b), V::store(t + row_width + k + W, t1b);
    }
  }
}
#endif

// A worker's rows of the four tap groups: views into `phases`, or computed from an UpsampleConv.
class GroupRows {
 public:
  GroupRows(const TapGroups& groups, const float* packed, Isa isa)
      : groups_(groups), packed_(packed), isa_(isa), shape_(shape_of(groups)), P_(shape_.low_size + 1) {
    if (const UpsampleConv* conv = std::get_if<UpsampleConv>(&groups_)) {
      conv_ = conv;
      const int64_t padded_channels = 2 * ((conv->channels + 1) / 2);
      // Group columns 0 .. s, and room for the vector steps' last register past s (its extra columns cost
      // less than finishing one at a time); a multiple of 16, so that every channel's column 1 is aligned.
      // Input columns -1 .. s and beyond, zero outside 0 .. s-1.
      width_ = (shape_.low_size + 31) / 16 * 16;
      input_.assign(kInputSlots * conv->in_channels * width_, 0.f);
      diff_.assign(2 * conv->in_channels * width_, 0.f);
      init_.assign(padded_channels * width_, 0.f);
      for (GroupRowSet& rows : rows_)
        for (RowBuffer* v : {&rows.even, &rows.odd, &rows.odd_shift}) v->assign(padded_channels * width_, 0.f);
    }
  }

  // Row g of the even- and odd-column groups of row parity `parity` for item b, channel 0; channel c's rows
  // at + c * stride(). Rows computed for an UpsampleConv stay valid until the next call.
  std::pair<const float*, const float*> get(int64_t b, int64_t parity, int64_t g) {
    if (conv_ == nullptr) {
      const Phases& p = std::get<Phases>(groups_);
      const int64_t plane = P_ * P_, group = shape_.channels * plane;
      const float* base = p.data + (b * 4 + parity * 2) * group + g * P_;
      return {base, base + group};
    }
    const GroupRowSet& rows = compute(b, parity, g);
    return {rows.even.data(), rows.odd.data()};
  }
  int64_t stride() const { return conv_ == nullptr ? P_ * P_ : width_; }

 private:
  static constexpr int64_t kInputSlots = 3;  // input rows g-1, g, g+1 for a pair of odd rows

  // Input row r of item b, zero-padded (nullptr outside the image): slot r % 3, loaded once.
  const float* input_row(int64_t b, int64_t r) {
    const int64_t s = shape_.low_size, cin = conv_->in_channels;
    if (r < 0 || r >= s) return nullptr;
    float* row = input_.data() + (r % kInputSlots) * cin * width_;
    if (loaded_[r % kInputSlots] != b * s + r) {
      if (conv_->channels_last) {
        planes(conv_->input + (b * s + r) * s * cin, cin, s, cin, row + 1, width_);
      } else {
        const float* src = conv_->input + (b * cin * s + r) * s;
        for (int64_t ci = 0; ci < cin; ++ci) std::memcpy(row + ci * width_ + 1, src + ci * s * s, sizeof(float) * s);
      }
      loaded_[r % kInputSlots] = b * s + r;
    }
    return row;
  }

  // to_planes, vectorized where allowed.
  void planes(const float* in, int64_t pixel, int64_t pixels, int64_t channels, float* out, int64_t plane) const {
#ifdef PYBILAYER_X86_AVX2
    if (isa_ >= Isa::kAvx2) return to_planes_avx2(in, pixel, pixels, channels, out, plane);
#endif
    to_planes(in, pixel, pixels, channels, out, plane);
  }

  const GroupRowSet& compute(int64_t b, int64_t parity, int64_t g) {
    const UpsampleConv& conv = *conv_;
    const int64_t C = conv.channels, s = shape_.low_size;
    if (parity == 1 && paired_item_ == b && paired_row_ == g) return rows_[1];
#ifdef PYBILAYER_X86_AVX2
    if (isa_ != Isa::kPortable && parity == 1 && g % 2 == 0 && g < s) return compute_pair(b, g);
    if (isa_ != Isa::kPortable && parity == 1 && g % 2 == 1) {  // a worker's first row: as the pair computes it
      compute_pair(b, g - 1);
      return rows_[1];
    }
#endif
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
    if (with_init) {
      if (has_skip && conv.channels_last) planes(conv.skip + (b * s + g - 1) * s * C, C, s, C, init_.data() + 1, width_);
      for (int64_t c = 0; c < C; ++c) {
        float* init = init_.data() + c * width_;
        const float bias = conv.bias[c];
        init[0] = bias;
        if (!has_skip) {
          std::fill(init + 1, init + s + 1, bias);
        } else {
          const float* skip = conv.channels_last ? init + 1 : conv.skip + ((b * C + c) * s + g - 1) * s;
          for (int64_t x = 0; x < s; ++x) init[x + 1] = bias + skip[x];
        }
      }
    }
#ifdef PYBILAYER_X86_AVX2
    if (isa_ != Isa::kPortable) {
      const Start start{with_init ? init_.data() : nullptr, false};
      if (isa_ == Isa::kAvx512)
        compute_avx512(taps, ntaps, start, nullptr);
      else
        compute_avx2(taps, ntaps, start, nullptr);
      return finish_odd(rows_[0]);
    }
#endif
    compute_portable(taps, ntaps, with_init);
    return finish_odd(rows_[0]);
  }

#ifdef PYBILAYER_X86_AVX2
  struct Start {
    const float* init;  // E's starting values (channel 0), or null
    bool accumulate;    // or every row's own values
  };

  const GroupRowSet& compute_pair(int64_t b, int64_t g) {
    return isa_ == Isa::kAvx512 ? compute_pair_avx512(b, g) : compute_pair_avx2(b, g);
  }
  PYBILAYER_AVX2 const GroupRowSet& compute_pair_avx2(int64_t b, int64_t g) { return compute_pair_lanes<8>(b, g); }
  PYBILAYER_AVX512 const GroupRowSet& compute_pair_avx512(int64_t b, int64_t g) { return compute_pair_lanes<16>(b, g); }
  PYBILAYER_AVX2 void compute_avx2(const GroupTap* taps, int ntaps, Start start, GroupRowSet* also) {
    compute_lanes<8>(taps, ntaps, start, also);
  }
  PYBILAYER_AVX512 void compute_avx512(const GroupTap* taps, int ntaps, Start start, GroupRowSet* also) {
    compute_lanes<16>(taps, ntaps, start, also);
  }

  // Odd rows g and g + 1 (g even) as Winograd F(2, 2) along y, as the stage's odd-row groups: with D(r) =
  // in(r + 1) - in(r), row g = (w0 + w2) in(g) - w0 D(g - 1) and row g + 1 = (w0 + w2) in(g) + w2 D(g): 3
  // products per two rows, not 4. Row g + 1 waits in rows_[1].
  template <int W>
  PYBILAYER_INLINE const GroupRowSet& compute_pair_lanes(int64_t b, int64_t g) {
    const int64_t cin = conv_->in_channels, n = cin * width_;
    const float *above = input_row(b, g - 1), *here = input_row(b, g), *below = input_row(b, g + 1);
    float *diff_above = diff_.data(), *diff_below = diff_.data() + n;
    for (int64_t i = 0; i < n; ++i) {  // zero rows outside the image
      diff_above[i] = here[i] - (above ? above[i] : 0.f);
      diff_below[i] = (below ? below[i] : 0.f) - here[i];
    }
    const GroupTap shared{here, kSharedRow}, first{diff_above, kFirstRow}, second{diff_below, 2};
    compute_lanes<W>(&shared, 1, {nullptr, false}, &rows_[1]);
    compute_lanes<W>(&first, 1, {nullptr, true}, nullptr);
    std::swap(rows_[0], rows_[1]);  // compute_lanes writes rows_[0]
    compute_lanes<W>(&second, 1, {nullptr, true}, nullptr);
    std::swap(rows_[0], rows_[1]);
    finish_odd(rows_[1]);
    paired_item_ = b, paired_row_ = g + 1;
    return finish_odd(rows_[0]);
  }

  // The group rows into rows_[0] (and `also`, where set), W floats a register.
  template <int W>
  PYBILAYER_INLINE void compute_lanes(const GroupTap* taps, int ntaps, Start start, GroupRowSet* also) {
    const int64_t C = conv_->channels, cin = conv_->in_channels, pairs = (C + 1) / 2, row_width = width_;
    GroupRowSet& out = rows_[0];
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const int64_t c0 = 2 * pair;
      const GroupStep step{start.init ? start.init + c0 * row_width : nullptr,
                           start.accumulate,
                           out.even.data() + c0 * row_width,
                           out.odd.data() + c0 * row_width,
                           out.odd_shift.data() + c0 * row_width,
                           also ? also->even.data() + c0 * row_width : nullptr,
                           also ? also->odd.data() + c0 * row_width : nullptr,
                           also ? also->odd_shift.data() + c0 * row_width : nullptr,
                           row_width};
      // Columns 1 .. s: column 0 reads input column -1 only, a zero (finish_odd).
      const int64_t s = shape_.low_size;
      int64_t k = 1;
      for (; k + 2 * W <= s + 1; k += 2 * W)
        group_columns<W, 2>(taps, ntaps, packed_, pairs, pair, cin, row_width, k, step);
      for (; k <= s; k += W) group_columns<W, 1>(taps, ntaps, packed_, pairs, pair, cin, row_width, k, step);
    }
  }
#endif

  void compute_portable(const GroupTap* taps, int ntaps, bool with_init) {
    const UpsampleConv& conv = *conv_;
    const int64_t C = conv.channels, cin = conv.in_channels, W = width_;
    GroupRowSet& out = rows_[0];
    for (int64_t c = 0; c < C; ++c) {
      float *e = out.even.data() + c * W, *u = out.odd.data() + c * W, *t_row = out.odd_shift.data() + c * W;
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
  }

  // odd[k] = U[k] + T[k + 1] for k < s; T[s + 1] (input column s) is zero.
  const GroupRowSet& finish_odd(GroupRowSet& rows) {
    for (int64_t c = 0; c < conv_->channels; ++c) {
      float* u = rows.odd.data() + c * width_;
      const float* t = rows.odd_shift.data() + c * width_ + 1;
#ifdef PYBILAYER_X86_AVX2
      if (isa_ >= Isa::kAvx2) {  // U[0] = w0 * (input column -1) = 0: the vector steps leave column 0 unwritten
        u[0] = 0.f + t[0];
        add_avx2(u + 1, t + 1, P_ - 2);
        continue;
      }
#endif
      add_portable(u, t, 0, P_ - 1);
    }
    return rows;
  }

  const TapGroups& groups_;
  const float* packed_;
  const Isa isa_;
  const GroupsShape shape_;
  const int64_t P_;
  const UpsampleConv* conv_ = nullptr;
  int64_t width_ = 0;  // columns of every row buffer below
  RowBuffer input_, diff_, init_;
  GroupRowSet rows_[2];  // the rows computed last; rows_[1]: the second row of a pair
  int64_t loaded_[kInputSlots] = {-1, -1, -1};
  int64_t paired_item_ = -1, paired_row_ = -1;  // the odd row that rows_[1] holds
};

// A worker's box rows: R(y+1) and R(y+2) of every channel, the two that output row y reads, made from the
// group rows of their parity as the worker's rows advance (each row of the groups is then used once).
class BoxRows {
 public:
  BoxRows(const TapGroups& groups, const float* packed_conv, Isa isa)
      : groups_(groups, packed_conv, isa), isa_(isa), C_(shape_of(groups).channels), s_(shape_of(groups).low_size),
        box_(2 * C_ * 2 * s_) {}

  // Makes R(y+1) and R(y+2) of item b available: only R(y+2) is new when row y-1 of b came last.
  void advance(int64_t b, int64_t y) {
    for (int64_t m = (b == item_ && last_ == y + 1) ? y + 2 : y + 1; m <= y + 2; ++m) {
      const auto [even, odd] = groups_.get(b, m % 2, m / 2);
      const int64_t stride = groups_.stride();
      for (int64_t c = 0; c < C_; ++c) {
        float* out = box_.data() + (c * 2 + m % 2) * 2 * s_;
#ifdef PYBILAYER_X86_AVX2
        if (isa_ >= Isa::kAvx2) {
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
  const Isa isa_;
  const int64_t C_, s_;
  std::vector<float> box_;          // R(m) of channel c at (c * 2 + m % 2) * 2s
  int64_t item_ = -1, last_ = -1;  // the rows hold R(last_ - 1) and R(last_) of item_
};

// The heads' Winograd transform along rows.
using RowWinograd = winograd::F4x3;

// A worker's rows; see the file comment. The activation ring holds the 6 rows that a band of 4 output rows
// reads (kRingRows).
constexpr int64_t kRingRows = RowWinograd::kWindow;

class Rows {
 public:
  Rows(const HeadsParams& p, Isa isa, const float* packed_conv)
      : p_(p), isa_(isa), box_rows_(p.groups, packed_conv, isa), C_(shape_of(p.groups).channels),
        S_(2 * shape_of(p.groups).low_size), stride_((S_ + 2 + kBlock + 15) / 16 * 16),
        act_(kRingRows * C_ * stride_, 0.f) {}

  // Activation row t(y) of channel c, with t(y)[-1] and t(y)[S] zero; valid after fill(b, y).
  const float* act(int64_t c, int64_t y) const { return act_.data() + (c * kRingRows + slot(y)) * stride_ + 1; }

  // Makes t(y) of item b available: from the box rows R(y+1) and R(y+2), zeros outside the frame.
  void fill(int64_t b, int64_t y) {
    if (y < 0 || y >= S_) {
      for (int64_t c = 0; c < C_; ++c)
        std::memset(act_.data() + (c * kRingRows + slot(y)) * stride_, 0, sizeof(float) * stride_);
      return;
    }
    box_rows_.advance(b, y);
    for (int64_t c = 0; c < C_; ++c) {
      float* t = act_.data() + (c * kRingRows + slot(y)) * stride_ + 1;
      const float *r0 = box_rows_.row(c, y + 1), *r1 = box_rows_.row(c, y + 2);
#ifdef PYBILAYER_X86_AVX2
      if (isa_ >= Isa::kAvx2)
        activate_avx2(r0, r1, p_.scale[c], p_.shift[c], p_.slope[c], t, S_);
      else
#endif
        activate_portable(r0, r1, p_.scale[c], p_.shift[c], p_.slope[c], t, 0, S_);
      t[-1] = 0.f;
      t[S_] = 0.f;
    }
  }

 private:
  static int64_t slot(int64_t y) { return (y % kRingRows + kRingRows) % kRingRows; }

  const HeadsParams& p_;
  const Isa isa_;
  BoxRows box_rows_;
  const int64_t C_, S_, stride_;  // stride_: floats per row, S + 2 and room for a vector read beyond, rounded
                                  // up to whole vectors so that every row starts aligned
  AlignedFloats act_;
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
// Pixels [x, x + NV W) of output rows y0 .. y0 + nrows - 1 (nrows <= 4) of one item, W floats a register: the
// 3x3 convolution as Winograd F(4, 3) along y (winograd.h). Each channel's activation rows y0 - 1 .. y0 + 4
// become 6 row points; point i is convolved along x with its 3 transformed taps (NV W pixels x 6 outputs per
// step, as a direct row would be, but 18 multiply-adds per channel and 4 rows against 36), and A^T of the 6
// products gives the 4 rows. The points are made a step's pixels at a time (columns x - 1 .. x + NV W and a
// register's rounding), so that the step reads them from L1 (from a band-wide buffer in L2, the heads took
// 0.15-0.2 ms longer). `packed`: the transformed weights as (6 points, C, 3 taps, 6 outputs); `points`: 6 x C
// x 3 W floats.
template <int W, int NV>
PYBILAYER_INLINE void heads_step(const HeadsParams& p, const Rows& rows, int64_t y0, int64_t nrows, const float* packed,
                                 float* points, const OutputRows out[RowWinograd::kTile], int64_t x) {
  using V = Simd<W>;
  using T = typename V::T;
  constexpr int kWindow = RowWinograd::kWindow;
  constexpr int64_t kColumns = (NV + 1) * W, kPointColumns = 3 * W;
  static_assert(kPointColumns <= kMaxPointColumns, "the points of a step");
  const int64_t C = shape_of(p.groups).channels;
  alignas(64) float products[kWindow][kHeadChannels][NV * W];
  for (int64_t c = 0; c < C; ++c) {  // B^T of the 6 rows, columns x - 1 .. x + kColumns - 2
    const float* in[kWindow];
    for (int r = 0; r < kWindow; ++r) in[r] = rows.act(c, y0 - 1 + r) - 1 + x;
    for (int64_t k = 0; k < kColumns; k += W) {
      T d[kWindow], q[kWindow];
      for (int r = 0; r < kWindow; ++r) d[r] = V::load(in[r] + k);
      RowWinograd::input(d, q);
      for (int i = 0; i < kWindow; ++i) V::store(points + (i * C + c) * kPointColumns + k, q[i]);
    }
  }
  for (int i = 0; i < kWindow; ++i) {
    const T zero = V::zero();
    T a0 = zero, b0 = zero, a1 = zero, b1 = zero, a2 = zero, b2 = zero;
    T a3 = zero, b3 = zero, a4 = zero, b4 = zero, a5 = zero, b5 = zero;
    const float* w = packed + i * C * 3 * kHeadChannels;
    for (int64_t c = 0; c < C; ++c) {
      const float* t = points + (i * C + c) * kPointColumns;
      // Not unrolled: unrolling let GCC hoist the next taps' loads and spill an accumulator to the stack,
      // which made the direct kernel ~1.4x slower (3.0 against 2.2 ms at 256 px, C = 32, 2 threads).
#pragma GCC unroll 1
      for (int j = 0; j < 3; ++j, w += kHeadChannels) {
        const T lo = V::load(t + j), hi = NV == 2 ? V::load(t + j + W) : zero;
        T v = V::set1(w[0]);
        a0 = V::fmadd(lo, v, a0);
        if (NV == 2) b0 = V::fmadd(hi, v, b0);
        v = V::set1(w[1]);
        a1 = V::fmadd(lo, v, a1);
        if (NV == 2) b1 = V::fmadd(hi, v, b1);
        v = V::set1(w[2]);
        a2 = V::fmadd(lo, v, a2);
        if (NV == 2) b2 = V::fmadd(hi, v, b2);
        v = V::set1(w[3]);
        a3 = V::fmadd(lo, v, a3);
        if (NV == 2) b3 = V::fmadd(hi, v, b3);
        v = V::set1(w[4]);
        a4 = V::fmadd(lo, v, a4);
        if (NV == 2) b4 = V::fmadd(hi, v, b4);
        v = V::set1(w[5]);
        a5 = V::fmadd(lo, v, a5);
        if (NV == 2) b5 = V::fmadd(hi, v, b5);
      }
    }
    const T sums[kHeadChannels][2] = {{a0, b0}, {a1, b1}, {a2, b2}, {a3, b3}, {a4, b4}, {a5, b5}};
    for (int o = 0; o < kHeadChannels; ++o)
      for (int r = 0; r < NV; ++r) V::store(products[i][o] + r * W, sums[o][r]);
  }
  for (int o = 0; o < kHeadChannels; ++o) {
    const T bias = V::set1(p.bias[o]);
    for (int r = 0; r < NV; ++r) {
      T m[kWindow], rows_out[RowWinograd::kTile];
      for (int i = 0; i < kWindow; ++i) m[i] = V::load(products[i][o] + r * W);
      RowWinograd::output(m, rows_out);
      for (int64_t k = 0; k < nrows; ++k) {
        const T h = V::add(rows_out[k], bias);
        V::store(out[k].row[o] + x + r * W, o < kTanhChannels ? tanh_lanes<W>(h) : h);
      }
    }
  }
}

// Output rows y0 .. y0 + nrows - 1 of one item: heads_step over the vector columns, the rest directly.
template <int W>
PYBILAYER_INLINE void heads_band_lanes(const HeadsParams& p, const Rows& rows, int64_t y0, int64_t nrows,
                                       const float* packed, float* points, const OutputRows out[RowWinograd::kTile]) {
  const int64_t S = 2 * shape_of(p.groups).low_size, vector_end = S - S % kBlock;
  int64_t x = 0;
  for (; x + 2 * W <= vector_end; x += 2 * W) heads_step<W, 2>(p, rows, y0, nrows, packed, points, out, x);
  for (; x < vector_end; x += W) heads_step<W, 1>(p, rows, y0, nrows, packed, points, out, x);
  if (vector_end < S)
    for (int64_t k = 0; k < nrows; ++k) heads_row_portable(p, rows, y0 + k, vector_end, out[k]);
}

PYBILAYER_AVX2 void heads_band_avx2(const HeadsParams& p, const Rows& rows, int64_t y0, int64_t nrows,
                                    const float* packed, float* points, const OutputRows out[RowWinograd::kTile]) {
  heads_band_lanes<8>(p, rows, y0, nrows, packed, points, out);
}

// GCC 12's AVX-512 intrinsics (min, max, round, convert) pass their builtins an undefined register, which
// -Wmaybe-uninitialized reports once inlined here (GCC bug 105593): a false alarm.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
PYBILAYER_AVX512 void heads_band_avx512(const HeadsParams& p, const Rows& rows, int64_t y0, int64_t nrows,
                                        const float* packed, float* points, const OutputRows out[RowWinograd::kTile]) {
  heads_band_lanes<16>(p, rows, y0, nrows, packed, points, out);
}
#pragma GCC diagnostic pop

// The transformed weights of heads_step: point i of kernel column j's 3 taps, as (6, C, 3, 6).
std::vector<float> pack_heads_weights(const HeadsParams& p, int64_t C) {
  constexpr int kWindow = RowWinograd::kWindow;
  std::vector<float> packed(kWindow * C * 3 * kHeadChannels);
  for (int o = 0; o < kHeadChannels; ++o)
    for (int64_t c = 0; c < C; ++c)
      for (int j = 0; j < 3; ++j) {
        const float* w = p.weight + (o * C + c) * 9 + j;
        const double column[3] = {w[0], w[3], w[6]};
        double u[kWindow];
        RowWinograd::kernel(column, u);
        for (int i = 0; i < kWindow; ++i) packed[((i * C + c) * 3 + j) * kHeadChannels + o] = static_cast<float>(u[i]);
      }
  return packed;
}
#endif

// Output rows [row_begin, row_end) of B x S of every channel: x(y) = R(y+1) + R(y+2).
void block_output_rows(const BlockOutputParams& p, int64_t row_begin, int64_t row_end, Isa isa,
                       const float* packed_conv) {
  const GroupsShape shape = shape_of(p.groups);
  const int64_t C = shape.channels, S = 2 * shape.low_size;
  BoxRows box_rows(p.groups, packed_conv, isa);
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

// The bands that next_band() returns, until -1, of B x ceil(S / 4): band k of an item is its output rows
// 4k .. 4k + 3 (< S). `packed`: heads_step's weights (null on the portable path, one row at a time).
template <typename NextBand>
void heads_bands(const HeadsParams& p, const NextBand& next_band, Isa isa, const float* packed,
                 const float* packed_conv) {
  constexpr int64_t kTile = RowWinograd::kTile;
  const int64_t S = 2 * shape_of(p.groups).low_size, C = shape_of(p.groups).channels, per_item = (S + kTile - 1) / kTile;
  Rows rows(p, isa, packed_conv);
  AlignedFloats points(isa != Isa::kPortable ? RowWinograd::kWindow * C * kMaxPointColumns : 0, 0.f);
  int64_t item = -1, next = 0;  // t rows of `item` are filled up to, not including, row `next`
  for (int64_t band; (band = next_band()) >= 0;) {
    const int64_t b = band / per_item, y0 = band % per_item * kTile, nrows = std::min(kTile, S - y0);
    if (b != item || next != y0 + 1) item = b, next = y0 - 1;  // a new item, or not the band after the last
    for (; next <= y0 + kTile; ++next) rows.fill(b, next);      // t(y0 - 1) .. t(y0 + 4), zero outside
    const auto row = [&](int64_t k) { return OutputRows(p, b, std::min(y0 + k, S - 1)); };  // rows < nrows used
    const OutputRows out[kTile] = {row(0), row(1), row(2), row(3)};
#ifdef PYBILAYER_X86_AVX2
    if (isa == Isa::kAvx512) {
      heads_band_avx512(p, rows, y0, nrows, packed, points.data(), out);
      continue;
    }
    if (isa == Isa::kAvx2) {
      heads_band_avx2(p, rows, y0, nrows, packed, points.data(), out);
      continue;
    }
#endif
    for (int64_t k = 0; k < nrows; ++k) heads_row_portable(p, rows, y0 + k, 0, out[k]);
  }
}

// The vector group rows' weights for an UpsampleConv (else empty).
std::vector<float> packed_conv_weights(const TapGroups& groups, Isa isa) {
  const UpsampleConv* conv = std::get_if<UpsampleConv>(&groups);
  return conv != nullptr && isa != Isa::kPortable ? pack_upsample_weights(*conv) : std::vector<float>();
}

// Multiply-adds per output row spent on the tap groups (0 for given ones).
int64_t group_work_per_row(const TapGroups& groups) {
  const UpsampleConv* conv = std::get_if<UpsampleConv>(&groups);
  return conv == nullptr ? 0 : conv->in_channels * conv->channels * (conv->low_size + 1) * 9 / 2;
}

}  // namespace

void heads_cpu(const HeadsParams& p, int num_threads, Isa isa) {
  const GroupsShape shape = shape_of(p.groups);
  const int64_t S = 2 * shape.low_size, C = shape.channels, bands = shape.batch * ((S + RowWinograd::kTile - 1) / RowWinograd::kTile);
  if (bands == 0 || C == 0) return;
  std::vector<float> packed;
#ifdef PYBILAYER_X86_AVX2
  if (isa != Isa::kPortable) packed = pack_heads_weights(p, C);
#endif
  const std::vector<float> packed_conv = packed_conv_weights(p.groups, isa);
  const int64_t band_work = RowWinograd::kTile * (S + group_work_per_row(p.groups) / (C * 9 * kHeadChannels));  // in pixels of the heads
  parallel_stealing(bands, worker_count(bands, band_work, kMinPixelsPerThread, num_threads), [&](const auto& next_band) {
    heads_bands(p, next_band, isa, packed.data(), packed_conv.data());
  });
}

void block_output_cpu(const BlockOutputParams& p, int num_threads, Isa isa) {
  const GroupsShape shape = shape_of(p.groups);
  const int64_t S = 2 * shape.low_size, rows = shape.batch * S, C = shape.channels;
  if (rows == 0 || C == 0) return;
  const std::vector<float> packed_conv = packed_conv_weights(p.groups, isa);
  // From given groups a memory-bound pass: a thread pays off from ~64K output values.
  const int64_t row_work = C * S + group_work_per_row(p.groups) / 8;
  parallel_rows(rows, worker_count(rows, row_work, 8 * kMinPixelsPerThread, num_threads),
                [&](int64_t begin, int64_t end) { block_output_rows(p, begin, end, isa, packed_conv.data()); });
}

}  // namespace pybilayer
