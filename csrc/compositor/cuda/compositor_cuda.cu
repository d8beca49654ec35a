// The CUDA twin of the compositor (convention in compositor.h): one thread per output pixel, one
// launch per batch on the caller's stream. The sampling math is sampling.h, shared with the CPU twin.
#include <cuda_runtime.h>

#include <string>

#include "../../cuda/check.h"
#include "../../dispatch.h"
#include "../sampling.h"

namespace pybilayer {
namespace cuda {
namespace {

constexpr int kBlockWidth = 128;

template <typename TexT>
__global__ void __launch_bounds__(kBlockWidth) composite_kernel(const CompositeParams p) {
  const int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t y = blockIdx.y, b = blockIdx.z;
  const int64_t H = p.height, W = p.width;
  if (x >= W) return;
  const int C = static_cast<int>(p.channels);
  const int64_t pixel = y * W + x, frame = H * W;

  const float gx = identity_coordinate(x, W) + load_float(p.delta_uv, p.delta_uv_type, (b * 2 + 0) * frame + pixel);
  const float gy = identity_coordinate(y, H) + load_float(p.delta_uv, p.delta_uv_type, (b * 2 + 1) * frame + pixel);
  const BilinearTaps taps = bilinear_taps(gx, gy, static_cast<int32_t>(p.texture_width), static_cast<int32_t>(p.texture_height));
  const TexT* texture = static_cast<const TexT*>(p.texture) + b * p.texture_batch_stride;
  const int64_t texture_plane = p.texture_height * p.texture_width;

  float m = 1.f;
  if (p.mask != nullptr) {
    m = load_float(p.mask, p.mask_type, b * frame + pixel);
    if (p.mask_is_logits) m = sigmoid(m);
  }
  for (int c = 0; c < C; ++c) {
    const int64_t at = (b * C + c) * frame + pixel;
    float v = sample_plane(texture + c * texture_plane, taps) + load_float(p.lf, p.lf_type, at);
    if (p.mask != nullptr) {
      const float bg = p.background != nullptr ? load_float(p.background, p.background_type, at) : p.background_color[c];
      v = v * m + bg * (1.f - m);
    }
    if (p.out_layout == OutputLayout::kFloat32CHW)
      static_cast<float*>(p.out)[at] = v;
    else
      static_cast<uint8_t*>(p.out)[(b * frame + pixel) * C + c] = to_uint8(v);
  }
}

// The device every pointer lives on; throws std::invalid_argument naming the first one that is not
// device memory or sits on another device.
int common_device(const CompositeParams& p) {
  const std::pair<const void*, const char*> pointers[] = {
      {p.out, "out_buffer"}, {p.texture, "texture"}, {p.delta_uv, "delta_uv"}, {p.lf, "lf"},
      {p.mask, "mask"}, {p.background, "background"}};
  int device = -1;
  for (const auto& [ptr, name] : pointers) {
    if (ptr == nullptr) continue;
    cudaPointerAttributes attributes{};
    check(cudaPointerGetAttributes(&attributes, ptr), name);
    if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged)
      throw std::invalid_argument(std::string(name) + ": expected CUDA device memory, got a host pointer");
    if (device >= 0 && attributes.device != device)
      throw std::invalid_argument(std::string(name) + ": on CUDA device " + std::to_string(attributes.device) +
                                  " but out_buffer is on device " + std::to_string(device));
    device = attributes.device;
  }
  return device;
}

}  // namespace

void composite(const CompositeParams& p, std::uintptr_t stream) {
  require_device();
  if (p.batch == 0 || p.height == 0 || p.width == 0) return;
  DeviceGuard guard(common_device(p));
  const dim3 block(kBlockWidth);
  const dim3 grid(static_cast<unsigned>((p.width + kBlockWidth - 1) / kBlockWidth), static_cast<unsigned>(p.height),
                  static_cast<unsigned>(p.batch));
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (p.texture_type == ScalarType::kFloat16)
    composite_kernel<Half><<<grid, block, 0, cuda_stream>>>(p);
  else
    composite_kernel<float><<<grid, block, 0, cuda_stream>>>(p);
  check(cudaGetLastError(), "composite kernel launch");
}

}  // namespace cuda
}  // namespace pybilayer
