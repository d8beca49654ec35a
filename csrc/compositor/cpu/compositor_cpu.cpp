// The CPU twin of the compositor (convention in compositor.h).
//
// Work is split into output rows. Each row runs three short passes over row-sized fp32 buffers that
// stay in L1: (1) sample + lf, the gather loop; (2) mask compositing; (3) conversion to the output
// layout. Passes 2 and 3 are plain loops the compiler vectorises; pass 1 shares its sampling math with
// the CUDA twin (sampling.h).
//
// The row kernels are compiled twice: for x86-64 CPUs with AVX2+FMA (where fmaf is one instruction, the
// compiler uses wide registers, and fp32 textures are read two texels per load) and portably (fmaf from
// libm), picked once at run time. Both give bit-identical results.
//
// Threads: parallel_rows (parallel.h), used only when every thread gets enough pixels.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "../../parallel.h"
#include "../compositor.h"
#include "../sampling.h"

namespace pybilayer {
namespace {

constexpr int64_t kMinPixelsPerThread = 32 * 1024;

#if defined(__GNUC__)
#define PYBILAYER_INLINE __attribute__((always_inline)) inline
#else
#define PYBILAYER_INLINE inline
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#define PYBILAYER_X86_FMA_CLONE 1
#include <immintrin.h>
#endif
// The row arrays never overlap; after inlining GCC loses the restrict qualifiers and would give up on
// run-time alias checks, so say it per loop.
#if defined(__clang__)
#define PYBILAYER_NO_ALIAS _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define PYBILAYER_NO_ALIAS _Pragma("GCC ivdep")
#else
#define PYBILAYER_NO_ALIAS
#endif

// Row `offset..offset+n` of an fp32/fp16 array as fp32: a view for fp32, a widened copy for fp16.
const float* row_as_float(const void* base, ScalarType type, int64_t offset, int64_t n, float* scratch) {
  if (type == ScalarType::kFloat32) return static_cast<const float*>(base) + offset;
  const Half* src = static_cast<const Half*>(base) + offset;
  for (int64_t i = 0; i < n; ++i) scratch[i] = to_float(src[i]);
  return scratch;
}

// Taps of one output row, as four offset and four weight arrays of W (nw, ne, sw, se): an arithmetic
// loop the compiler vectorises. Separate restrict arrays, because one array indexed k * W + x defeats
// GCC's dependence analysis.
PYBILAYER_INLINE void row_taps(const float* __restrict__ grid_x, const float* __restrict__ du_x,
                               const float* __restrict__ du_y, float grid_y, int64_t W, int32_t texture_width,
                               int32_t texture_height, int32_t* __restrict__ offset, float* __restrict__ weight) {
  int32_t* __restrict__ nw_offset = offset;
  int32_t* __restrict__ ne_offset = offset + W;
  int32_t* __restrict__ sw_offset = offset + 2 * W;
  int32_t* __restrict__ se_offset = offset + 3 * W;
  float* __restrict__ nw_weight = weight;
  float* __restrict__ ne_weight = weight + W;
  float* __restrict__ sw_weight = weight + 2 * W;
  float* __restrict__ se_weight = weight + 3 * W;
  PYBILAYER_NO_ALIAS
  for (int64_t x = 0; x < W; ++x) {
    const BilinearTaps taps = bilinear_taps(grid_x[x] + du_x[x], grid_y + du_y[x], texture_width, texture_height);
    nw_offset[x] = taps.offset[0];
    ne_offset[x] = taps.offset[1];
    sw_offset[x] = taps.offset[2];
    se_offset[x] = taps.offset[3];
    nw_weight[x] = taps.weight[0];
    ne_weight[x] = taps.weight[1];
    sw_weight[x] = taps.weight[2];
    se_weight[x] = taps.weight[3];
  }
}

// value = bilinear(plane) + lf along one row, from the taps of row_taps. Vectorised too, with the texel
// loads done element by element (hardware gathers measured slower on the AMD EPYC this was tuned on).
template <typename TexT>
PYBILAYER_INLINE void sample_row(const TexT* __restrict__ plane, const float* __restrict__ lf,
                                 float* __restrict__ value, int64_t W, const int32_t* __restrict__ offset,
                                 const float* __restrict__ weight) {
  const int32_t* __restrict__ nw_offset = offset;
  const int32_t* __restrict__ ne_offset = offset + W;
  const int32_t* __restrict__ sw_offset = offset + 2 * W;
  const int32_t* __restrict__ se_offset = offset + 3 * W;
  const float* __restrict__ nw_weight = weight;
  const float* __restrict__ ne_weight = weight + W;
  const float* __restrict__ sw_weight = weight + 2 * W;
  const float* __restrict__ se_weight = weight + 3 * W;
  PYBILAYER_NO_ALIAS
  for (int64_t x = 0; x < W; ++x) {
    const BilinearTaps taps = {{nw_offset[x], ne_offset[x], sw_offset[x], se_offset[x]},
                               {nw_weight[x], ne_weight[x], sw_weight[x], se_weight[x]}};
    value[x] = sample_plane(plane, taps) + lf[x];
  }
}

#ifdef PYBILAYER_X86_FMA_CLONE
// sample_row for fp32 textures with AVX2, eight pixels at a time. Where all four taps of all eight pixels
// lie inside the texture (offsets nw, nw + 1, nw + width, nw + width + 1; a tap outside has offset 0 and
// breaks the pattern), each texel pair (nw, ne) and (sw, se) is one 8-byte load instead of two single
// loads; the arithmetic is sample_plane's, in the same order, so results are bit-identical.
__attribute__((target("avx2,fma"))) inline void sample_row_pairs(const float* __restrict__ plane,
                                                                 int32_t texture_width, const float* __restrict__ lf,
                                                                 float* __restrict__ value, int64_t W,
                                                                 const int32_t* __restrict__ offset,
                                                                 const float* __restrict__ weight) {
  const int32_t *nw_offset = offset, *ne_offset = offset + W, *sw_offset = offset + 2 * W, *se_offset = offset + 3 * W;
  const float *nw_weight = weight, *ne_weight = weight + W, *sw_weight = weight + 2 * W, *se_weight = weight + 3 * W;
  const __m256i one = _mm256_set1_epi32(1), row = _mm256_set1_epi32(texture_width);
  const auto pair = [plane](int32_t at) { return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(plane + at))); };
  // Lanes 0 and 1 of four pairs -> (first of each pair), (second of each pair).
  const auto split = [](__m128 p0, __m128 p1, __m128 p2, __m128 p3, __m128& first, __m128& second) {
    const __m128 a = _mm_movelh_ps(p0, p1), b = _mm_movelh_ps(p2, p3);
    first = _mm_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    second = _mm_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
  };
  int64_t x = 0;
  for (; x + 8 <= W; x += 8) {
    const __m256i nw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nw_offset + x));
    const __m256i ne = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ne_offset + x));
    const __m256i sw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sw_offset + x));
    const __m256i se = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(se_offset + x));
    const __m256i sw_expected = _mm256_add_epi32(nw, row);
    const __m256i inside = _mm256_and_si256(
        _mm256_and_si256(_mm256_cmpeq_epi32(ne, _mm256_add_epi32(nw, one)), _mm256_cmpeq_epi32(sw, sw_expected)),
        _mm256_cmpeq_epi32(se, _mm256_add_epi32(sw_expected, one)));
    if (_mm256_movemask_epi8(inside) != -1) {  // a border pixel among the eight: one tap at a time
      for (int64_t i = x; i < x + 8; ++i) {
        const BilinearTaps taps = {{nw_offset[i], ne_offset[i], sw_offset[i], se_offset[i]},
                                   {nw_weight[i], ne_weight[i], sw_weight[i], se_weight[i]}};
        value[i] = sample_plane(plane, taps) + lf[i];
      }
      continue;
    }
    alignas(32) int32_t top[8], bottom[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(top), nw);
    _mm256_store_si256(reinterpret_cast<__m256i*>(bottom), sw);
    __m128 nw_lo, ne_lo, nw_hi, ne_hi, sw_lo, se_lo, sw_hi, se_hi;
    split(pair(top[0]), pair(top[1]), pair(top[2]), pair(top[3]), nw_lo, ne_lo);
    split(pair(top[4]), pair(top[5]), pair(top[6]), pair(top[7]), nw_hi, ne_hi);
    split(pair(bottom[0]), pair(bottom[1]), pair(bottom[2]), pair(bottom[3]), sw_lo, se_lo);
    split(pair(bottom[4]), pair(bottom[5]), pair(bottom[6]), pair(bottom[7]), sw_hi, se_hi);
    __m256 sum = _mm256_mul_ps(_mm256_set_m128(nw_hi, nw_lo), _mm256_loadu_ps(nw_weight + x));
    sum = _mm256_fmadd_ps(_mm256_set_m128(ne_hi, ne_lo), _mm256_loadu_ps(ne_weight + x), sum);
    sum = _mm256_fmadd_ps(_mm256_set_m128(sw_hi, sw_lo), _mm256_loadu_ps(sw_weight + x), sum);
    sum = _mm256_fmadd_ps(_mm256_set_m128(se_hi, se_lo), _mm256_loadu_ps(se_weight + x), sum);
    _mm256_storeu_ps(value + x, _mm256_add_ps(sum, _mm256_loadu_ps(lf + x)));
  }
  for (; x < W; ++x) {
    const BilinearTaps taps = {{nw_offset[x], ne_offset[x], sw_offset[x], se_offset[x]},
                               {nw_weight[x], ne_weight[x], sw_weight[x], se_weight[x]}};
    value[x] = sample_plane(plane, taps) + lf[x];
  }
}
#endif

PYBILAYER_INLINE void to_uint8_row(const float* __restrict__ value, uint8_t* __restrict__ out, int64_t W) {
  PYBILAYER_NO_ALIAS
  for (int64_t x = 0; x < W; ++x) out[x] = to_uint8(value[x]);
}

// kChannels: the channel count when known at compile time (3, the common case), or 0. kAvx2: compiled
// into the AVX2+FMA clone, where fp32 textures take sample_row_pairs.
template <typename TexT, int kChannels, bool kAvx2>
PYBILAYER_INLINE void composite_rows(const CompositeParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t H = p.height, W = p.width;
  const int C = kChannels > 0 ? kChannels : static_cast<int>(p.channels);
  const int32_t texture_width = static_cast<int32_t>(p.texture_width);
  const int32_t texture_height = static_cast<int32_t>(p.texture_height);
  const int64_t texture_plane = p.texture_height * p.texture_width;
  const bool float_out = p.out_layout == OutputLayout::kFloat32CHW;

  std::vector<float> grid_x(W);
  for (int64_t x = 0; x < W; ++x) grid_x[x] = identity_coordinate(x, W);
  // Per row: du_x, du_y, mask, then C value rows, C lf rows and C background rows (fp16 inputs only).
  std::vector<float> scratch((3 + 3 * kMaxChannels) * W);
  float* du_x_buf = scratch.data();
  float* du_y_buf = du_x_buf + W;
  float* mask_buf = du_y_buf + W;
  float* value_buf = mask_buf + W;
  float* lf_buf = value_buf + kMaxChannels * W;
  float* bg_buf = lf_buf + kMaxChannels * W;
  std::vector<int32_t> tap_offsets(4 * W);
  std::vector<float> tap_weights(4 * W);
  std::vector<uint8_t> bytes(kMaxChannels * W);
  uint8_t* const byte_buf = bytes.data();
  int32_t* const tap_offset = tap_offsets.data();
  float* const tap_weight = tap_weights.data();

  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / H, y = row - b * H;
    const TexT* __restrict__ texture = static_cast<const TexT*>(p.texture) + b * p.texture_batch_stride;
    const float* __restrict__ du_x = row_as_float(p.delta_uv, p.delta_uv_type, ((b * 2 + 0) * H + y) * W, W, du_x_buf);
    const float* __restrict__ du_y = row_as_float(p.delta_uv, p.delta_uv_type, ((b * 2 + 1) * H + y) * W, W, du_y_buf);
    const float grid_y = identity_coordinate(y, H);

    // Pass 1: value = lf + bilinear(texture). Float output is written in place, in its final layout.
    float* value[kMaxChannels];
    const float* lf[kMaxChannels];
    for (int c = 0; c < C; ++c) {
      const int64_t plane_row = ((b * C + c) * H + y) * W;
      value[c] = float_out ? static_cast<float*>(p.out) + plane_row : value_buf + c * W;
      lf[c] = row_as_float(p.lf, p.lf_type, plane_row, W, lf_buf + c * W);
    }
    // 1a: the taps of the whole row, one array per tap; 1b: gather, one channel plane at a time.
    row_taps(grid_x.data(), du_x, du_y, grid_y, W, texture_width, texture_height, tap_offset, tap_weight);
    for (int c = 0; c < C; ++c) {
#ifdef PYBILAYER_X86_FMA_CLONE
      if constexpr (kAvx2 && std::is_same_v<TexT, float>) {
        sample_row_pairs(texture + c * texture_plane, texture_width, lf[c], value[c], W, tap_offset, tap_weight);
        continue;
      }
#endif
      sample_row(texture + c * texture_plane, lf[c], value[c], W, tap_offset, tap_weight);
    }

    // Pass 2: value * m + background * (1 - m).
    if (p.mask != nullptr) {
      const float* mask = row_as_float(p.mask, p.mask_type, (b * H + y) * W, W, mask_buf);
      if (p.mask_is_logits) {
        for (int64_t x = 0; x < W; ++x) mask_buf[x] = sigmoid(mask[x]);
        mask = mask_buf;
      }
      for (int c = 0; c < C; ++c) {
        float* __restrict__ v = value[c];
        const float* __restrict__ m = mask;
        if (p.background != nullptr) {
          const float* __restrict__ bg =
              row_as_float(p.background, p.background_type, ((b * C + c) * H + y) * W, W, bg_buf + c * W);
          for (int64_t x = 0; x < W; ++x) v[x] = v[x] * m[x] + bg[x] * (1.f - m[x]);
        } else {
          const float bg = p.background_color[c];
          for (int64_t x = 0; x < W; ++x) v[x] = v[x] * m[x] + bg * (1.f - m[x]);
        }
      }
    }

    // Pass 3: the displayable frame: convert each channel row (vectorised), then interleave the bytes.
    if (!float_out) {
      for (int c = 0; c < C; ++c) to_uint8_row(value[c], byte_buf + c * W, W);
      uint8_t* __restrict__ out = static_cast<uint8_t*>(p.out) + (b * H + y) * W * C;
      for (int64_t x = 0; x < W; ++x)
        for (int c = 0; c < C; ++c) out[x * C + c] = byte_buf[c * W + x];
    }
  }
}

template <typename TexT, bool kAvx2>
PYBILAYER_INLINE void composite_range(const CompositeParams& p, int64_t row_begin, int64_t row_end) {
  if (p.channels == 3)
    composite_rows<TexT, 3, kAvx2>(p, row_begin, row_end);
  else
    composite_rows<TexT, 0, kAvx2>(p, row_begin, row_end);
}

template <bool kAvx2>
PYBILAYER_INLINE void composite_range_any(const CompositeParams& p, int64_t row_begin, int64_t row_end) {
  if (p.texture_type == ScalarType::kFloat16)
    composite_range<Half, kAvx2>(p, row_begin, row_end);
  else
    composite_range<float, kAvx2>(p, row_begin, row_end);
}

void composite_range_portable(const CompositeParams& p, int64_t row_begin, int64_t row_end) {
  composite_range_any<false>(p, row_begin, row_end);
}

#ifdef PYBILAYER_X86_FMA_CLONE
__attribute__((target("avx2,fma"))) void composite_range_fma(const CompositeParams& p, int64_t row_begin,
                                                              int64_t row_end) {
  composite_range_any<true>(p, row_begin, row_end);
}
#endif

void run_rows(const CompositeParams& p, int64_t row_begin, int64_t row_end) {
#ifdef PYBILAYER_X86_FMA_CLONE
  static const bool has_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has_fma) return composite_range_fma(p, row_begin, row_end);
#endif
  composite_range_portable(p, row_begin, row_end);
}

}  // namespace

void composite_cpu(const CompositeParams& params, int num_threads) {
  const int64_t rows = params.batch * params.height;
  if (rows == 0 || params.width == 0) return;
  parallel_rows(rows, worker_count(rows, params.width, kMinPixelsPerThread, num_threads),
                [&](int64_t row_begin, int64_t row_end) { run_rows(params, row_begin, row_end); });
}

}  // namespace pybilayer
