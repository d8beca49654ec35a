// The compositor: the per-frame hot path after the network.
//
// Convention (identical to the official bi-layer model and to the PyTorch reference
// `pybilayer.ops.composite_reference`):
//   For item b, output pixel (y, x) of an H x W frame:
//     gx = (x + 0.5) / W * 2 - 1 + delta_uv[b, 0, y, x]      channel 0 is x
//     gy = (y + 0.5) / H * 2 - 1 + delta_uv[b, 1, y, x]      channel 1 is y
//     hf = bilinear(texture[b], gx, gy)   zeros padding, align_corners=False, unnormalised with the
//                                         texture's own size: ix = (gx + 1) * Wt / 2 - 0.5
//     v  = lf[b, :, y, x] + hf             not clamped
//     if mask:  m = mask (or sigmoid(mask) when mask_is_logits);  v = v * m + bg * (1 - m)
//     out = v (float32, B x C x H x W)  or  round(clamp((v + 1) * 127.5, 0, 255)) (uint8, B x H x W x C)
//   The identity grid is in output-normalised coordinates, so the texture size may differ from H x W.
//   Coordinates and weights are fp32; fp16 inputs are widened to fp32 exactly. Rounding is to nearest even.
//
// Every array is C-contiguous. No torch types here: the bindings translate arrays into this struct.
#pragma once

#include <cstdint>

namespace pybilayer {

enum class ScalarType : int32_t { kFloat32 = 0, kFloat16 = 1, kUInt8 = 2 };

enum class OutputLayout : int32_t {
  kUInt8HWC = 0,    // B x H x W x C uint8, the displayable frame
  kFloat32CHW = 1,  // B x C x H x W float32, unclamped
};

constexpr int kMaxChannels = 4;

struct CompositeParams {
  int64_t batch = 0, channels = 0, height = 0, width = 0;  // the output frame: B, C, H, W
  int64_t texture_height = 0, texture_width = 0;

  const void* texture = nullptr;  // (C, Ht, Wt) shared, or (B, C, Ht, Wt)
  ScalarType texture_type = ScalarType::kFloat32;
  int64_t texture_batch_stride = 0;  // elements between items; 0 when one texture is shared

  const void* delta_uv = nullptr;  // (B, 2, H, W)
  ScalarType delta_uv_type = ScalarType::kFloat32;
  const void* lf = nullptr;  // (B, C, H, W)
  ScalarType lf_type = ScalarType::kFloat32;

  const void* mask = nullptr;  // (B, 1, H, W), or nullptr for no compositing
  ScalarType mask_type = ScalarType::kFloat32;
  bool mask_is_logits = false;

  const void* background = nullptr;  // (B, C, H, W); when nullptr, background_color is used
  ScalarType background_type = ScalarType::kFloat32;
  float background_color[kMaxChannels] = {-1.f, -1.f, -1.f, -1.f};

  void* out = nullptr;
  OutputLayout out_layout = OutputLayout::kUInt8HWC;
};

// The CPU twin. `num_threads` <= 0 picks the hardware concurrency; small frames use fewer threads.
void composite_cpu(const CompositeParams& params, int num_threads);

}  // namespace pybilayer
