// The ends of the per-frame network's up-sampling convolutions on the CPU. The graph computes a nearest 2x
// up-sampling + 3x3 convolution at the low resolution as four tap groups (`phases`); these kernels take
// those groups, or compute them row by row from the convolution's input (`UpsampleConv`), and finish:
//   - block_output_cpu: the depth-to-space and 2x2 box sum (a block's output, x below);
//   - heads_cpu: the same fused with the final norm's activation and the three heads (delta-uv,
//     low-frequency image, mask), the last steps of the network.
//
// Convention (pybilayer.ops' *_reference functions compute the same in torch):
//   `phases` (B, 4C, s+1, s+1) is the nearest-upsample + 3x3 convolution computed at the low resolution
//   as four tap groups (frame_graph.upsample_conv_taps: ee, eo, oe, oo in DepthToSpace DCR order, with
//   the bias and the block's skip already added). For item b, channel c and pixel (y, x) of the S x S
//   frame, S = 2s:
//     V[m][n] = phases[b, ((m % 2) * 2 + n % 2) * C + c, m / 2, n / 2]   the depth-to-space interleave
//     x       = V[y+1][x+1] + V[y+1][x+2] + V[y+2][x+1] + V[y+2][x+2]     the 2x2 box sum
//   which equals conv3x3(up2(input), weight, padding 1) + bias + up2(skip) for the convolution that
//   `phases` was computed from (UpsampleConv). Then
//     t       = prelu(x * scale[c] + shift[c], slope[c])                   prelu(v, a) = v < 0 ? a * v : v
//     h[o]    = bias[o] + sum_{c, i, j} weight[o, c, i, j] * t[c](y + i - 1, x + j - 1), zero padded
//   delta_uv[b, 0:2] = tanh(h[0:2]), lf[b, 0:3] = tanh(h[2:5]), mask_logits[b, 0] = h[5].
// The network's outputs are float32 and these kernels work in float32 throughout; every array is
// C-contiguous. No torch types here: the bindings translate arrays into these structs.
#pragma once

#include <cstdint>
#include <variant>

#include "../cpu_features.h"

namespace pybilayer {

constexpr int kHeadChannels = 6;  // delta_uv (2) + lf (3) + mask logits (1)

// The tap groups (B, 4C, s+1, s+1), given.
struct Phases {
  int64_t batch = 0, channels = 0, low_size = 0;  // B, C, s; the outputs are 2s x 2s
  const float* data = nullptr;
};

// The tap groups to compute: x = conv3x3(up2(input), weight, padding 1) + bias + up2(skip). The kernels
// compute each row of the groups when they need it, so the groups never reach memory (9 multiply-adds
// per low-resolution pixel, input channel and output channel, against 36 for the up-sampled convolution).
struct UpsampleConv {
  int64_t batch = 0, in_channels = 0, channels = 0, low_size = 0;  // B, Cin, C, s
  const float* input = nullptr;   // (B, Cin, s, s), or with channels_last (B, s, s, Cin)
  const float* weight = nullptr;  // (C, Cin, 3, 3)
  const float* bias = nullptr;    // (C,)
  const float* skip = nullptr;    // (B, C, s, s), or with channels_last (B, s, s, C); or null for none
  bool channels_last = false;     // the layout the native stage (lowres.h) writes: the same results
};

using TapGroups = std::variant<Phases, UpsampleConv>;

struct HeadsParams {
  TapGroups groups;
  const float* scale = nullptr;   // (C,) the final norm, where it was not folded into the weights
  const float* shift = nullptr;   // (C,)
  const float* slope = nullptr;   // (C,) negative slope of each channel's activation
  const float* weight = nullptr;  // (6, C, 3, 3) the three heads, stacked
  const float* bias = nullptr;    // (6,)

  float* delta_uv = nullptr;     // (B, 2, S, S)
  float* lf = nullptr;           // (B, 3, S, S)
  float* mask_logits = nullptr;  // (B, 1, S, S)
};

// `num_threads` <= 0 uses every core (small frames use fewer). `isa`: the code path (cpu_features.h), at most
// best_isa(); the portable one convolves directly, the others (Winograd along rows; AVX-512 gives AVX2's
// bits) match it within float rounding (tests run every path).
void heads_cpu(const HeadsParams& params, int num_threads, Isa isa);

struct BlockOutputParams {
  TapGroups groups;
  float* out = nullptr;  // (B, C, 2s, 2s): x of the convention
};

// Same arguments. From `Phases`, the vector paths round exactly as the portable one (additions only); from
// an `UpsampleConv`, their sums differ by float rounding (fused multiply-adds or not).
void block_output_cpu(const BlockOutputParams& params, int num_threads, Isa isa);

}  // namespace pybilayer
