// pybilayer._C.composite: array views -> CompositeParams -> the CPU or CUDA twin.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../dispatch.h"
#include "arrays.h"
#include "register.h"

namespace py = pybind11;

namespace pybilayer {
namespace bindings {
namespace {

[[noreturn]] void reject(const ArrayView& a, const std::string& expected) {
  throw std::invalid_argument(a.name + ": expected " + expected + ", got shape " + a.shape_string());
}

void require_float(const ArrayView& a) {
  if (a.type == ScalarType::kUInt8) throw std::invalid_argument(a.name + ": expected float32 or float16, got uint8");
}

void require_same_memory(const ArrayView& a, const ArrayView& lf) {
  if (a.residence != lf.residence)
    throw std::invalid_argument(a.name + ": is " + a.residence_string() + " but lf is " + lf.residence_string());
}

CompositeParams make_params(const ArrayView& texture, const ArrayView& delta_uv, const ArrayView& lf,
                            const ArrayView& out, const std::optional<ArrayView>& mask,
                            const std::optional<ArrayView>& background,
                            const std::optional<std::vector<float>>& background_color, bool mask_is_logits) {
  CompositeParams p;
  if (lf.shape.size() != 4 || lf.shape[1] < 1 || lf.shape[1] > kMaxChannels)
    reject(lf, "(B, C, H, W) with 1 <= C <= 4");
  p.batch = lf.shape[0];
  p.channels = lf.shape[1];
  p.height = lf.shape[2];
  p.width = lf.shape[3];
  const int64_t B = p.batch, C = p.channels, H = p.height, W = p.width;
  constexpr int64_t kMaxExtent = int64_t{1} << 24;  // pixel indices stay exact in fp32
  if (H >= kMaxExtent || W >= kMaxExtent) reject(lf, "H and W below 2^24");
  const std::string bchw = "(" + std::to_string(B) + ", " + std::to_string(C) + ", " + std::to_string(H) + ", " +
                           std::to_string(W) + ") like lf";

  if (delta_uv.shape != std::vector<int64_t>{B, 2, H, W})
    reject(delta_uv, "(" + std::to_string(B) + ", 2, " + std::to_string(H) + ", " + std::to_string(W) + ")");

  const bool shared = texture.shape.size() == 3;
  if (!(shared || texture.shape.size() == 4) || (!shared && texture.shape[0] != B) ||
      texture.shape[shared ? 0 : 1] != C)
    reject(texture, "(C, Ht, Wt) shared by all items or (B, C, Ht, Wt) with B = " + std::to_string(B) +
                        ", C = " + std::to_string(C));
  p.texture_height = texture.shape[shared ? 1 : 2];
  p.texture_width = texture.shape[shared ? 2 : 3];
  if (p.texture_height < 1 || p.texture_width < 1 || p.texture_height >= kMaxExtent ||
      p.texture_width >= kMaxExtent || p.texture_height * p.texture_width >= (int64_t{1} << 31))
    reject(texture, "a texture with Ht, Wt >= 1 and Ht * Wt < 2^31");
  p.texture_batch_stride = shared ? 0 : C * p.texture_height * p.texture_width;

  for (const ArrayView* a : {&texture, &delta_uv, &lf}) require_float(*a);
  for (const ArrayView* a : {&texture, &delta_uv, &out}) require_same_memory(*a, lf);
  p.texture = texture.data;
  p.texture_type = texture.type;
  p.delta_uv = delta_uv.data;
  p.delta_uv_type = delta_uv.type;
  p.lf = lf.data;
  p.lf_type = lf.type;

  if (mask) {
    if (mask->shape != std::vector<int64_t>{B, 1, H, W})
      reject(*mask, "(" + std::to_string(B) + ", 1, " + std::to_string(H) + ", " + std::to_string(W) + ")");
    require_float(*mask);
    require_same_memory(*mask, lf);
    p.mask = mask->data;
    p.mask_type = mask->type;
    p.mask_is_logits = mask_is_logits;
  }
  if ((background || background_color) && !mask)
    throw std::invalid_argument("background: given without a mask; there is nothing to composite it under");
  if (background) {
    if (background->shape != lf.shape) reject(*background, bchw);
    require_float(*background);
    require_same_memory(*background, lf);
    p.background = background->data;
    p.background_type = background->type;
  }
  if (background_color) {
    if (background) throw std::invalid_argument("background: give an image or a colour, not both");
    if (static_cast<int64_t>(background_color->size()) != C)
      throw std::invalid_argument("background: a colour needs C = " + std::to_string(C) + " values, got " +
                                  std::to_string(background_color->size()));
    for (int64_t c = 0; c < C; ++c) p.background_color[c] = (*background_color)[c];
  }

  if (out.readonly) throw std::invalid_argument("out_buffer: the output array is read-only");
  if (out.type == ScalarType::kUInt8) {
    p.out_layout = OutputLayout::kUInt8HWC;
    if (out.shape != std::vector<int64_t>{B, H, W, C})
      reject(out, "(" + std::to_string(B) + ", " + std::to_string(H) + ", " + std::to_string(W) + ", " +
                      std::to_string(C) + ") uint8");
  } else if (out.type == ScalarType::kFloat32) {
    p.out_layout = OutputLayout::kFloat32CHW;
    if (out.shape != lf.shape) reject(out, bchw + " float32");
  } else {
    throw std::invalid_argument("out_buffer: expected uint8 (B, H, W, C) or float32 (B, C, H, W), got float16");
  }
  p.out = out.data;
  return p;
}

void composite(py::handle texture, py::handle delta_uv, py::handle lf, py::handle out_buffer, py::handle mask,
               py::handle background, std::optional<std::vector<float>> background_color, bool mask_is_logits,
               int num_threads, std::uintptr_t stream) {
  const ArrayView lf_view = view_array(lf, "lf");
  const std::optional<ArrayView> mask_view =
      mask.is_none() ? std::nullopt : std::optional<ArrayView>(view_array(mask, "mask"));
  const std::optional<ArrayView> background_view =
      background.is_none() ? std::nullopt : std::optional<ArrayView>(view_array(background, "background"));
  const CompositeParams params =
      make_params(view_array(texture, "texture"), view_array(delta_uv, "delta_uv"), lf_view, view_array(out_buffer, "out_buffer"),
                  mask_view, background_view, background_color, mask_is_logits);

  py::gil_scoped_release release;
  if (lf_view.residence == Residence::kCuda) {
    if (params.height > 65535 || params.batch > 65535)
      throw std::invalid_argument("lf: the CUDA twin handles H and B up to 65535");
    cuda::composite(params, stream);
  } else {
    composite_cpu(params, num_threads);
  }
}

}  // namespace

void register_compositor(py::module_& m) {
  m.def("composite", &composite, py::arg("texture"), py::arg("delta_uv"), py::arg("lf"), py::arg("out_buffer"),
        py::kw_only(), py::arg("mask") = py::none(), py::arg("background") = py::none(),
        py::arg("background_color") = py::none(), py::arg("mask_is_logits") = false, py::arg("num_threads") = 0,
        py::arg("stream") = 0,
        R"pbdoc(
Composite one batch of frames into ``out`` (see pybilayer.ops.composite for the convention).

Arrays are read through __array_interface__ (host) or __cuda_array_interface__ (CUDA), without a copy;
all must be C-contiguous and live in the same memory. ``out_buffer`` is uint8 (B, H, W, C) or float32
(B, C, H, W) and decides the output. ``background`` is a (B, C, H, W) image, ``background_color`` C floats;
either needs ``mask``. Host arrays run on ``num_threads`` threads (0: all cores); CUDA arrays run as one
launch on ``stream`` (a cudaStream_t as an int, 0 for the legacy default stream), asynchronously.
)pbdoc");
}

}  // namespace bindings
}  // namespace pybilayer
