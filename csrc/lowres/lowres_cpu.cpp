// The keypoint MLP and the up-sampling blocks on the CPU (convention in lowres.h).
//
// Maps are channels-last with every channel count rounded up to 16 (the extra channels hold zeros and
// zero weights, so no pass needs a tail), and each convolution's input carries a zero border, written
// once at construction: no pass tests for edges. Per block:
//   T  (s+2)^2 x Cin'        t = the input activation, the border zero (where conv1 is direct: Winograd
//                             computes t from x in its input transform)
//   HX (s+2)^2 x (C' + Cin')  [h | x]: conv1's output beside the block input, so the up-sampling
//                             convolution's 1x1 tap group and the skip are one convolution over C' + Cin
//   V  (s+1)^2 x 4C'         the four tap groups (ee, eo, oe, oo), read by the box sum
// (with heads_inputs the last block has no V: its h and skip go straight to the outputs, channels-last, where
// C' = C, as at the released size; else to HX and a map of their own, then without the extra channels).
// A convolution is packed as [output block of 16][tap][input channel][16] and run as independent items
// (output block x 6 consecutive pixels) in an order where a worker keeps one output block's weights in L2
// across its pixels (or, where they all fit, a pixel block's inputs in L1 across the output blocks); the
// workers take them a chunk of consecutive items at a time, so a worker slowed by anything else on the
// machine leaves more of the pass to the other. The workers run every pass of the stage and meet at a
// barrier between passes (starting threads per pass would cost ~10 us each, against 20-500 us passes),
// except in the blocks on the largest maps, which they run depth first, each on bands of rows of its own
// (run_sweep).
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>

#include "../cpu_features.h"
#include "../parallel.h"
#include "../winograd.h"
#include "lowres.h"

namespace pybilayer {
namespace {

constexpr int64_t kLanes = 16;  // output channels of an item: two AVX2 registers, one AVX-512 register
constexpr int kPixels = 6;      // pixels of an item: 12 AVX2 accumulators (an AVX-512 step runs two items)
constexpr float kSlope = 0.2f;  // LeakyReLU after conv1 and between MLP layers
// Released size, 2 cores, the whole stage in turns with output-block order everywhere: p50 1.2-2.0 ms faster.
constexpr size_t kPixelsOuterWeightBytes = 256 * 1024;
// The items of every pass (pixels, rows, tiles, convolution items) are taken by the workers a chunk at a
// time, 1 / (kChunkShare * workers) of those left (guided), so a worker slowed by anything else on the
// machine leaves more of the pass to the other and the last chunks are small; a convolution's chunks have
// at least 1 / (kMinChunksPerWorker * workers) of its items. Against fixed chunks of 1/8 of a worker's
// share and equal shares of the other passes (where a worker waited 1.4 ms a call in all at the barriers,
// at the median; 0.39 ms at the 64 px groups, whose items differ in cost): 0.13 ms, and the stage in turns
// (4 runs of 400 calls) 0.1-0.7 ms faster at p25, 0.05-0.75 ms at p50, the same minimum.
constexpr int64_t kChunkShare = 3, kMinChunksPerWorker = 64;
// The tap groups that take the odd taps [w0, w2] along an axis go by pairs of outputs along it (Winograd
// F(2, 2), the constructor). Row pairs from 8 px: 13-14% faster group passes at 8-64 px, but 37% slower at
// 4 px, where reading the 1.5x weights is the cost. Column pairs too from 16 px where the groups have 128
// channels or more: the stage 0.2-0.3 ms faster at the released size; at 64 px and 64 channels they made
// it 0.2-1.0 ms slower (short sums between 2-4 outputs' loads and stores, three difference maps).
constexpr int64_t kRowPairsMinSize = 8, kColumnPairsMinSize = 16, kColumnPairsMinChannels = 128;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Coefficients over a 3-tap kernel axis: the even taps [w1], the odd ones [w0] and [w2] alone, and the
// odd taps' pair products (the stage's constructor) by kind: shared w0 + w2, first -w0, second w2.
enum PairKind { kShared, kFirst, kSecond };
constexpr float kEvenTap[3] = {0, 1, 0};
constexpr float kOddTaps[2][3] = {{1, 0, 0}, {0, 0, 1}};
constexpr float kPairCoefficients[3][3] = {{1, 0, 1}, {-1, 0, 0}, {0, 0, 1}};

// ------------------------------------------------------------------ memory
//
// A frame streams the stage's ~35 MB of packed weights and its maps. On 4 KiB pages that is a TLB miss a
// page, and the hardware prefetchers stop at every page's end: a 64 MB read streamed at 13.9 GB/s on 4 KiB
// pages against 19.6 GB/s on 2 MiB ones on this project's CPU. So every buffer the stage's constructor
// allocates comes from its Arena: chunks aligned to 2 MiB that the kernel is asked to back with transparent
// huge pages (madvise; where it declines, they are ordinary pages). The chunks are mapped fresh, not taken
// from the heap: there they were mostly memory that earlier allocations (torch's, creating the avatar) had
// already touched, whose 4 KiB pages stay 4 KiB pages until khugepaged collapses them (~16 MB every 10 s
// here). In a Renderer, two of the stage's three chunks had no huge page after the avatar's creation; the
// stage alone in turns is 0.3-0.8 ms faster at p50 on 2 MiB pages than on 4 KiB ones (3 runs).
constexpr size_t kHugePage = size_t(2) << 20, kArenaChunk = size_t(32) << 20, kAlignment = 64;

class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() {
    for (const Chunk& chunk : chunks_) munmap(chunk.data, chunk.size);
  }

  void* allocate(size_t bytes) {
    bytes = (bytes + kAlignment - 1) / kAlignment * kAlignment;
    if (bytes > left_) {
      const size_t size = std::max(kArenaChunk, (bytes + kHugePage - 1) / kHugePage * kHugePage);
      chunks_.push_back({map_chunk(size), size});
      next_ = chunks_.back().data, left_ = size;
    }
    void* p = next_;
    next_ += bytes, left_ -= bytes;
    return p;
  }

 private:
  struct Chunk {
    char* data;
    size_t size;
  };

  // `size` bytes of untouched memory aligned to 2 MiB (mapped with room to align, the rest unmapped).
  static char* map_chunk(size_t size) {
    const size_t span = size + kHugePage;
    void* mapped = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapped == MAP_FAILED) throw std::bad_alloc();
    char* const begin = static_cast<char*>(mapped);
    char* const chunk = begin + (kHugePage - reinterpret_cast<uintptr_t>(begin) % kHugePage) % kHugePage;
    if (chunk > begin) munmap(begin, chunk - begin);
    if (chunk + size < begin + span) munmap(chunk + size, begin + span - (chunk + size));
#ifdef MADV_HUGEPAGE
    madvise(chunk, size, MADV_HUGEPAGE);  // advice only: its failure leaves ordinary pages
#endif
    return chunk;
  }

  std::vector<Chunk> chunks_;
  char* next_ = nullptr;
  size_t left_ = 0;
};

// The arena of the stage being built on this thread (ArenaScope), or null.
thread_local Arena* building_arena = nullptr;

struct ArenaScope {
  explicit ArenaScope(Arena* arena) : previous(building_arena) { building_arena = arena; }
  ~ArenaScope() { building_arena = previous; }
  Arena* previous;
};

// std::vector's allocator for the stage's buffers: from the building arena, else from the heap. Each block
// starts with a header saying which (the arena's are freed with it, all at once).
template <typename T>
struct StageAllocator {
  using value_type = T;
  StageAllocator() = default;
  template <typename U>
  StageAllocator(const StageAllocator<U>&) {}

  T* allocate(size_t n) {
    const size_t bytes = kAlignment + n * sizeof(T);
    char* block = building_arena != nullptr
                      ? static_cast<char*>(building_arena->allocate(bytes))
                      : static_cast<char*>(::operator new(bytes, std::align_val_t(kAlignment)));
    block[0] = building_arena != nullptr;
    return reinterpret_cast<T*>(block + kAlignment);
  }
  void deallocate(T* p, size_t) {
    char* block = reinterpret_cast<char*>(p) - kAlignment;
    if (!block[0]) ::operator delete(block, std::align_val_t(kAlignment));
  }
  template <typename U>
  bool operator==(const StageAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const StageAllocator<U>&) const { return false; }
};

using Floats = std::vector<float, StageAllocator<float>>;

struct Tap {
  int dy, dx;
};

struct PackedConv {
  int64_t in_channels = 0;  // channels read at each input pixel
  int64_t out_blocks = 0;   // output channels / 16, rounded up
  std::vector<Tap> taps;
  Floats weight;  // [out block][tap][input channel][16]
  Floats bias;    // [out_blocks * 16]
  bool lrelu = false;
};

// weight_at(o, i, tap) for o < out (padded outputs get zeros), bias[o].
template <typename WeightAt>
PackedConv pack(int64_t out, int64_t in, std::vector<Tap> taps, const WeightAt& weight_at,
                const std::vector<float>& bias, bool lrelu) {
  PackedConv c;
  c.in_channels = in;
  c.out_blocks = round_up(out, kLanes) / kLanes;
  c.taps = std::move(taps);
  c.lrelu = lrelu;
  const int64_t ntaps = static_cast<int64_t>(c.taps.size());
  c.weight.assign(c.out_blocks * ntaps * in * kLanes, 0.f);
  c.bias.assign(c.out_blocks * kLanes, 0.f);
  for (int64_t o = 0; o < out; ++o) {
    c.bias[o] = bias[o];
    for (int64_t t = 0; t < ntaps; ++t)
      for (int64_t i = 0; i < in; ++i)
        c.weight[((o / kLanes * ntaps + t) * in + i) * kLanes + o % kLanes] = weight_at(o, i, t);
  }
  return c;
}

// A channels-last map: pixel (y, x) at data + y * row + x * pixel.
struct MapView {
  float* data;
  int64_t pixel, row;
};

constexpr int kMaxAlso = 3;

// One convolution over an output grid: output (y, x) reads the window whose origin is in(y, x).
struct ConvJob {
  const PackedConv* conv;
  MapView in, out;
  int64_t height, width;
  MapView also[kMaxAlso] = {};  // where set, each output goes there too
  bool accumulate = false;      // the sums (without the bias) are added to the outputs' values
  int chained = 0;              // the next `chained` jobs (same grid and output blocks) run item by item with
                                // this one, in order: their items may read what this one's item wrote

  int outputs() const {
    int n = 1;
    while (n <= kMaxAlso && also[n - 1].data) ++n;
    return n;
  }
  // Output (y, x)'s 16 channels of `block` in output k (0: out, k: also[k - 1]).
  float* output(int k, int64_t y, int64_t x, int64_t block) const {
    const MapView& m = k ? also[k - 1] : out;
    return m.data + y * m.row + x * m.pixel + block * kLanes;
  }

  int64_t pixel_blocks() const { return (height * width + kPixels - 1) / kPixels; }
  int64_t items() const { return conv->out_blocks * pixel_blocks(); }
};

// A job and the `length` - 1 chained to it take their items in order of output block, each over every pixel
// (its weights stay in L2 across the pixels), or, where all their weights fit in L2, of pixel block, each over
// every output block (its inputs stay in L1). All the chain's weights, since its items run every product:
// counting the first product's alone put the 16 and 32 px pairs' chains (0.6-2.3 MB) in pixel-block order,
// and the stage in turns was slower at p50 in 7 of 8 runs, by 0.3 ms on average (a busy host).
bool pixels_outer(const ConvJob* chain, int length) {
  size_t floats = 0;
  for (int k = 0; k < length; ++k) floats += chain[k].conv->weight.size();
  return floats * sizeof(float) <= kPixelsOuterWeightBytes;
}

// ------------------------------------------------------------------ the step: P pixels x 16 outputs

void step_portable(const ConvJob& job, int64_t block, int64_t first_pixel, int P) {
  const PackedConv& c = *job.conv;
  const int64_t ntaps = static_cast<int64_t>(c.taps.size()), cin = c.in_channels;
  float acc[kPixels][kLanes];
  const float* in[kPixels];
  for (int p = 0; p < P; ++p) {
    const int64_t y = (first_pixel + p) / job.width, x = (first_pixel + p) % job.width;
    in[p] = job.in.data + y * job.in.row + x * job.in.pixel;
    for (int64_t l = 0; l < kLanes; ++l) acc[p][l] = job.accumulate ? 0.f : c.bias[block * kLanes + l];
  }
  const float* w = c.weight.data() + block * ntaps * cin * kLanes;
  for (int64_t t = 0; t < ntaps; ++t) {
    const int64_t offset = c.taps[t].dy * job.in.row + c.taps[t].dx * job.in.pixel;
    for (int64_t i = 0; i < cin; ++i, w += kLanes)
      for (int p = 0; p < P; ++p) {
        const float v = in[p][offset + i];
        for (int64_t l = 0; l < kLanes; ++l) acc[p][l] += v * w[l];
      }
  }
  const int outputs = job.outputs();
  for (int p = 0; p < P; ++p) {
    const int64_t y = (first_pixel + p) / job.width, x = (first_pixel + p) % job.width;
    for (int k = 0; k < outputs; ++k) {
      float* out = job.output(k, y, x, block);
      for (int64_t l = 0; l < kLanes; ++l)
        out[l] = job.accumulate ? out[l] + acc[p][l] : c.lrelu && acc[p][l] < 0.f ? acc[p][l] * kSlope : acc[p][l];
    }
  }
}

#ifdef PYBILAYER_X86_AVX2
PYBILAYER_AVX2 inline __m256 lrelu_avx2(__m256 v) {
  return _mm256_blendv_ps(v, _mm256_mul_ps(v, _mm256_set1_ps(kSlope)), _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ));
}

// One pixel's sums into one output: stored, or added to its values.
template <bool Accumulate>
PYBILAYER_AVX2 inline void store_avx2(float* out, __m256 lo, __m256 hi) {
  _mm256_storeu_ps(out, Accumulate ? _mm256_add_ps(_mm256_loadu_ps(out), lo) : lo);
  _mm256_storeu_ps(out + 8, Accumulate ? _mm256_add_ps(_mm256_loadu_ps(out + 8), hi) : hi);
}

// One pixel's input channel times 16 weights, into its two accumulators.
PYBILAYER_AVX2 inline void accumulate_avx2(const float* input, __m256 w_lo, __m256 w_hi, __m256& lo, __m256& hi) {
  const __m256 v = _mm256_broadcast_ss(input);
  lo = _mm256_fmadd_ps(v, w_lo, lo);
  hi = _mm256_fmadd_ps(v, w_hi, hi);
}

// A step's P pixels from output (y, x) on, along the rows of the job's grid, addressed alike in every map from
// the first one's (y, x): pixel p lies rows[p] rows lower, at first + p * pixel + rows[p] * (row - width *
// pixel). Against tables of each pixel's input and output pointers, and inlined into the switch below: a step
// at 64 input channels (data in L1) ~8% more multiply-adds per tick; the stage alone in turns 0.5-0.7 ms
// faster at p50 (4 runs), within frames 0.13-0.49 ms (block medians, 4 runs).
template <int P>
struct StepPixels {
  int64_t y, x, width, rows[P];
  PYBILAYER_INLINE StepPixels(int64_t y0, int64_t x0, int64_t grid_width) : y(y0), x(x0), width(grid_width) {
    for (int64_t p = 0, row = 0, column = x; p < P; ++p) {
      rows[p] = row;
      if (++column == width) column = 0, ++row;
    }
  }
  PYBILAYER_INLINE float* at(const MapView& m, int64_t p) const {
    return m.data + y * m.row + (x + p) * m.pixel + rows[p] * (m.row - width * m.pixel);
  }
};

// Named accumulators, not arrays: GCC keeps arrays of vectors in memory and stores them every step.
template <int P>
PYBILAYER_AVX2 __attribute__((noinline)) void step_avx2(const ConvJob& job, int64_t block, int64_t y, int64_t x) {
  static_assert(1 <= P && P <= kPixels, "6 pixels at most");
  const PackedConv& c = *job.conv;
  const int64_t ntaps = static_cast<int64_t>(c.taps.size()), cin = c.in_channels;
  const StepPixels<P> pixels(y, x, job.width);
  const __m256 bias_lo = job.accumulate ? _mm256_setzero_ps() : _mm256_loadu_ps(c.bias.data() + block * kLanes);
  const __m256 bias_hi = job.accumulate ? _mm256_setzero_ps() : _mm256_loadu_ps(c.bias.data() + block * kLanes + 8);
  __m256 l0 = bias_lo, h0 = bias_hi, l1 = bias_lo, h1 = bias_hi, l2 = bias_lo, h2 = bias_hi;
  __m256 l3 = bias_lo, h3 = bias_hi, l4 = bias_lo, h4 = bias_hi, l5 = bias_lo, h5 = bias_hi;
  const float* w = c.weight.data() + block * ntaps * cin * kLanes;
  for (int64_t t = 0; t < ntaps; ++t) {
    const int64_t offset = c.taps[t].dy * job.in.row + c.taps[t].dx * job.in.pixel;
    const float* s0 = pixels.at(job.in, 0) + offset;
    const float* s1 = P > 1 ? pixels.at(job.in, 1) + offset : s0;
    const float* s2 = P > 2 ? pixels.at(job.in, 2) + offset : s0;
    const float* s3 = P > 3 ? pixels.at(job.in, 3) + offset : s0;
    const float* s4 = P > 4 ? pixels.at(job.in, 4) + offset : s0;
    const float* s5 = P > 5 ? pixels.at(job.in, 5) + offset : s0;
    // Unrolled: the stage in turns 0.4-1.0 ms faster at p50 (2 threads, released size, 4 runs). The loop's own
    // instructions cost most where the sums are short (64 input channels, at 64-128 px).
#pragma GCC unroll 4
    for (int64_t i = 0; i < cin; ++i, w += kLanes) {
      const __m256 w_lo = _mm256_loadu_ps(w), w_hi = _mm256_loadu_ps(w + 8);
      accumulate_avx2(s0 + i, w_lo, w_hi, l0, h0);
      if constexpr (P > 1) accumulate_avx2(s1 + i, w_lo, w_hi, l1, h1);
      if constexpr (P > 2) accumulate_avx2(s2 + i, w_lo, w_hi, l2, h2);
      if constexpr (P > 3) accumulate_avx2(s3 + i, w_lo, w_hi, l3, h3);
      if constexpr (P > 4) accumulate_avx2(s4 + i, w_lo, w_hi, l4, h4);
      if constexpr (P > 5) accumulate_avx2(s5 + i, w_lo, w_hi, l5, h5);
    }
  }
  if (c.lrelu) {
    l0 = lrelu_avx2(l0), h0 = lrelu_avx2(h0), l1 = lrelu_avx2(l1), h1 = lrelu_avx2(h1);
    l2 = lrelu_avx2(l2), h2 = lrelu_avx2(h2), l3 = lrelu_avx2(l3), h3 = lrelu_avx2(h3);
    l4 = lrelu_avx2(l4), h4 = lrelu_avx2(h4), l5 = lrelu_avx2(l5), h5 = lrelu_avx2(h5);
  }
  const auto store = [&](auto accumulate) {
    for (int k = 0, outputs = job.outputs(); k < outputs; ++k) {
      const MapView& m = k ? job.also[k - 1] : job.out;
      const int64_t channels = block * kLanes;
      store_avx2<accumulate>(pixels.at(m, 0) + channels, l0, h0);
      if constexpr (P > 1) store_avx2<accumulate>(pixels.at(m, 1) + channels, l1, h1);
      if constexpr (P > 2) store_avx2<accumulate>(pixels.at(m, 2) + channels, l2, h2);
      if constexpr (P > 3) store_avx2<accumulate>(pixels.at(m, 3) + channels, l3, h3);
      if constexpr (P > 4) store_avx2<accumulate>(pixels.at(m, 4) + channels, l4, h4);
      if constexpr (P > 5) store_avx2<accumulate>(pixels.at(m, 5) + channels, l5, h5);
    }
  };
  if (job.accumulate)
    store(std::true_type{});
  else
    store(std::false_type{});
}

// P pixels from `first_pixel` on.
PYBILAYER_AVX2 void step_avx2(const ConvJob& job, int64_t block, int64_t first_pixel, int P) {
  const int64_t y = first_pixel / job.width, x = first_pixel % job.width;
  switch (P) {
    case 6: return step_avx2<6>(job, block, y, x);
    case 5: return step_avx2<5>(job, block, y, x);
    case 4: return step_avx2<4>(job, block, y, x);
    case 3: return step_avx2<3>(job, block, y, x);
    case 2: return step_avx2<2>(job, block, y, x);
    default: return step_avx2<1>(job, block, y, x);
  }
}

// Blocks (1 or 2) output blocks x P pixels, one 16-float accumulator each: two of step_avx2's items at once,
// each output summed in its order (the same bits). Arrays of accumulators are fine here, fully unrolled:
// GCC keeps all twelve in registers (no stack access in the inner loop, whose multiply-adds take their
// input broadcast from memory).
template <int Blocks, int P>
PYBILAYER_AVX512 __attribute__((noinline)) void step_avx512(const ConvJob& job, int64_t block, int64_t y, int64_t x) {
  constexpr int N = Blocks * P;
  static_assert(N <= 12, "12 accumulators at most");
  const PackedConv& c = *job.conv;
  const int64_t ntaps = static_cast<int64_t>(c.taps.size()), cin = c.in_channels, block_stride = ntaps * cin * kLanes;
  const StepPixels<P> pixels(y, x, job.width);
  __m512 acc[N];
#pragma GCC unroll 12
  for (int j = 0; j < N; ++j)
    acc[j] = job.accumulate ? _mm512_setzero_ps() : _mm512_loadu_ps(c.bias.data() + (block + j / P) * kLanes);
  const float* w = c.weight.data() + block * block_stride;
  for (int64_t t = 0; t < ntaps; ++t) {
    const int64_t offset = c.taps[t].dy * job.in.row + c.taps[t].dx * job.in.pixel;
    const float* s[P];
#pragma GCC unroll 12
    for (int p = 0; p < P; ++p) s[p] = pixels.at(job.in, p) + offset;
#pragma GCC unroll 2
    for (int64_t i = 0; i < cin; ++i, w += kLanes) {
      __m512 wv[Blocks];
      wv[0] = _mm512_loadu_ps(w);
      if constexpr (Blocks > 1) wv[1] = _mm512_loadu_ps(w + block_stride);
#pragma GCC unroll 12
      for (int j = 0; j < N; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(s[j % P][i]), wv[j / P], acc[j]);
    }
  }
  if (c.lrelu) {
    const __m512 slope = _mm512_set1_ps(kSlope);
#pragma GCC unroll 12
    for (int j = 0; j < N; ++j)
      acc[j] = _mm512_mask_mul_ps(acc[j], _mm512_cmp_ps_mask(acc[j], _mm512_setzero_ps(), _CMP_LT_OQ), acc[j], slope);
  }
  for (int k = 0, outputs = job.outputs(); k < outputs; ++k) {
    const MapView& m = k ? job.also[k - 1] : job.out;
#pragma GCC unroll 12
    for (int j = 0; j < N; ++j) {
      float* out = pixels.at(m, j % P) + (block + j / P) * kLanes;
      _mm512_storeu_ps(out, job.accumulate ? _mm512_add_ps(_mm512_loadu_ps(out), acc[j]) : acc[j]);
    }
  }
}

// P pixels from `first_pixel` on, of output blocks [block, block + blocks): 1 (P <= 12) or 2 (P <= 6).
PYBILAYER_AVX512 void step_avx512(const ConvJob& job, int64_t block, int blocks, int64_t first_pixel, int P) {
  const int64_t y = first_pixel / job.width, x = first_pixel % job.width;
  if (blocks == 2) {
    switch (P) {
      case 6: return step_avx512<2, 6>(job, block, y, x);
      case 5: return step_avx512<2, 5>(job, block, y, x);
      case 4: return step_avx512<2, 4>(job, block, y, x);
      case 3: return step_avx512<2, 3>(job, block, y, x);
      case 2: return step_avx512<2, 2>(job, block, y, x);
      default: return step_avx512<2, 1>(job, block, y, x);
    }
  }
  switch (P) {
    case 12: return step_avx512<1, 12>(job, block, y, x);
    case 11: return step_avx512<1, 11>(job, block, y, x);
    case 10: return step_avx512<1, 10>(job, block, y, x);
    case 9: return step_avx512<1, 9>(job, block, y, x);
    case 8: return step_avx512<1, 8>(job, block, y, x);
    case 7: return step_avx512<1, 7>(job, block, y, x);
    case 6: return step_avx512<1, 6>(job, block, y, x);
    case 5: return step_avx512<1, 5>(job, block, y, x);
    case 4: return step_avx512<1, 4>(job, block, y, x);
    case 3: return step_avx512<1, 3>(job, block, y, x);
    case 2: return step_avx512<1, 2>(job, block, y, x);
    default: return step_avx512<1, 1>(job, block, y, x);
  }
}
#endif

// The jobs' items as one list: a job and those chained to it count as one job, whose item runs theirs.
template <typename Fn>
void for_each_job(const std::vector<ConvJob>& jobs, const Fn& fn) {
  for (size_t j = 0; j < jobs.size(); j += jobs[j].chained + 1) fn(&jobs[j], jobs[j].chained + 1, jobs[j].items());
}

// Items [begin, end) of the jobs taken as one list (job by job, each chain in its order: pixels_outer).
void run_items(const std::vector<ConvJob>& jobs, int64_t begin, int64_t end, Isa isa) {
  int64_t base = 0;
  for_each_job(jobs, [&](const ConvJob* chain, int length, int64_t n) {
    const ConvJob& job = chain[0];
    const int64_t pixel_blocks = job.pixel_blocks(), pixels = job.height * job.width, blocks = job.conv->out_blocks;
    const bool outer = pixels_outer(chain, length);
    for (int64_t item = std::max(begin, base), stop = std::min(end, base + n); item < stop; ++item) {
      const int64_t i = item - base;
      const int64_t block = outer ? i % blocks : i / pixel_blocks, first = (outer ? i / blocks : i % pixel_blocks) * kPixels;
      const int P = static_cast<int>(std::min<int64_t>(kPixels, pixels - first));
#ifdef PYBILAYER_X86_AVX2
      if (isa == Isa::kAvx512) {
        // With the next item where it is this pixel block's next output block (outer) or this output block's
        // next pixel block: 12 sums a step, as on the AVX2 path.
        const bool pair = item + 1 < stop && (outer ? block + 1 < blocks : first + kPixels < pixels);
        const int pixels_now = pair && !outer ? static_cast<int>(std::min<int64_t>(2 * kPixels, pixels - first)) : P;
        for (int k = 0; k < length; ++k) step_avx512(chain[k], block, pair && outer ? 2 : 1, first, pixels_now);
        item += pair;
        continue;
      }
      if (isa == Isa::kAvx2) {
        for (int k = 0; k < length; ++k) step_avx2(chain[k], block, first, P);
        continue;
      }
#endif
      for (int k = 0; k < length; ++k) step_portable(chain[k], block, first, P);
    }
    base += n;
  });
  (void)isa;
}

int64_t count_items(const std::vector<ConvJob>& jobs) {
  int64_t items = 0;
  for_each_job(jobs, [&](const ConvJob*, int, int64_t n) { items += n; });
  return items;
}

// ------------------------------------------------------------------ activation and box sum

// out = b - a, `channels` values.
void differences(const float* a, const float* b, int64_t channels, float* out) {
  for (int64_t c = 0; c < channels; ++c) out[c] = b[c] - a[c];
}

struct Activation {
  std::vector<float> scale, shift, slope;  // padded channels: scale 0, shift 0 (they stay 0)
};

// x (`channels` values, a multiple of 16) -> t = prelu(x * scale + shift, slope) (where t is given) and a
// copy of x.
void activate(const Activation& a, const float* x, int64_t channels, float* t, float* x_copy) {
  for (int64_t c = 0; c < channels; ++c) {
    const float v = x[c] * a.scale[c] + a.shift[c];
    if (t) t[c] = v < 0.f ? v * a.slope[c] : v;
    x_copy[c] = x[c];
  }
}

// The four values of the 2x2 box of output (y, x): V[m][n] for m in {y+1, y+2}, n in {x+1, x+2}, where
// V[m][n] = group (m % 2, n % 2) at grid (m / 2, n / 2) of `v`, the groups map (4C' per pixel).
void box_sources(const float* v, int64_t grid, int64_t channels, int64_t y, int64_t x, const float* at[4]) {
  int k = 0;
  for (int64_t m = y + 1; m <= y + 2; ++m)
    for (int64_t n = x + 1; n <= x + 2; ++n)
      at[k++] = v + ((m / 2) * grid + n / 2) * 4 * channels + ((m % 2) * 2 + n % 2) * channels;
}

void box(const float* const at[4], int64_t channels, float* out) {
  for (int64_t c = 0; c < channels; ++c) out[c] = (at[0][c] + at[1][c]) + (at[2][c] + at[3][c]);
}

#ifdef PYBILAYER_X86_AVX2
// Between whole-map passes the copy of x goes around the caches (Stream: streaming stores; x_copy is 32-byte
// aligned: every map's pixels and channel groups are multiples of 16 floats from a 64-byte boundary). The
// block reads it twice, a pass or more later (conv1's input transform, then the 1x1 group with the skip), and
// an ordinary store would first read each line it fills. The stage alone in turns (2 threads, 300 calls
// each, 8 runs): p50 0.12-0.41 ms faster, 0.22 on average (the box passes 0.04-0.13 ms each at their
// minimum); in frames (block medians, 8 runs) +0.12 to -0.40 ms, -0.13 on average. The barrier orders these
// stores before the next pass (SpinBarrier::wait). In the sweep the next rows read them at once: ordinary
// stores.
template <bool Stream>
PYBILAYER_AVX2 void activate_avx2(const Activation& a, const float* x, int64_t channels, float* t, float* x_copy) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t c = 0; c < channels; c += 8) {
    const __m256 xv = _mm256_loadu_ps(x + c);
    const __m256 v = _mm256_add_ps(_mm256_mul_ps(xv, _mm256_loadu_ps(a.scale.data() + c)),
                                   _mm256_loadu_ps(a.shift.data() + c));  // not fused: as the portable path
    const __m256 negative = _mm256_cmp_ps(v, zero, _CMP_LT_OQ);
    if (t) _mm256_storeu_ps(t + c, _mm256_blendv_ps(v, _mm256_mul_ps(v, _mm256_loadu_ps(a.slope.data() + c)), negative));
    if (Stream)
      _mm256_stream_ps(x_copy + c, xv);
    else
      _mm256_storeu_ps(x_copy + c, xv);
  }
}

PYBILAYER_AVX2 void box_avx2(const float* const at[4], int64_t channels, float* out) {
  for (int64_t c = 0; c < channels; c += 8) {
    const __m256 top = _mm256_add_ps(_mm256_loadu_ps(at[0] + c), _mm256_loadu_ps(at[1] + c));
    const __m256 bottom = _mm256_add_ps(_mm256_loadu_ps(at[2] + c), _mm256_loadu_ps(at[3] + c));
    _mm256_storeu_ps(out + c, _mm256_add_ps(top, bottom));
  }
}
#endif

// `activate` on the code path chosen; Stream: the copy of x around the caches (activate_avx2).
void activate_any(const Activation& a, const float* x, int64_t channels, float* t, float* x_copy, Isa isa, bool stream) {
#ifdef PYBILAYER_X86_AVX2
  if (isa >= Isa::kAvx2) return stream ? activate_avx2<true>(a, x, channels, t, x_copy) : activate_avx2<false>(a, x, channels, t, x_copy);
#endif
  (void)isa, (void)stream;
  activate(a, x, channels, t, x_copy);
}

void box_any(const float* const at[4], int64_t channels, float* out, Isa isa) {
#ifdef PYBILAYER_X86_AVX2
  if (isa >= Isa::kAvx2) return box_avx2(at, channels, out);
#endif
  (void)isa;
  box(at, channels, out);
}

// ------------------------------------------------------------------ Winograd F(4x4, 3x3) and F(2x2, 3x3)
//
// conv1 on maps of 8 px and more: a 3x3 convolution over a t x t output tile is w^2 products per channel
// pair (against 9 t^2 direct) between transforms of the tile's w x w input window and of its products
// (winograd.h along both axes): F(4x4, 3x3), 36 products per 16 outputs, from kWinograd4MinSize; below,
// F(2x2, 3x3), 16 per 4, whose points' weights are 2.25x smaller (the 8 px block's products are bound by
// reading them). The products are w^2 independent 1x1 convolutions over the tiles, run by the step above.
// The transforms are written once over a lane type (`Lanes`: one float, or 8 channels in one AVX
// register), so both paths transform to the same bits.
constexpr int64_t kWinograd4MinSize = 16;

// Where the points' weights are small, each worker transforms, multiplies and transforms back kChunkTiles
// tiles at a time (no pass over the whole map's points, which outgrow the caches at 64-128 px); elsewhere
// the three are passes over the map, the products shared by output block (each worker reads half the
// weights). Released size, 2 cores, the whole stage in turns: chunked at 128 px only against 64-128 px,
// minimum 0.6-0.9 ms faster in three runs; at 32 px too, no faster; chunks of 24 tiles, no faster.
constexpr int64_t kChunkTiles = 2 * kPixels;
constexpr int64_t kChunkedWeightBytes = 2 * 1024 * 1024;
bool points_chunked(int64_t points, int64_t in_channels, int64_t channels) {
  return points * in_channels * channels * int64_t(sizeof(float)) <= kChunkedWeightBytes;
}

// The lanes the transforms work on: one float (Scalar), or 8 or 16 consecutive channels (Vector<8 or 16>, a
// GCC/Clang vector extension type, which the AVX2 or AVX-512 functions below compile to one register).
struct Scalar {};
template <typename L>
struct Lanes;
template <>
struct Lanes<Scalar> {
  using type = float;
  static constexpr int count = 1;
  static PYBILAYER_INLINE void load(const float* p, type& v) { v = *p; }
  static PYBILAYER_INLINE void store(float* p, const type& v) { *p = v; }
  static PYBILAYER_INLINE void store_lrelu(float* p, const type& v) { *p = v < 0.f ? v * kSlope : v; }
};
#ifdef PYBILAYER_X86_AVX2
template <int Count>
struct Vector {};
template <int Count>
struct Lanes<Vector<Count>> {
  typedef float type __attribute__((vector_size(4 * Count)));
  // Loads and stores through a 4-byte aligned alias: one unaligned move each (a memcpy became two 16-byte
  // halves through the stack, stalling every load on store forwarding).
  typedef float unaligned __attribute__((vector_size(4 * Count), aligned(4), may_alias));
  static constexpr int count = Count;
  static PYBILAYER_INLINE void load(const float* p, type& v) { v = *reinterpret_cast<const unaligned*>(p); }
  static PYBILAYER_INLINE void store(float* p, const type& v) { *reinterpret_cast<unaligned*>(p) = v; }
  static PYBILAYER_INLINE void store_lrelu(float* p, const type& v) {
    const type negative = v * kSlope;
    store(p, v < 0.f ? negative : v);
  }
};
#endif

// A block input's activation where it is computed with conv1's Winograd input transform (instead of a map
// T written by the pass before): t = prelu(x * scale + shift, slope), rounded as `activate` rounds it, and
// zero in the map's padding.
struct InputActivation {
  const float *scale, *shift, *slope;  // channel 0; the lanes' channels follow
  int64_t size;                        // the map's side: padded rows and columns 1 .. size are inside
};

// Lanes of one tile: the w x w window of block inputs x at `in` (channels-last, padded coordinates (y0, x0)),
// activated -> point k at out + k * plane.
template <typename F, typename L>
PYBILAYER_INLINE void winograd_input_tile(const float* in, int64_t pixel, int64_t row, const InputActivation& a,
                                          int64_t y0, int64_t x0, float* out, int64_t plane) {
  using T = typename Lanes<L>::type;
  constexpr int kWindow = F::kWindow;
  T scale, shift, slope;
  Lanes<L>::load(a.scale, scale), Lanes<L>::load(a.shift, shift), Lanes<L>::load(a.slope, slope);
  const auto inside = [&](int64_t padded) { return padded >= 1 && padded <= a.size; };
  const bool interior = inside(y0) && inside(x0) && inside(y0 + kWindow - 1) && inside(x0 + kWindow - 1);
  T columns[kWindow][kWindow];  // [i][x]: (B^T d)[i] of window column x
  for (int x = 0; x < kWindow; ++x) {
    T d[kWindow], r[kWindow];
    for (int y = 0; y < kWindow; ++y) {
      Lanes<L>::load(in + y * row + x * pixel, d[y]);
      const T v = d[y] * scale + shift;  // not fused (-ffp-contract=off): as `activate`
      const T negative = v * slope;
      d[y] = v < 0.f ? negative : v;
      if (!interior && !(inside(y0 + y) && inside(x0 + x))) d[y] = T{};
    }
    F::input(d, r);
    for (int i = 0; i < kWindow; ++i) columns[i][x] = r[i];
  }
  for (int i = 0; i < kWindow; ++i) {
    T r[kWindow];
    F::input(columns[i], r);
    for (int j = 0; j < kWindow; ++j) Lanes<L>::store(out + (i * kWindow + j) * plane, r[j]);
  }
}

// Lanes of one tile: products (point k at in + k * plane) -> lrelu(A^T M A + bias), the t x t outputs at `out`
// (channels-last).
template <typename F, typename L>
PYBILAYER_INLINE void winograd_output_tile(const float* in, int64_t plane, const float* bias, float* out, int64_t pixel,
                                           int64_t row) {
  using T = typename Lanes<L>::type;
  constexpr int kTile = F::kTile, kWindow = F::kWindow;
  T rows[kTile][kWindow];  // [x][i]: (m_i A)[x] of product row i
  for (int i = 0; i < kWindow; ++i) {
    T m[kWindow], r[kTile];
    for (int j = 0; j < kWindow; ++j) Lanes<L>::load(in + (i * kWindow + j) * plane, m[j]);
    F::output(m, r);
    for (int x = 0; x < kTile; ++x) rows[x][i] = r[x];
  }
  T b;
  Lanes<L>::load(bias, b);
  for (int x = 0; x < kTile; ++x) {
    T r[kTile];
    F::output(rows[x], r);
    for (int y = 0; y < kTile; ++y) Lanes<L>::store_lrelu(out + y * row + x * pixel, r[y] + b);
  }
}

// One of conv1's Winograd passes over tiles [begin, end) of a map of `tiles_per_row`^2 tiles, between the map
// and a buffer of the points of tiles from `first` on; `channels` is a multiple of 16. The input points
// go tile by tile ([tile][point][channels]: each tile's transform writes one contiguous run, not w^2 runs a
// map apart; the stage 0.3 ms faster at p50 in turns), the products point by point ([point][tile][channels]:
// tile by tile measured the same).
struct WinogradInput {
  int tile;    // 4: F(4x4, 3x3), or 2: F(2x2, 3x3)
  MapView in;  // the padded block inputs x: tile (ty, tx)'s window starts at (t ty, t tx)
  InputActivation activation;
  float* out;  // [tile - first][point][channels]
  int64_t tiles_per_row, channels, first;
};

struct WinogradOutput {
  int tile;
  const float* in;  // [point][tile - first][channels]
  const float* bias;
  MapView out;  // tile (ty, tx)'s outputs start at (t ty, t tx)
  int64_t tiles_per_row, channels, first, count;
};

template <typename F, typename L>
PYBILAYER_INLINE void winograd_input_tiles(const WinogradInput& p, int64_t begin, int64_t end) {
  constexpr int64_t kPoints = F::kWindow * F::kWindow;
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t y0 = tile / p.tiles_per_row * F::kTile, x0 = tile % p.tiles_per_row * F::kTile;
    const float* in = p.in.data + y0 * p.in.row + x0 * p.in.pixel;
    for (int64_t c = 0; c < p.channels; c += Lanes<L>::count) {
      const InputActivation a{p.activation.scale + c, p.activation.shift + c, p.activation.slope + c, p.activation.size};
      float* points = p.out + (tile - p.first) * kPoints * p.channels + c;
      winograd_input_tile<F, L>(in + c, p.in.pixel, p.in.row, a, y0, x0, points, p.channels);
    }
  }
}

template <typename F, typename L>
PYBILAYER_INLINE void winograd_output_tiles(const WinogradOutput& p, int64_t begin, int64_t end) {
  const int64_t plane = p.count * p.channels;
  for (int64_t tile = begin; tile < end; ++tile) {
    float* out = p.out.data + tile / p.tiles_per_row * F::kTile * p.out.row + tile % p.tiles_per_row * F::kTile * p.out.pixel;
    for (int64_t c = 0; c < p.channels; c += Lanes<L>::count)
      winograd_output_tile<F, L>(p.in + (tile - p.first) * p.channels + c, plane, p.bias + c, out + c, p.out.pixel,
                                 p.out.row);
  }
}

// U = G g G^T of every channel pair of a 3x3 convolution's weight (C, Cin, 3, 3), in float64: [point][o][i].
template <typename F>
std::vector<float> winograd_weights(const float* weight, int64_t c, int64_t cin) {
  constexpr int kWindow = F::kWindow;
  std::vector<float> u(kWindow * kWindow * c * cin);
  for (int64_t o = 0; o < c; ++o)
    for (int64_t i = 0; i < cin; ++i) {
      const float* g = weight + (o * cin + i) * 9;
      double rows[3][kWindow];  // G applied to each kernel column, then (below) to each row of those
      for (int kx = 0; kx < 3; ++kx) {
        const double column[3] = {g[kx], g[3 + kx], g[6 + kx]};
        F::kernel(column, rows[kx]);
      }
      for (int k = 0; k < kWindow; ++k) {
        const double row[3] = {rows[0][k], rows[1][k], rows[2][k]};
        double r[kWindow];
        F::kernel(row, r);
        for (int m = 0; m < kWindow; ++m) u[((k * kWindow + m) * c + o) * cin + i] = static_cast<float>(r[m]);
      }
    }
  return u;
}

template <typename L>
PYBILAYER_INLINE void winograd_input_lanes(const WinogradInput& p, int64_t begin, int64_t end) {
  if (p.tile == winograd::F4x3::kTile) return winograd_input_tiles<winograd::F4x3, L>(p, begin, end);
  winograd_input_tiles<winograd::F2x3, L>(p, begin, end);
}

template <typename L>
PYBILAYER_INLINE void winograd_output_lanes(const WinogradOutput& p, int64_t begin, int64_t end) {
  if (p.tile == winograd::F4x3::kTile) return winograd_output_tiles<winograd::F4x3, L>(p, begin, end);
  winograd_output_tiles<winograd::F2x3, L>(p, begin, end);
}

#ifdef PYBILAYER_X86_AVX2
PYBILAYER_AVX2 void winograd_input_avx2(const WinogradInput& p, int64_t begin, int64_t end) { winograd_input_lanes<Vector<8>>(p, begin, end); }
PYBILAYER_AVX2 void winograd_output_avx2(const WinogradOutput& p, int64_t begin, int64_t end) { winograd_output_lanes<Vector<8>>(p, begin, end); }
PYBILAYER_AVX512 void winograd_input_avx512(const WinogradInput& p, int64_t begin, int64_t end) { winograd_input_lanes<Vector<16>>(p, begin, end); }
PYBILAYER_AVX512 void winograd_output_avx512(const WinogradOutput& p, int64_t begin, int64_t end) { winograd_output_lanes<Vector<16>>(p, begin, end); }
#endif

void winograd_input(const WinogradInput& p, int64_t begin, int64_t end, Isa isa) {
#ifdef PYBILAYER_X86_AVX2
  if (isa == Isa::kAvx512) return winograd_input_avx512(p, begin, end);
  if (isa == Isa::kAvx2) return winograd_input_avx2(p, begin, end);
#endif
  (void)isa;
  winograd_input_lanes<Scalar>(p, begin, end);
}

void winograd_output(const WinogradOutput& p, int64_t begin, int64_t end, Isa isa) {
#ifdef PYBILAYER_X86_AVX2
  if (isa == Isa::kAvx512) return winograd_output_avx512(p, begin, end);
  if (isa == Isa::kAvx2) return winograd_output_avx2(p, begin, end);
#endif
  (void)isa;
  winograd_output_lanes<Scalar>(p, begin, end);
}

// ------------------------------------------------------------------ workers

// Workers wait here between passes (spin_until, parallel.h).
// Between two waits they share the pass's items through `take`.
class SpinBarrier {
 public:
  explicit SpinBarrier(int count) : count_(count) {}
  // The next items [begin, *end) of this pass, or `last` (as begin) once every item before `last` is taken:
  // 1 / divisor of those left, at least `min_chunk`, so the chunks shrink towards the end and the workers
  // finish together. Passes are delimited by wait(); one pass may go through several ranges in turn, items
  // [0, n1) then [n1, n2) (once a worker is told that none is left before n1, the next are n1's).
  int64_t take(int64_t last, int64_t divisor, int64_t min_chunk, int64_t* end) {
    int64_t begin = taken_.load(std::memory_order_relaxed);
    while (begin < last) {
      const int64_t stop = std::min(last, begin + std::max(min_chunk, (last - begin) / divisor));
      if (taken_.compare_exchange_weak(begin, stop, std::memory_order_relaxed)) {
        *end = stop;
        return begin;
      }
    }
    return last;
  }
  void wait() {
#ifdef PYBILAYER_X86_AVX2
    _mm_sfence();  // streaming stores (activate_avx2) are not ordered by the release below
#endif
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == count_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      taken_.store(0, std::memory_order_relaxed);  // the next pass's items, before anyone starts on them
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    spin_until([&] { return generation_.load(std::memory_order_acquire) != generation; });
  }

 private:
  const int count_;
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
  std::atomic<int64_t> taken_{0};
};

// fn(worker, workers, barrier) on up to `requested` workers at once (run_concurrently), the caller being
// worker 0; the barrier is made for the workers that could be started, before any of them begins.
template <typename Fn>
void run_team(int requested, const Fn& fn) {
  std::unique_ptr<SpinBarrier> barrier;
  run_concurrently(
      requested, [&](int worker, int workers) { fn(worker, workers, *barrier); },
      [&](int workers) { barrier = std::make_unique<SpinBarrier>(workers); });
}

// One worker's part in a call: its index, the team's barrier, the code path, and the ways to share a pass.
struct Team {
  int worker, workers;
  SpinBarrier& barrier;
  Isa isa;

  // fn(begin, end) on chunks of this pass's items up to `last` as the workers take them (SpinBarrier::take)
  template <typename Fn>
  void share(int64_t last, int64_t min_chunk, const Fn& fn) const {
    for (int64_t begin, end; (begin = barrier.take(last, kChunkShare * workers, min_chunk, &end)) < last;) fn(begin, end);
  }
  // fn(i) for i in [0, n), shared the same way.
  template <typename Fn>
  void each(int64_t n, const Fn& fn) const {
    share(n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) fn(i);
    });
  }
  // The jobs' items, numbered from `base` in this pass; then the barrier.
  void convolve(const std::vector<ConvJob>& jobs, int64_t base = 0) const {
    const int64_t items = count_items(jobs);
    share(base + items, std::max<int64_t>(1, items / (kMinChunksPerWorker * workers)),
          [&](int64_t begin, int64_t end) { run_items(jobs, begin - base, end - base, isa); });
    barrier.wait();
  }
};

// Units [front, back) that two workers take from either end, one at a time: one word, so both ends race
// safely. Each worker's units stay consecutive (the sweep below builds on that).
class TwoEndedRange {
 public:
  void reset(int64_t begin, int64_t end) { bounds_.store(pack(begin, end), std::memory_order_relaxed); }
  // Whether every unit is taken; then front() is where the two ends met.
  bool spent() const {
    const uint64_t bounds = bounds_.load(std::memory_order_relaxed);
    return (bounds >> 32) >= (bounds & 0xffffffffu);
  }
  int64_t front() const { return static_cast<int64_t>(bounds_.load(std::memory_order_relaxed) >> 32); }
  // The next unit from the front (or the back), or -1 once none is left.
  int64_t take(bool from_back) {
    uint64_t bounds = bounds_.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t front = static_cast<int64_t>(bounds >> 32), back = static_cast<int64_t>(bounds & 0xffffffffu);
      if (front >= back) return -1;
      if (bounds_.compare_exchange_weak(bounds, from_back ? pack(front, back - 1) : pack(front + 1, back),
                                        std::memory_order_relaxed))
        return from_back ? back - 1 : front;
    }
  }

 private:
  static uint64_t pack(int64_t front, int64_t back) { return uint64_t(front) << 32 | uint64_t(back); }
  alignas(64) std::atomic<uint64_t> bounds_{0};
};

}  // namespace

// ------------------------------------------------------------------ the stage

struct LowResStage::Impl {
  struct Block {
    int64_t size, in_channels, channels;  // s, Cin', C' (padded)
    int64_t real_channels;                // C
    Activation activation;
    PackedConv conv1, groups[4];  // conv1: direct, or (Winograd) its bias only
    // Groups by pairs of rows (oe, oo) and of columns (eo, oo), the products indexed by kind (PairKind):
    // oe[row kind], eo[column kind], oo[row kind] (row pairs alone; two column taps) or oo_both[row][column].
    bool row_pairs = false, column_pairs = false;
    PackedConv oe_pairs[3], eo_pairs[3], oo_pairs[3], oo_both[3][3];
    Floats t, hx, v;  // the maps (see the top of this file)
    // Differences of h's padded map P for the pairs: rows (s+1) x (s+2), Dy[k] = P[k+1] - P[k]; columns
    // (s+2) x (s+1), Dx[.][k] = P[.][k+1] - P[.][k]; both (s+1) x (s+1), Dxy[k][j] = Dy[k][j+1] - Dy[k][j].
    Floats rows_diff, columns_diff, both_diff;
    int winograd_tile = 0;                 // conv1 as Winograd F(t x t, 3x3), or 0: direct
    bool conv1_in_sweep = false;           // run_sweep's first pass (else conv1 runs over the whole map)
    std::vector<PackedConv> conv1_points;  // Winograd: one 1x1 convolution per point
    int64_t points() const { return (winograd_tile + 2) * (winograd_tile + 2); }
    // [tile][point][Cin'], [point][tile][C'] of the whole map; empty where each worker goes through its
    // tiles a chunk at a time (points_chunked), in its own scratch
    Floats points_in, points_out;
    bool heads_inputs = false;  // the last block with heads_inputs: conv1 and the skip alone, no groups
    PackedConv skip;
    Floats skip_map;  // s^2 x C', where C' != C
  };

  // A pass of the sweep (the top of `run_sweep`): rows [0, rows) of its output in units of `unit` rows (the
  // last may be shorter), unit k reading rows [needs(k)] of the pass before's output.
  struct RowPass {
    enum Kind { kConv1, kCopyOut, kDifferences, kGroups, kBox } kind;
    size_t block;
    int64_t rows, unit;
    int64_t input_rows;              // the pass before's rows
    bool after_differences = false;  // kGroups: the pass before is kDifferences (else kConv1)
    int64_t units() const { return (rows + unit - 1) / unit; }
    int64_t begin(int64_t k) const { return k * unit; }
    int64_t end(int64_t k) const { return std::min(rows, (k + 1) * unit); }
    // [first, last] row of the pass before's output that unit k reads (rows outside the map are its zero border)
    std::pair<int64_t, int64_t> needs(int64_t k) const {
      const int64_t r0 = begin(k), r1 = end(k);
      int64_t first = r0, last = r1 - 1;  // kCopyOut, and kGroups after the differences: the same rows
      if (kind == kConv1) first = r0 - 1, last = r1;                  // a 3x3 window: x rows r-1 .. r+1
      if (kind == kDifferences || (kind == kGroups && !after_differences)) first = r0 - 1;  // padded h rows r, r+1
      if (kind == kBox) first = (r0 + 1) / 2, last = (r1 + 1) / 2;    // box_sources
      return {std::max<int64_t>(first, 0), std::min(last, input_rows - 1)};
    }
  };

  // Part `part` of `parts` of a unit of the sweep that no worker's own rows cover (run_sweep's seam).
  struct SeamPiece {
    int64_t unit;
    int part, parts;
  };

  Arena arena;  // first: destroyed after every buffer in it
  int64_t in_features = 0, input_size = 0;
  bool heads_inputs = false;
  int64_t scratch_size = 0;                  // floats per worker, for chunked Winograd points
  std::vector<Floats> scratch;  // one per worker (its first run's, from the heap)
  std::vector<PackedConv> mlp;
  std::vector<Floats> mlp_out;  // each layer's output, padded to 16
  std::vector<Block> blocks;
  size_t first_swept = 0;        // blocks [first_swept, end) run as one sweep (LowResStageParams::sweep_min_size)
  std::vector<RowPass> sweep;    // their passes in order; the first takes its input whole
  // The sweep's shared state, reset by worker 0 before the MLP's barriers: the first pass's units, one range
  // per pair of workers; [worker][pass] the units its sweep has run; [pass] the seam's pieces taken and done.
  std::unique_ptr<TwoEndedRange[]> sweep_ranges;
  std::unique_ptr<std::atomic<int64_t>[]> sweep_progress, seam_taken, seam_finished;
  int workers_prepared = 0;  // workers they are sized for
  // The first pass's units [begin, end) of a pair of workers out of `workers`: a share for each worker.
  std::pair<int64_t, int64_t> sweep_range(int64_t pair, int64_t workers) const {
    const int64_t units = sweep.front().units();
    return {units * std::min(2 * pair, workers) / workers, units * std::min(2 * pair + 2, workers) / workers};
  }
  std::mutex mutex;

  MapView t_map(Block& b) { return {b.t.data(), b.in_channels, (b.size + 2) * b.in_channels}; }
  MapView hx_map(Block& b) {
    const int64_t pixel = b.channels + b.in_channels;
    return {b.hx.data(), pixel, (b.size + 2) * pixel};
  }
  MapView v_map(Block& b) { return {b.v.data(), 4 * b.channels, (b.size + 1) * 4 * b.channels}; }
  // conv1 writes h into HX's first C' channels at (y+1, x+1), or, with heads_inputs where C' = C, into `out`
  bool h_to_outputs(const Block& b) const { return b.heads_inputs && b.real_channels == b.channels; }
  MapView h_map(Block& b, float* out) {
    const MapView hx = hx_map(b);
    return h_to_outputs(b) ? MapView{out, b.channels, b.size * b.channels}
                           : MapView{hx.data + hx.row + hx.pixel, hx.pixel, hx.row};
  }
  // The heads inputs' skip (it reads x) for rows [r0, r1), into `skip` beside h, or its own map.
  ConvJob skip_job(Block& b, float* skip, int64_t r0, int64_t r1) {
    const MapView hx = hx_map(b);
    const int64_t s = b.size, cp = b.channels;
    float* to = h_to_outputs(b) ? skip : b.skip_map.data();
    return {&b.skip, {hx.data + (r0 + 1) * hx.row + hx.pixel + cp, hx.pixel, hx.row}, {to + r0 * s * cp, cp, s * cp}, r1 - r0, s};
  }

  std::vector<ConvJob> point_products(Block& b, float* points_in, float* points_out, int64_t count);
  void winograd_chunk(Block& b, int64_t first, int64_t count, const MapView& h_out, float* scratch, Isa isa);
  std::vector<ConvJob> conv1_jobs(Block& b, int64_t r0, int64_t r1, float* out, float* skip);
  void conv1_rows(Block& b, int64_t r0, int64_t r1, float* out, float* skip, float* scratch, Isa isa);
  void copy_out_rows(Block& b, int64_t r0, int64_t r1, float* out, float* skip);
  void difference_row(Block& b, int64_t r);
  std::vector<ConvJob> group_jobs(Block& b, int64_t m0, int64_t m1);
  void box_row(size_t j, int64_t y, float* out, float* sums, Isa isa, bool stream);
  void run_unit(const RowPass& pass, int64_t k, float* out, float* skip, float* scratch, float* sums, Isa isa);

  void conv1_pass(Block& b, float* out, float* skip, const Team& team);
  void run_one(const float* features, float* out, float* skip, const Team& team);
  std::vector<std::pair<int64_t, int64_t>> swept_units(std::pair<int64_t, int64_t> first) const;
  void run_sweep(float* out, float* skip, const Team& team);
  int seam_parts(const RowPass& pass, int workers) const;
  void run_piece(const RowPass& pass, const SeamPiece& piece, float* out, float* skip, float* scratch, float* sums,
                 Isa isa);
};

namespace {

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("LowResStage: " + what);
}

}  // namespace

LowResStage::LowResStage(const LowResStageParams& p) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  const ArenaScope arena(&m.arena);
  check(!p.mlp.empty() && !p.blocks.empty(), "needs at least one MLP layer and one block");
  check(p.input_size >= 1, "input_size must be >= 1");
  m.in_features = p.mlp.front().in_features;
  m.input_size = p.input_size;
  m.heads_inputs = p.heads_inputs;
  const int64_t s0 = p.input_size, c0 = p.blocks.front().in_channels, c0_padded = round_up(c0, kLanes);

  for (size_t l = 0; l < p.mlp.size(); ++l) {
    const DenseLayer& d = p.mlp[l];
    check(d.out_features >= 1 && d.in_features >= 1 && d.weight && d.bias, "MLP layer " + std::to_string(l) + " is empty");
    if (l) check(d.in_features == p.mlp[l - 1].out_features, "MLP layer " + std::to_string(l) + " does not fit the one before");
    const bool last = l + 1 == p.mlp.size();
    if (!last) {
      std::vector<float> bias(d.bias, d.bias + d.out_features);
      m.mlp.push_back(pack(
          d.out_features, d.in_features, {{0, 0}},
          [&](int64_t o, int64_t i, int64_t) { return d.weight[o * d.in_features + i]; }, bias, true));
    } else {
      // Output slot pix * C0' + c holds feature c * s0^2 + pix: the first block's input, channels-last.
      check(d.out_features == c0 * s0 * s0, "the last MLP layer must have C0 * s0 * s0 outputs");
      const int64_t slots = s0 * s0 * c0_padded;
      std::vector<float> bias(slots, 0.f);
      std::vector<int64_t> row(slots, -1);
      for (int64_t pix = 0; pix < s0 * s0; ++pix)
        for (int64_t c = 0; c < c0; ++c) row[pix * c0_padded + c] = c * s0 * s0 + pix, bias[pix * c0_padded + c] = d.bias[c * s0 * s0 + pix];
      m.mlp.push_back(pack(
          slots, d.in_features, {{0, 0}},
          [&](int64_t o, int64_t i, int64_t) { return row[o] < 0 ? 0.f : d.weight[row[o] * d.in_features + i]; }, bias,
          false));
    }
    m.mlp_out.emplace_back(m.mlp.back().out_blocks * kLanes, 0.f);
  }

  int64_t s = s0;
  for (size_t j = 0; j < p.blocks.size(); ++j, s *= 2) {
    const LowResBlock& in = p.blocks[j];
    const std::string name = "block " + std::to_string(j);
    const bool heads_inputs = p.heads_inputs && j + 1 == p.blocks.size();
    const bool swept = p.sweep_min_size > 0 && s >= p.sweep_min_size;
    if (!swept) m.first_swept = j + 1;
    check(in.in_channels >= 1 && in.channels >= 1, name + " has no channels");
    check(in.scale && in.shift && in.slope && in.conv1_weight && in.conv1_bias && in.skip_weight && in.skip_bias &&
              (heads_inputs || (in.conv2_weight && in.conv2_bias)), name + " misses a weight");
    if (j) check(in.in_channels == p.blocks[j - 1].channels, name + " does not fit the block before");
    Impl::Block b;
    b.size = s;
    b.in_channels = round_up(in.in_channels, kLanes);
    b.channels = round_up(in.channels, kLanes);
    b.real_channels = in.channels;
    const int64_t cin = in.in_channels, c = in.channels, cp = b.channels;
    b.activation.scale.assign(b.in_channels, 0.f);
    b.activation.shift.assign(b.in_channels, 0.f);
    b.activation.slope.assign(b.in_channels, 0.f);
    std::copy(in.scale, in.scale + cin, b.activation.scale.begin());
    std::copy(in.shift, in.shift + cin, b.activation.shift.begin());
    std::copy(in.slope, in.slope + cin, b.activation.slope.begin());

    std::vector<Tap> taps3;
    for (int dy = 0; dy < 3; ++dy)
      for (int dx = 0; dx < 3; ++dx) taps3.push_back({dy, dx});
    const std::vector<float> conv1_bias(in.conv1_bias, in.conv1_bias + c);
    if (p.winograd_min_size > 0 && s >= p.winograd_min_size)
      b.winograd_tile = s >= kWinograd4MinSize && s % 4 == 0 ? 4 : s % 2 == 0 ? 2 : 0;
    if (b.winograd_tile) {
      b.conv1 = pack(c, 0, {}, [](int64_t, int64_t, int64_t) { return 0.f; }, conv1_bias, true);
      const int64_t points = b.points();
      const std::vector<float> u = b.winograd_tile == 4 ? winograd_weights<winograd::F4x3>(in.conv1_weight, c, cin)
                                                        : winograd_weights<winograd::F2x3>(in.conv1_weight, c, cin);
      const std::vector<float> zeros(c, 0.f);
      for (int64_t k = 0; k < points; ++k)
        b.conv1_points.push_back(pack(
            c, b.in_channels, {{0, 0}},
            [&](int64_t o, int64_t i, int64_t) { return i < cin ? u[(k * c + o) * cin + i] : 0.f; }, zeros, false));
      const int64_t tiles = (s / b.winograd_tile) * (s / b.winograd_tile);
      // The sweep re-reads conv1's weights for every strip: only where they are small (the Winograd points'
      // chunks' test), or past its first block; else conv1 is a pass over the whole map before the sweep.
      b.conv1_in_sweep = swept && (m.first_swept < j || points_chunked(points, b.in_channels, cp));
      if (b.conv1_in_sweep || points_chunked(points, b.in_channels, cp)) {  // chunks of a strip's tiles
        m.scratch_size = std::max(m.scratch_size, points * kChunkTiles * (b.in_channels + cp));
      } else {
        b.points_in.assign(points * tiles * b.in_channels, 0.f);
        b.points_out.assign(points * tiles * cp, 0.f);
      }
    } else {
      b.conv1 = pack(
          c, cin, taps3, [&](int64_t o, int64_t i, int64_t t) { return in.conv1_weight[(o * cin + i) * 9 + t]; },
          conv1_bias, true);
      b.conv1_in_sweep = swept && (m.first_swept < j || b.conv1.weight.size() * sizeof(float) <= kChunkedWeightBytes);
    }

    if (!b.winograd_tile) b.t.assign((s + 2) * (s + 2) * b.in_channels, 0.f);
    b.hx.assign((s + 2) * (s + 2) * (cp + b.in_channels), 0.f);
    if (heads_inputs) {
      b.heads_inputs = true;
      b.skip = pack(
          c, b.in_channels, {{0, 0}},
          [&](int64_t o, int64_t i, int64_t) { return i < cin ? in.skip_weight[o * cin + i] : 0.f; },
          std::vector<float>(in.skip_bias, in.skip_bias + c), false);
      if (c != cp) b.skip_map.assign(s * s * cp, 0.f);
      m.blocks.push_back(std::move(b));
      continue;
    }
    // Tap groups (frame_graph.upsample_conv_taps): rows and columns pick the even taps [1] (offset 0 in the
    // padded map) or the odd ones [0, 2] (offsets 0, 1). The 1x1 group also reads x (the skip) after C'.
    const int even[] = {1}, odd[] = {0, 2};
    std::vector<float> ee_bias(c), zeros(c, 0.f);
    for (int64_t o = 0; o < c; ++o) ee_bias[o] = in.conv2_bias[o] + in.skip_bias[o];
    for (int g = 0; g < 4; ++g) {
      const int* ky = g / 2 ? odd : even;
      const int* kx = g % 2 ? odd : even;
      const int ny = g / 2 ? 2 : 1, nx = g % 2 ? 2 : 1;
      std::vector<Tap> taps;
      std::vector<int> kernel_tap;  // index into the 3x3 kernel
      for (int i = 0; i < ny; ++i)
        for (int k = 0; k < nx; ++k) taps.push_back({i, k}), kernel_tap.push_back(ky[i] * 3 + kx[k]);
      if (g == 0) {
        b.groups[0] = pack(
            c, cp + cin, taps,
            [&](int64_t o, int64_t i, int64_t) {
              if (i < c) return in.conv2_weight[(o * c + i) * 9 + 4];
              return i < cp ? 0.f : in.skip_weight[o * cin + (i - cp)];
            },
            ee_bias, false);
      } else {
        b.groups[g] = pack(
            c, c, taps, [&](int64_t o, int64_t i, int64_t t) { return in.conv2_weight[(o * c + i) * 9 + kernel_tap[t]]; },
            zeros, false);
      }
    }
    // Pairs (Winograd F(2, 2)): along an axis where a group takes the odd taps [w0, w2], with P the padded
    // map and D[k] = P[k+1] - P[k], outputs g and g+1 (g even) are
    //   V[g] = w0 P[g] + w2 P[g+1] = (w0 + w2) P[g+1] - w0 D[g],  V[g+1] = (w0 + w2) P[g+1] + w2 D[g+1]:
    // 3 products (kinds shared, first, second) per two outputs, not 4; along both axes (oo), 9 per 2 x 2.
    b.row_pairs = s >= kRowPairsMinSize;
    b.column_pairs = s >= kColumnPairsMinSize && cp >= kColumnPairsMinChannels;
    // sum over the kernel's taps of row_coefficients[ky] * column_coefficients[kx] * w[o][i][ky][kx]
    const auto combined = [&](const float* row_coefficients, const float* column_coefficients) {
      return [&in, c, row_coefficients, column_coefficients](int64_t o, int64_t i, int64_t) {
        double sum = 0;
        for (int ky = 0; ky < 3; ++ky)
          for (int kx = 0; kx < 3; ++kx)
            sum += double(row_coefficients[ky]) * column_coefficients[kx] * in.conv2_weight[(o * c + i) * 9 + ky * 3 + kx];
        return static_cast<float>(sum);
      };
    };
    for (int kind = 0; kind < 3; ++kind) {
      const float* pair = kPairCoefficients[kind];
      if (b.row_pairs) {
        b.oe_pairs[kind] = pack(c, c, {{0, 0}}, combined(pair, kEvenTap), zeros, false);
        if (!b.column_pairs) {
          const auto two_columns = [&](int64_t o, int64_t i, int64_t t) { return combined(pair, kOddTaps[t])(o, i, 0); };
          b.oo_pairs[kind] = pack(c, c, {{0, 0}, {0, 1}}, two_columns, zeros, false);
        }
      }
      if (b.column_pairs) {
        b.eo_pairs[kind] = pack(c, c, {{0, 0}}, combined(kEvenTap, pair), zeros, false);
        for (int column_kind = 0; column_kind < 3; ++column_kind)
          b.oo_both[kind][column_kind] = pack(c, c, {{0, 0}}, combined(pair, kPairCoefficients[column_kind]), zeros, false);
      }
    }
    if (b.row_pairs) b.rows_diff.assign((s + 1) * (s + 2) * cp, 0.f);
    if (b.column_pairs) {
      b.columns_diff.assign((s + 2) * (s + 1) * cp, 0.f);
      b.both_diff.assign((s + 1) * (s + 1) * cp, 0.f);
    }
    b.v.assign((s + 1) * (s + 1) * 4 * cp, 0.f);
    m.blocks.push_back(std::move(b));
  }

  // The sweep's passes: per block conv1 (by strips of Winograd tiles, or of kDirectRows), then the heads
  // inputs' copy without the padding channels, or the differences (where the groups go by pairs of rows),
  // the groups (by pairs of rows) and the box sum into the next block's input.
  constexpr int64_t kDirectRows = 4;
  for (size_t j = m.first_swept; j < m.blocks.size(); ++j) {
    const Impl::Block& b = m.blocks[j];
    const int64_t s = b.size;
    using Pass = Impl::RowPass;
    if (b.conv1_in_sweep) m.sweep.push_back({Pass::kConv1, j, s, b.winograd_tile ? b.winograd_tile : kDirectRows, s});
    if (b.heads_inputs) {
      if (!m.h_to_outputs(b)) m.sweep.push_back({Pass::kCopyOut, j, s, kDirectRows, s});
      continue;
    }
    if (b.row_pairs) m.sweep.push_back({Pass::kDifferences, j, s + 2, 2, s});
    m.sweep.push_back({Pass::kGroups, j, s + 1, 2, b.row_pairs ? s + 2 : s, b.row_pairs});
    m.sweep.push_back({Pass::kBox, j, 2 * s, 1, s + 1});
  }
}

LowResStage::~LowResStage() = default;

int64_t LowResStage::in_features() const { return impl_->in_features; }
int64_t LowResStage::out_channels() const { return impl_->blocks.back().real_channels; }
int64_t LowResStage::out_size() const { return impl_->blocks.back().size * (impl_->heads_inputs ? 1 : 2); }
bool LowResStage::heads_inputs() const { return impl_->heads_inputs; }

std::vector<ConvJob> LowResStage::Impl::point_products(Block& b, float* points_in, float* points_out, int64_t count) {
  // The products of `count` tiles' points: one 1x1 convolution per point (WinogradInput's layouts).
  std::vector<ConvJob> jobs;
  for (int64_t k = 0; k < b.points(); ++k)
    jobs.push_back({&b.conv1_points[k], {points_in + k * b.in_channels, b.points() * b.in_channels, 0},
                    {points_out + k * count * b.channels, b.channels, 0}, 1, count});
  return jobs;
}

// conv1 on tiles [first, first + count), count <= kChunkTiles, their points in the worker's scratch.
void LowResStage::Impl::winograd_chunk(Block& b, int64_t first, int64_t count, const MapView& h_out, float* scratch,
                                       Isa isa) {
  const MapView hx = hx_map(b);
  const MapView x_in{hx.data + b.channels, hx.pixel, hx.row};  // t is computed in the input transform
  const InputActivation act{b.activation.scale.data(), b.activation.shift.data(), b.activation.slope.data(), b.size};
  const int64_t per_row = b.size / b.winograd_tile;
  float* points_out = scratch + b.points() * kChunkTiles * b.in_channels;
  const std::vector<ConvJob> jobs = point_products(b, scratch, points_out, count);
  winograd_input({b.winograd_tile, x_in, act, scratch, per_row, b.in_channels, first}, first, first + count, isa);
  run_items(jobs, 0, count_items(jobs), isa);
  winograd_output({b.winograd_tile, points_out, b.conv1.bias.data(), h_out, per_row, b.channels, first, count}, first,
                  first + count, isa);
}

// The products of conv1's rows [r0, r1) where it is direct, and with heads_inputs the skip's.
std::vector<ConvJob> LowResStage::Impl::conv1_jobs(Block& b, int64_t r0, int64_t r1, float* out, float* skip) {
  std::vector<ConvJob> jobs;
  if (b.heads_inputs) jobs.push_back(skip_job(b, skip, r0, r1));
  if (!b.winograd_tile) {
    const MapView t = t_map(b), h_out = h_map(b, out);
    jobs.push_back({&b.conv1, {t.data + r0 * t.row, t.pixel, t.row}, {h_out.data + r0 * h_out.row, h_out.pixel, h_out.row},
                    r1 - r0, b.size});
  }
  return jobs;
}

// conv1's rows [r0, r1) (whole Winograd tiles), and with heads_inputs the skip's.
void LowResStage::Impl::conv1_rows(Block& b, int64_t r0, int64_t r1, float* out, float* skip, float* scratch, Isa isa) {
  if (b.winograd_tile) {
    const MapView h_out = h_map(b, out);
    const int64_t per_row = b.size / b.winograd_tile, end = r1 / b.winograd_tile * per_row;
    for (int64_t first = r0 / b.winograd_tile * per_row; first < end; first += kChunkTiles)
      winograd_chunk(b, first, std::min(kChunkTiles, end - first), h_out, scratch, isa);
  }
  const std::vector<ConvJob> jobs = conv1_jobs(b, r0, r1, out, skip);
  run_items(jobs, 0, count_items(jobs), isa);
}

// The heads inputs' rows [r0, r1) without the padding channels: h from HX, the skip from its map.
void LowResStage::Impl::copy_out_rows(Block& b, int64_t r0, int64_t r1, float* out, float* skip) {
  const MapView hx = hx_map(b);
  const int64_t s = b.size, cp = b.channels, C = b.real_channels;
  for (int64_t pixel = r0 * s; pixel < r1 * s; ++pixel) {
    const float* h_at = hx.data + (pixel / s + 1) * hx.row + (pixel % s + 1) * hx.pixel;
    std::copy(h_at, h_at + C, out + pixel * C);
    std::copy(b.skip_map.data() + pixel * cp, b.skip_map.data() + pixel * cp + C, skip + pixel * C);
  }
}

// The pairs' differences of P (Block::rows_diff etc.) at padded row r.
void LowResStage::Impl::difference_row(Block& b, int64_t r) {
  const MapView hx = hx_map(b);
  const int64_t s = b.size, cp = b.channels;
  const float* row = hx.data + r * hx.row;
  for (int64_t x = 0; x <= s && b.column_pairs; ++x)
    differences(row + x * hx.pixel, row + (x + 1) * hx.pixel, cp, b.columns_diff.data() + (r * (s + 1) + x) * cp);
  if (r > s) return;
  float* dy = b.rows_diff.data() + r * (s + 2) * cp;
  for (int64_t x = 0; x < s + 2; ++x) differences(row + x * hx.pixel, row + hx.row + x * hx.pixel, cp, dy + x * cp);
  for (int64_t x = 0; x <= s && b.column_pairs; ++x)
    differences(dy + x * cp, dy + (x + 1) * cp, cp, b.both_diff.data() + (r * (s + 1) + x) * cp);
}

// The tap groups' products for V's grid rows [m0, m1) (m0 even where the odd rows go by pairs). Output g reads
// padded rows/columns g (and g+1). The box reads V[m][n] for m, n in [1, 2s + 1] only: grid g in [1, s] of
// the even groups and [0, s] of the odd ones. Where pairs are on, a group's pairs are a chain of products (the
// first stores, the others add; ConvJob::chained), and the rows or columns after the pairs (s even) run directly.
std::vector<ConvJob> LowResStage::Impl::group_jobs(Block& b, int64_t m0, int64_t m1) {
  const int64_t s = b.size, cp = b.channels;
  const MapView hx = hx_map(b), v = v_map(b);
  const MapView rows_diff{b.rows_diff.data(), cp, (s + 2) * cp}, columns_diff{b.columns_diff.data(), cp, (s + 1) * cp};
  const MapView both_diff{b.both_diff.data(), cp, (s + 1) * cp};
  std::vector<ConvJob> groups;
  // map m from (row, column), every `row_step` rows and `column_step` columns
  const auto at = [](const MapView& m, int64_t row, int64_t column, int64_t row_step, int64_t column_step) {
    return MapView{m.data + row * m.row + column * m.pixel, column_step * m.pixel, row_step * m.row};
  };
  const auto product = [](const PackedConv& conv, MapView in, const std::vector<MapView>& outputs, int64_t height,
                          int64_t width) {
    ConvJob job{&conv, in, outputs[0], height, width};
    for (size_t k = 1; k < outputs.size(); ++k) job.also[k - 1] = outputs[k];
    return job;
  };
  // Along a paired axis, kind k reads P (shared) or D (first, second) at offset kind_offset[k] of the pair
  // and writes pair outputs kind_outputs[k].
  const int64_t kind_offset[3] = {1, 0, 1};
  const std::vector<int64_t> kind_outputs[3] = {{0, 1}, {0}, {1}};
  const int64_t row_pairs = b.row_pairs ? (s + 1) / 2 : 0, column_pairs = b.column_pairs ? (s + 1) / 2 : 0;
  for (int g = 0; g < 4; ++g) {
    const bool odd_rows = g / 2, odd_columns = g % 2;
    const int64_t oy = odd_rows ? 0 : 1, ox = odd_columns ? 0 : 1, width = s + odd_columns;
    // the group's grid rows [first, last): V's rows from oy
    const int64_t first = std::max(m0, oy) - oy, last = std::min(m1, s + 1) - oy;
    if (first >= last) continue;
    const int64_t height = last - first, y0 = oy + first;
    const MapView P = at(hx, y0, ox, 1, 1), V = at({v.data + g * cp, v.pixel, v.row}, y0, ox, 1, 1);
    const bool by_rows = odd_rows && row_pairs > 0, by_columns = odd_columns && column_pairs > 0;
    const int64_t pairs = by_rows ? std::max<int64_t>(0, std::min(last, 2 * row_pairs) - first) / 2 : 0;
    const int64_t paired_rows = 2 * pairs, paired_columns = by_columns ? 2 * column_pairs : 0;
    std::vector<ConvJob> products;
    if (by_rows && by_columns && pairs > 0) {  // oo
      for (int ry = 0; ry < 3; ++ry)
        for (int cx = 0; cx < 3; ++cx) {
          const MapView& source = ry == kShared ? (cx == kShared ? hx : columns_diff) : (cx == kShared ? rows_diff : both_diff);
          std::vector<MapView> outputs;
          for (int64_t r : kind_outputs[ry])
            for (int64_t c : kind_outputs[cx]) outputs.push_back(at(V, r, c, 2, 2));
          products.push_back(product(b.oo_both[ry][cx], at(source, y0 + kind_offset[ry], ox + kind_offset[cx], 2, 2),
                                     outputs, pairs, column_pairs));
        }
    } else if (by_rows && !by_columns && pairs > 0) {  // oe, or oo without column pairs
      for (int ry = 0; ry < 3; ++ry) {
        std::vector<MapView> outputs;
        for (int64_t r : kind_outputs[ry]) outputs.push_back(at(V, r, 0, 2, 1));
        const MapView source = at(ry == kShared ? hx : rows_diff, y0 + kind_offset[ry], ox, 2, 1);
        products.push_back(product(odd_columns ? b.oo_pairs[ry] : b.oe_pairs[ry], source, outputs, pairs, width));
      }
    } else if (by_columns && !by_rows) {  // eo
      for (int cx = 0; cx < 3; ++cx) {
        std::vector<MapView> outputs;
        for (int64_t c : kind_outputs[cx]) outputs.push_back(at(V, 0, c, 1, 2));
        const MapView source = at(cx == kShared ? hx : columns_diff, y0, ox + kind_offset[cx], 1, 2);
        products.push_back(product(b.eo_pairs[cx], source, outputs, height, column_pairs));
      }
    }
    if (products.empty()) {
      groups.push_back({&b.groups[g], P, V, height, width});
      continue;
    }
    products[0].chained = static_cast<int>(products.size()) - 1;
    for (size_t k = 1; k < products.size(); ++k) products[k].accumulate = true;
    groups.insert(groups.end(), products.begin(), products.end());
    // directly: the rows after the pairs (every column), and the columns after the pairs (the paired rows)
    if (by_rows && paired_rows < height)
      groups.push_back({&b.groups[g], at(P, paired_rows, 0, 1, 1), at(V, paired_rows, 0, 1, 1), height - paired_rows, width});
    if (by_columns && paired_columns < width)
      groups.push_back({&b.groups[g], at(P, 0, paired_columns, 1, 1), at(V, 0, paired_columns, 1, 1),
                        by_rows ? paired_rows : height, width - paired_columns});
  }
  return groups;
}

// Row y of block j's output, the box sum of its tap groups: activated into the next block's T and HX, or
// row y of `out` (NCHW, the last block; `sums` holds 2s x C' floats, else C').
void LowResStage::Impl::box_row(size_t j, int64_t y, float* out, float* sums, Isa isa, bool stream) {
  Block& b = blocks[j];
  const int64_t s = b.size, cp = b.channels;
  const bool last = j + 1 == blocks.size();
  for (int64_t xx = 0; xx < 2 * s; ++xx) {
    float* sum = last ? sums + xx * cp : sums;
    const float* at[4];
    box_sources(b.v.data(), s + 1, cp, y, xx, at);
    box_any(at, cp, sum, isa);
    if (!last) {
      Block& next = blocks[j + 1];
      MapView nt = t_map(next), nhx = hx_map(next);
      activate_any(next.activation, sum, cp, next.t.empty() ? nullptr : nt.data + (y + 1) * nt.row + (xx + 1) * nt.pixel,
                   nhx.data + (y + 1) * nhx.row + (xx + 1) * nhx.pixel + next.channels, isa, stream);
    }
  }
  if (last) {
    const int64_t size = 2 * s;
    for (int64_t c = 0; c < b.real_channels; ++c)
      for (int64_t xx = 0; xx < size; ++xx) out[(c * size + y) * size + xx] = sums[xx * cp + c];
  }
}

void LowResStage::Impl::run_unit(const RowPass& pass, int64_t k, float* out, float* skip, float* scratch, float* sums,
                                 Isa isa) {
  Block& b = blocks[pass.block];
  const int64_t r0 = pass.begin(k), r1 = pass.end(k);
  switch (pass.kind) {
    case RowPass::kConv1: return conv1_rows(b, r0, r1, out, skip, scratch, isa);
    case RowPass::kCopyOut: return copy_out_rows(b, r0, r1, out, skip);
    case RowPass::kDifferences:
      for (int64_t r = r0; r < r1; ++r) difference_row(b, r);
      return;
    case RowPass::kGroups: {
      const std::vector<ConvJob> jobs = group_jobs(b, r0, r1);
      return run_items(jobs, 0, count_items(jobs), isa);
    }
    case RowPass::kBox:
      for (int64_t y = r0; y < r1; ++y) box_row(pass.block, y, out, sums, isa, false);
      return;
  }
}

// Units [begin, end) of each pass that a worker's sweep runs, given its units of the first pass: unit k of
// pass p is the worker's where every row it reads is (the set is consecutive: a unit's rows grow with k).
std::vector<std::pair<int64_t, int64_t>> LowResStage::Impl::swept_units(std::pair<int64_t, int64_t> first) const {
  std::vector<std::pair<int64_t, int64_t>> units{first};
  for (size_t p = 1; p < sweep.size(); ++p) {
    const std::pair<int64_t, int64_t> in = units.back();
    const RowPass& pass = sweep[p];
    if (in.first >= in.second) {
      units.push_back({0, 0});
      continue;
    }
    const int64_t rows_begin = sweep[p - 1].begin(in.first), rows_end = sweep[p - 1].end(in.second - 1);
    int64_t begin = 0, end;
    while (begin < pass.units() && pass.needs(begin).first < rows_begin) ++begin;
    for (end = begin; end < pass.units() && pass.needs(end).second < rows_end;) ++end;
    units.push_back({begin, end});
  }
  return units;
}

// The sweep: the blocks from first_swept on, depth first. Their maps (2-7 MB each at 64-128 px) outgrow the
// L2 caches (512 KB a core here), so passes over whole maps send every map through memory: written by one
// pass, read back by the next. Here each worker takes strips of the first pass's rows, a unit at a time, and
// after each runs every later pass as far as the rows it computed itself allow, so what one pass writes the
// next reads while it is still in the worker's cache. The workers of a pair take the first pass's units
// from either end of their range (TwoEndedRange), so each one's rows stay consecutive and the two meet where
// their speeds put them. Where they meet, a few units of each later pass read rows of both (the seam); once
// every range is spent, each worker knows every worker's share (swept_units) and so the seam, and takes its
// pieces as soon as their rows are done, while the other may still be finishing its own.
void LowResStage::Impl::run_sweep(float* out, float* skip, const Team& team) {
  const int passes = static_cast<int>(sweep.size()), pairs = (team.workers + 1) / 2;
  int64_t sums_size = 0;  // box_row's
  for (size_t j = first_swept; j < blocks.size(); ++j)
    sums_size = std::max(sums_size, (j + 1 == blocks.size() ? 2 * blocks[j].size : 1) * blocks[j].channels);
  std::vector<float> sums(sums_size);
  float* const own_scratch = scratch[team.worker].data();
  const auto progress = [&](int worker, int p) -> std::atomic<int64_t>& { return sweep_progress[worker * passes + p]; };
  // Each pass's units [begin, end) run so far (-1: none yet); published as a count once each unit is done.
  std::vector<std::pair<int64_t, int64_t>> done(passes, {-1, -1});
  const auto run = [&](int p, int64_t k) {
    run_unit(sweep[p], k, out, skip, own_scratch, sums.data(), team.isa);
    progress(team.worker, p).fetch_add(1, std::memory_order_release);
  };
  const bool from_back = team.worker % 2 == 1;
  // Every unit of pass p whose rows this worker has computed of pass p - 1 (the units keep consecutive).
  const auto advance = [&](int p) {
    const RowPass& pass = sweep[p];
    const RowPass& before = sweep[p - 1];
    const std::pair<int64_t, int64_t> in = done[p - 1];
    if (in.first < 0 || in.first == in.second) return;
    const int64_t in_begin = before.begin(in.first), in_end = before.end(in.second - 1);
    const auto ready = [&](int64_t k) {
      const std::pair<int64_t, int64_t> rows = pass.needs(k);
      return rows.first >= in_begin && rows.second < in_end;
    };
    std::pair<int64_t, int64_t>& d = done[p];
    const int64_t units = pass.units();
    if (d.first < 0) {  // the first unit reading only this worker's rows, on its side
      int64_t k = from_back ? units - 1 : 0;
      if (from_back)
        while (k >= 0 && pass.needs(k).second >= in_end) --k;
      else
        while (k < units && pass.needs(k).first < in_begin) ++k;
      if (k < 0 || k >= units || !ready(k)) return;
      d = from_back ? std::make_pair(k + 1, k + 1) : std::make_pair(k, k);
    }
    if (from_back)
      while (d.first > 0 && ready(d.first - 1)) run(p, --d.first);
    else
      while (d.second < units && ready(d.second)) run(p, d.second++);
  };
  for (int64_t k; (k = sweep_ranges[team.worker / 2].take(from_back)) >= 0;) {
    run(0, k);
    std::pair<int64_t, int64_t>& d = done[0];
    d = d.first < 0 ? std::make_pair(k, k + 1) : from_back ? std::make_pair(k, d.second) : std::make_pair(d.first, k + 1);
    for (int p = 1; p < passes; ++p) advance(p);
  }

  // Every worker's share of every pass, once every range is spent (their meeting points are then fixed).
  std::vector<std::vector<std::pair<int64_t, int64_t>>> shares;
  for (int pair = 0; pair < pairs; ++pair) {
    spin_until([&] { return sweep_ranges[pair].spent(); });
    const std::pair<int64_t, int64_t> range = sweep_range(pair, team.workers);
    const int64_t meeting = sweep_ranges[pair].front();
    shares.push_back(swept_units({range.first, meeting}));
    if (2 * pair + 1 < team.workers) shares.push_back(swept_units({meeting, range.second}));
  }
  // Whether units [first, last] of pass p are done: each worker's part of them (counted from its side), and
  // the seam's where they reach it.
  std::vector<std::vector<int64_t>> seam(passes);  // [pass] units no worker's sweep runs
  std::vector<std::vector<SeamPiece>> pieces(passes);
  const auto units_done = [&](int p, int64_t first, int64_t last) {
    for (int w = 0; w < team.workers; ++w) {
      const std::pair<int64_t, int64_t> share = shares[w][p];
      const int64_t begin = std::max(first, share.first), end = std::min(last + 1, share.second);
      if (begin >= end) continue;
      const int64_t needed = w % 2 == 1 ? share.second - begin : end - share.first;
      if (progress(w, p).load(std::memory_order_acquire) < needed) return false;
    }
    for (int64_t k : seam[p])
      if (first <= k && k <= last)
        return seam_finished[p].load(std::memory_order_acquire) == static_cast<int64_t>(pieces[p].size());
    return true;
  };
  for (int p = 1; p < passes; ++p) {
    const RowPass& pass = sweep[p];
    for (int64_t k = 0; k < pass.units(); ++k) {
      bool covered = false;
      for (int w = 0; w < team.workers && !covered; ++w) covered = shares[w][p].first <= k && k < shares[w][p].second;
      if (covered) continue;
      seam[p].push_back(k);
      const int parts = seam_parts(pass, team.workers);
      for (int part = 0; part < parts; ++part) pieces[p].push_back({k, part, parts});
    }
    for (int64_t i; (i = seam_taken[p].fetch_add(1, std::memory_order_relaxed)) < static_cast<int64_t>(pieces[p].size());) {
      const SeamPiece piece = pieces[p][i];
      const std::pair<int64_t, int64_t> rows = pass.needs(piece.unit);
      const RowPass& before = sweep[p - 1];
      spin_until([&] { return units_done(p - 1, rows.first / before.unit, rows.second / before.unit); });
      run_piece(pass, piece, out, skip, own_scratch, sums.data(), team.isa);
      seam_finished[p].fetch_add(1, std::memory_order_release);
    }
  }
  team.barrier.wait();
}

// A seam unit in parts the workers can share: conv1's Winograd chunks (and the skip), or a convolution's
// items, whose units take up to ~0.1 ms; one part elsewhere.
int LowResStage::Impl::seam_parts(const RowPass& pass, int workers) const {
  const Block& b = blocks[pass.block];
  if (pass.kind == RowPass::kConv1 && b.winograd_tile) {
    const int64_t tiles = pass.unit / b.winograd_tile * (b.size / b.winograd_tile);
    return static_cast<int>((tiles + kChunkTiles - 1) / kChunkTiles) + (b.heads_inputs ? 1 : 0);
  }
  return pass.kind == RowPass::kConv1 || pass.kind == RowPass::kGroups ? 2 * workers : 1;
}

void LowResStage::Impl::run_piece(const RowPass& pass, const SeamPiece& piece, float* out, float* skip, float* scratch,
                                  float* sums, Isa isa) {
  Block& b = blocks[pass.block];
  const int64_t r0 = pass.begin(piece.unit), r1 = pass.end(piece.unit);
  if (pass.kind == RowPass::kConv1 && b.winograd_tile) {
    const int64_t per_row = b.size / b.winograd_tile, first = r0 / b.winograd_tile * per_row + piece.part * kChunkTiles;
    const int64_t end = r1 / b.winograd_tile * per_row;
    if (first < end) return winograd_chunk(b, first, std::min(kChunkTiles, end - first), h_map(b, out), scratch, isa);
    const std::vector<ConvJob> jobs{skip_job(b, skip, r0, r1)};  // the last part
    return run_items(jobs, 0, count_items(jobs), isa);
  }
  if (pass.kind == RowPass::kConv1 || pass.kind == RowPass::kGroups) {
    const std::vector<ConvJob> jobs = pass.kind == RowPass::kGroups ? group_jobs(b, r0, r1) : conv1_jobs(b, r0, r1, out, skip);
    const int64_t items = count_items(jobs);
    return run_items(jobs, items * piece.part / piece.parts, items * (piece.part + 1) / piece.parts, isa);
  }
  run_unit(pass, piece.unit, out, skip, scratch, sums, isa);
}

// conv1 (and with heads_inputs the skip) as passes over the whole map, the workers sharing each.
void LowResStage::Impl::conv1_pass(Block& b, float* out, float* skip, const Team& team) {
  const int64_t s = b.size;
  const MapView h_out = h_map(b, out);
  std::vector<ConvJob> skip_jobs;  // the heads inputs' skip, run in conv1's pass
  if (b.heads_inputs) skip_jobs.push_back(skip_job(b, skip, 0, s));
  if (b.winograd_tile) {
    const int tile = b.winograd_tile;
    const int64_t per_row = s / tile, tiles = per_row * per_row;
    if (b.points_in.empty()) {  // chunks of kChunkTiles tiles, each in its worker's scratch
      const int64_t chunks = (tiles + kChunkTiles - 1) / kChunkTiles;
      team.share(chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t first = begin * kChunkTiles; first < std::min(tiles, end * kChunkTiles); first += kChunkTiles)
          winograd_chunk(b, first, std::min(kChunkTiles, tiles - first), h_out, scratch[team.worker].data(), team.isa);
      });
      team.convolve(skip_jobs, chunks);  // the skip's items follow the chunks'; also the pass's barrier
    } else {  // passes over the whole map's points
      const MapView hx = hx_map(b);
      const MapView x_in{hx.data + b.channels, hx.pixel, hx.row};  // t is computed in the input transform
      const InputActivation act{b.activation.scale.data(), b.activation.shift.data(), b.activation.slope.data(), s};
      team.share(tiles, 1, [&](int64_t begin, int64_t end) {
        winograd_input({tile, x_in, act, b.points_in.data(), per_row, b.in_channels, 0}, begin, end, team.isa);
      });
      team.barrier.wait();
      std::vector<ConvJob> jobs = point_products(b, b.points_in.data(), b.points_out.data(), tiles);
      jobs.insert(jobs.end(), skip_jobs.begin(), skip_jobs.end());
      team.convolve(jobs);
      team.share(tiles, 1, [&](int64_t begin, int64_t end) {
        winograd_output({tile, b.points_out.data(), b.conv1.bias.data(), h_out, per_row, b.channels, 0, tiles}, begin, end,
                        team.isa);
      });
      team.barrier.wait();
    }
  } else {
    std::vector<ConvJob> jobs = skip_jobs;
    jobs.push_back({&b.conv1, t_map(b), h_out, s, s});
    team.convolve(jobs);
  }
}

void LowResStage::Impl::run_one(const float* features, float* out, float* skip, const Team& team) {
  if (team.worker == 0 && !sweep.empty()) {  // the sweep's state, before the MLP's barriers
    for (int pair = 0; pair < (team.workers + 1) / 2; ++pair) {
      const std::pair<int64_t, int64_t> range = sweep_range(pair, team.workers);
      sweep_ranges[pair].reset(range.first, range.second);
    }
    for (size_t i = 0; i < team.workers * sweep.size(); ++i) sweep_progress[i].store(0, std::memory_order_relaxed);
    for (size_t p = 0; p < sweep.size(); ++p)
      seam_taken[p].store(0, std::memory_order_relaxed), seam_finished[p].store(0, std::memory_order_relaxed);
  }
  // The MLP: each layer a 1x1 convolution over one pixel.
  const float* h = features;
  for (size_t l = 0; l < mlp.size(); ++l) {
    const MapView in{const_cast<float*>(h), 0, 0}, to{mlp_out[l].data(), 0, 0};
    team.convolve({ConvJob{&mlp[l], in, to, 1, 1}});
    h = mlp_out[l].data();
  }
  {  // the first block's input x (channels-last, C0' per pixel) -> its HX (and T)
    Block& b = blocks.front();
    MapView t = t_map(b), hx = hx_map(b);
    team.each(b.size * b.size, [&](int64_t pix) {
      const int64_t y = pix / b.size + 1, x = pix % b.size + 1;
      activate_any(b.activation, h + pix * b.in_channels, b.in_channels,
                   b.t.empty() ? nullptr : t.data + y * t.row + x * t.pixel, hx.data + y * hx.row + x * hx.pixel + b.channels,
                   team.isa, true);
    });
    team.barrier.wait();
  }

  for (size_t j = 0; j < first_swept; ++j) {  // whole-map passes, the workers sharing each
    Block& b = blocks[j];
    const int64_t s = b.size;
    conv1_pass(b, out, skip, team);
    if (b.heads_inputs) {  // h and the skip, less the padding channels
      if (!h_to_outputs(b)) {
        team.each(s, [&](int64_t y) { copy_out_rows(b, y, y + 1, out, skip); });
        team.barrier.wait();
      }
      return;
    }
    if (b.row_pairs) {
      team.each(s + 2, [&](int64_t r) { difference_row(b, r); });
      team.barrier.wait();
    }
    team.convolve(group_jobs(b, 0, s + 1));
    // the box sum: the block's output x, 2s x 2s, into the next block's T and HX, or `out` (NCHW)
    std::vector<float> sums(j + 1 == blocks.size() ? 2 * s * b.channels : b.channels);
    team.each(2 * s, [&](int64_t y) { box_row(j, y, out, sums.data(), team.isa, true); });
    team.barrier.wait();
  }
  if (first_swept == blocks.size()) return;
  if (!blocks[first_swept].conv1_in_sweep) conv1_pass(blocks[first_swept], out, skip, team);
  if (!sweep.empty()) run_sweep(out, skip, team);
}

void LowResStage::run(const float* features, int64_t batch, float* out, float* skip, int num_threads, Isa isa) {
  Impl& m = *impl_;
  if (m.heads_inputs != (skip != nullptr))
    throw std::invalid_argument(m.heads_inputs ? "LowResStage: heads_inputs needs a skip output"
                                               : "LowResStage: a skip output without heads_inputs");
  std::lock_guard<std::mutex> lock(m.mutex);

  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int64_t out_values = out_channels() * out_size() * out_size();
  if (static_cast<int>(m.scratch.size()) < num_threads) m.scratch.resize(num_threads, Floats(m.scratch_size));
  if (m.workers_prepared < num_threads) {
    m.sweep_ranges = std::make_unique<TwoEndedRange[]>((num_threads + 1) / 2);
    m.sweep_progress = std::make_unique<std::atomic<int64_t>[]>(num_threads * m.sweep.size());
    m.seam_taken = std::make_unique<std::atomic<int64_t>[]>(m.sweep.size());
    m.seam_finished = std::make_unique<std::atomic<int64_t>[]>(m.sweep.size());
    m.workers_prepared = num_threads;
  }
  run_team(num_threads, [&](int worker, int workers, SpinBarrier& barrier) {
    const Team team{worker, workers, barrier, isa};
    for (int64_t i = 0; i < batch; ++i)
      m.run_one(features + i * m.in_features, out + i * out_values, skip ? skip + i * out_values : nullptr, team);
  });
}

}  // namespace pybilayer
