// pybilayer._C.heads and depth_to_space_box: array views -> params -> the CPU kernels of heads.h.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "../heads/heads.h"
#include "arrays.h"
#include "register.h"

namespace py = pybind11;

namespace pybilayer {
namespace bindings {
namespace {

// A host float32 array of exactly `shape`.
const float* host_floats(const ArrayView& a, const std::vector<int64_t>& shape) {
  if (a.residence != Residence::kHost)
    throw std::invalid_argument(a.name + ": must be in host memory (the heads run on the CPU)");
  if (a.type != ScalarType::kFloat32)
    throw std::invalid_argument(a.name + ": expected float32, got " + a.type_string());
  if (a.shape != shape)
    throw std::invalid_argument(a.name + ": expected shape " + shape_string(shape) + ", got " + a.shape_string());
  return static_cast<const float*>(a.data);
}

float* writable_floats(const ArrayView& a, const std::vector<int64_t>& shape) {
  if (a.readonly) throw std::invalid_argument(a.name + ": the output array is read-only");
  return const_cast<float*>(host_floats(a, shape));
}

// The (B, 4C, s+1, s+1) tap groups, checked.
Phases read_phases(py::handle phases) {
  const ArrayView view = view_array(phases, "phases");
  const std::vector<int64_t>& shape = view.shape;
  if (shape.size() != 4 || shape[1] < 4 || shape[1] % 4 != 0 || shape[2] < 2 || shape[3] != shape[2])
    throw std::invalid_argument("phases: expected (B, 4C, s+1, s+1) with C >= 1 and s >= 1, got " +
                                view.shape_string());
  return {shape[0], shape[1] / 4, shape[2] - 1, host_floats(view, shape)};
}

void heads(py::handle phases, py::handle scale, py::handle shift, py::handle slope, py::handle weight,
           py::handle bias, py::handle delta_uv, py::handle lf, py::handle mask_logits, int num_threads,
           bool vectorized) {
  HeadsParams p;
  p.phases = read_phases(phases);
  const int64_t B = p.phases.batch, C = p.phases.channels, S = 2 * p.phases.low_size;
  p.scale = host_floats(view_array(scale, "scale"), {C});
  p.shift = host_floats(view_array(shift, "shift"), {C});
  p.slope = host_floats(view_array(slope, "slope"), {C});
  p.weight = host_floats(view_array(weight, "weight"), {kHeadChannels, C, 3, 3});
  p.bias = host_floats(view_array(bias, "bias"), {kHeadChannels});
  p.delta_uv = writable_floats(view_array(delta_uv, "delta_uv"), {B, 2, S, S});
  p.lf = writable_floats(view_array(lf, "lf"), {B, 3, S, S});
  p.mask_logits = writable_floats(view_array(mask_logits, "mask_logits"), {B, 1, S, S});

  py::gil_scoped_release release;
  heads_cpu(p, num_threads, vectorized);
}

void depth_to_space_box(py::handle phases, py::handle out, int num_threads, bool vectorized) {
  DepthToSpaceBoxParams p;
  p.phases = read_phases(phases);
  const int64_t S = 2 * p.phases.low_size;
  p.out = writable_floats(view_array(out, "out"), {p.phases.batch, p.phases.channels, S, S});

  py::gil_scoped_release release;
  depth_to_space_box_cpu(p, num_threads, vectorized);
}

}  // namespace

void register_heads(py::module_& m) {
  m.def("heads", &heads, py::arg("phases"), py::arg("scale"), py::arg("shift"), py::arg("slope"), py::arg("weight"),
        py::arg("bias"), py::arg("delta_uv"), py::arg("lf"), py::arg("mask_logits"), py::kw_only(),
        py::arg("num_threads") = 0, py::arg("vectorized") = true,
        R"pbdoc(
The per-frame network's last steps on the CPU, written into ``delta_uv``, ``lf`` and ``mask_logits``
(see pybilayer.ops.heads for the convention).

Host float32 C-contiguous arrays, read and written without a copy. ``num_threads``: 0 uses every core.
``vectorized=False`` forces the portable code path (the AVX2+FMA one is used where the CPU has it).
)pbdoc");
  m.def("depth_to_space_box", &depth_to_space_box, py::arg("phases"), py::arg("out"), py::kw_only(),
        py::arg("num_threads") = 0, py::arg("vectorized") = true,
        R"pbdoc(
The depth-to-space and 2x2 box sum that finish an up-sampling convolution computed as four tap groups,
written into ``out`` (B, C, 2s, 2s) (see pybilayer.ops.depth_to_space_box). Same array rules as ``heads``.
)pbdoc");
}

}  // namespace bindings
}  // namespace pybilayer
