// The ends of the per-frame network's up-sampling convolutions on the CPU, each computed by the graph as
// four tap groups at the low resolution (`phases`):
//   - depth_to_space_box_cpu: the depth-to-space and 2x2 box sum that finish one (a block boundary);
//   - heads_cpu: the same fused with the final norm's activation and the three heads (delta-uv,
//     low-frequency image, mask), the last steps of the network.
//
// Convention (pybilayer.ops.depth_to_space_box_reference and heads_reference compute the same in torch):
//   `phases` (B, 4C, s+1, s+1) is the last block's nearest-upsample + 3x3 convolution computed at the low
//   resolution as four tap groups (frame_graph.upsample_conv_taps: ee, eo, oe, oo in DepthToSpace DCR
//   order, with the bias and the block's skip already added). For item b, channel c and pixel (y, x) of
//   the S x S frame, S = 2s:
//     V[m][n] = phases[b, ((m % 2) * 2 + n % 2) * C + c, m / 2, n / 2]   the depth-to-space interleave
//     x       = V[y+1][x+1] + V[y+1][x+2] + V[y+2][x+1] + V[y+2][x+2]     the 2x2 box sum
//     t       = prelu(x * scale[c] + shift[c], slope[c])                   prelu(v, a) = v < 0 ? a * v : v
//     h[o]    = bias[o] + sum_{c, i, j} weight[o, c, i, j] * t[c](y + i - 1, x + j - 1), zero padded
//   delta_uv[b, 0:2] = tanh(h[0:2]), lf[b, 0:3] = tanh(h[2:5]), mask_logits[b, 0] = h[5].
// The network's outputs are float32 and this kernel works in float32 throughout; every array is
// C-contiguous. No torch types here: the bindings translate arrays into this struct.
#pragma once

#include <cstdint>

namespace pybilayer {

constexpr int kHeadChannels = 6;  // delta_uv (2) + lf (3) + mask logits (1)

// The tap groups (B, 4C, s+1, s+1) that both kernels read.
struct Phases {
  int64_t batch = 0, channels = 0, low_size = 0;  // B, C, s; the outputs are 2s x 2s
  const float* data = nullptr;
};

struct HeadsParams {
  Phases phases;
  const float* scale = nullptr;   // (C,) the final norm, where it was not folded into the weights
  const float* shift = nullptr;   // (C,)
  const float* slope = nullptr;   // (C,) negative slope of each channel's activation
  const float* weight = nullptr;  // (6, C, 3, 3) the three heads, stacked
  const float* bias = nullptr;    // (6,)

  float* delta_uv = nullptr;     // (B, 2, S, S)
  float* lf = nullptr;           // (B, 3, S, S)
  float* mask_logits = nullptr;  // (B, 1, S, S)
};

// `num_threads` <= 0 uses every core (small frames use fewer). `vectorized` = false forces the portable
// code path, which the AVX2+FMA one matches within float rounding (tests run both).
void heads_cpu(const HeadsParams& params, int num_threads, bool vectorized = true);

struct DepthToSpaceBoxParams {
  Phases phases;
  float* out = nullptr;  // (B, C, 2s, 2s): x of the convention
};

// Same arguments; the AVX2 path rounds exactly as the portable one (additions only).
void depth_to_space_box_cpu(const DepthToSpaceBoxParams& params, int num_threads, bool vectorized = true);

}  // namespace pybilayer
