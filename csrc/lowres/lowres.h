// The per-frame network on the CPU: the keypoint MLP and the up-sampling blocks (all of them at the released
// size, up to the inputs of the native heads kernel). Graph runtimes run the first, small and wide maps
// (4-16 px, 256 channels) far below this CPU's multiply-add rate (few pixels to share between threads, a
// pass over memory per operator); here every convolution runs on channels-last maps, 12 sums of 16 output
// channels per step (AVX-512: 12 pixels, or 6 pixels of 32 channels; AVX2: 6 pixels), conv1 as Winograd F(2x2, 3x3) or F(4x4, 3x3) on larger maps, the up-sampling
// convolution's tap groups by pairs of rows and columns (Winograd F(2, 2)), and each block is a few passes
// (conv1, the pairs' differences, the tap groups, the box sum with the next activation) between which the
// workers meet at a barrier; the blocks on the largest maps run those passes depth first instead, each
// worker on bands of rows that stay in its cache (sweep_min_size).
//
// Convention (frame_graph.folded_low_res_stage folds one avatar into these weights, the graphs of
// frame_graph.build_folded_frame(native_blocks=k) continue from the output, and
// pybilayer.ops.low_res_stage_reference computes the same in torch):
//   mlp:    h = W_i h + b_i per layer, LeakyReLU(0.2) between layers (not after the last); the last layer's
//           outputs are the first block's input x, (C0, s0, s0) in NCHW order.
//   block:  t = prelu(x * scale + shift, slope)                                 per input channel
//           h = lrelu(conv3x3(t, conv1_weight, padding 1) + conv1_bias, 0.2)     C channels, s x s
//           y = conv3x3(up2(h), conv2_weight, padding 1) + conv2_bias
//               + up2(conv1x1(x, skip_weight) + skip_bias)                      C channels, 2s x 2s
//           with up2 the nearest 2x up-sampling; y is the next block's x.
//   The stage's output is the last block's y, (B, C, S, S) NCHW; or, with heads_inputs, the last block stops
//   before its up-sampling convolution and the outputs are its h and skip conv1x1(x, skip_weight) + skip_bias,
//   (B, s, s, C) channels-last each: the inputs of the native heads kernel (heads.h, UpsampleConv with
//   channels_last), which finishes it.
// The up-sampling convolution is computed at the low resolution as four tap groups and a 2x2 box sum
// (frame_graph.upsample_conv_taps); the skip joins the 1x1 group as extra input channels.
// float32 throughout; every array C-contiguous. No torch types here: the bindings translate arrays.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "../cpu_features.h"

namespace pybilayer {

struct DenseLayer {
  int64_t out_features = 0, in_features = 0;
  const float* weight = nullptr;  // (out, in)
  const float* bias = nullptr;    // (out,)
};

struct LowResBlock {
  int64_t in_channels = 0, channels = 0;  // Cin, C
  const float* scale = nullptr;           // (Cin,) the input activation
  const float* shift = nullptr;           // (Cin,)
  const float* slope = nullptr;           // (Cin,)
  const float* conv1_weight = nullptr;    // (C, Cin, 3, 3)
  const float* conv1_bias = nullptr;      // (C,)
  const float* conv2_weight = nullptr;    // (C, C, 3, 3), applied after the up-sampling (unused, may be
  const float* conv2_bias = nullptr;      // (C,)             null, in the last block with heads_inputs)
  const float* skip_weight = nullptr;     // (C, Cin)
  const float* skip_bias = nullptr;       // (C,)
};

struct LowResStageParams {
  std::vector<DenseLayer> mlp;
  std::vector<LowResBlock> blocks;
  int64_t input_size = 0;  // s0: the last MLP layer has C0 * s0 * s0 outputs, C0 = blocks[0].in_channels
  // conv1 runs as Winograd on even maps of at least this side (<= 0: never): F(4x4, 3x3) from 16 px where the
  // side is a multiple of 4, F(2x2, 3x3) below
  int64_t winograd_min_size = 0;
  // the blocks on maps of at least this side (<= 0: none) run as one depth-first sweep over bands of rows, not
  // pass by pass over whole maps (lowres_cpu.cpp, run_sweep)
  int64_t sweep_min_size = 0;
  bool heads_inputs = false;  // the last block stops before its up-sampling convolution (see the top)
};

// The weights, copied and packed once (per avatar); `run` reuses its scratch maps, so calls on one object
// are serialised (a mutex). Throws std::invalid_argument when the layers do not fit together.
class LowResStage {
 public:
  explicit LowResStage(const LowResStageParams& params);
  ~LowResStage();
  LowResStage(const LowResStage&) = delete;
  LowResStage& operator=(const LowResStage&) = delete;

  int64_t in_features() const;
  int64_t out_channels() const;
  int64_t out_size() const;
  bool heads_inputs() const;
  // features (B, in_features) -> out (B, out_channels, out_size, out_size); with heads_inputs h and the skip,
  // (B, out_size, out_size, out_channels) each (skip null otherwise). num_threads <= 0: every core.
  // isa: the code path (cpu_features.h), at most best_isa(); every path gives the same bits but the
  // portable one, whose sums round differently.
  void run(const float* features, int64_t batch, float* out, float* skip, int num_threads, Isa isa);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pybilayer
