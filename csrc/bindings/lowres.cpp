// pybilayer._C.LowResStage: arrays -> LowResStageParams -> the CPU stage of lowres.h.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../lowres/lowres.h"
#include "arrays.h"
#include "register.h"

namespace py = pybind11;

namespace pybilayer {
namespace bindings {
namespace {

const float* floats(py::handle obj, const std::string& name, const std::vector<int64_t>& shape) {
  return host_floats(view_array(obj, name.c_str()), shape);
}

// mlp: [(weight (out, in), bias (out,)), ...]; blocks: [dict of the LowResBlock fields as arrays, ...].
// The stage copies the weights, so the arrays need to live only for this call.
std::unique_ptr<LowResStage> make_stage(const py::list& mlp, const py::list& blocks, int64_t input_size,
                                        int64_t winograd_min_size, bool heads_inputs, int64_t sweep_min_size) {
  LowResStageParams p;
  p.input_size = input_size;
  p.winograd_min_size = winograd_min_size;
  p.sweep_min_size = sweep_min_size;
  p.heads_inputs = heads_inputs;
  for (size_t l = 0; l < mlp.size(); ++l) {
    const py::tuple layer = mlp[l].cast<py::tuple>();
    if (layer.size() != 2) throw std::invalid_argument("mlp: expected (weight, bias) pairs");
    const std::string name = "mlp[" + std::to_string(l) + "]";
    const ArrayView w = view_array(layer[0], (name + ".weight").c_str());
    if (w.shape.size() != 2) throw std::invalid_argument(name + ".weight: expected (out, in), got " + w.shape_string());
    DenseLayer d;
    d.out_features = w.shape[0], d.in_features = w.shape[1];
    d.weight = host_floats(w, w.shape);
    d.bias = floats(layer[1], name + ".bias", {d.out_features});
    p.mlp.push_back(d);
  }
  for (size_t j = 0; j < blocks.size(); ++j) {
    const py::dict block = blocks[j].cast<py::dict>();
    const std::string name = "blocks[" + std::to_string(j) + "].";
    const auto field = [&](const char* key) -> py::handle {
      if (!block.contains(key)) throw std::invalid_argument(name + key + ": missing");
      return block[key];
    };
    const ArrayView conv1 = view_array(field("conv1_weight"), (name + "conv1_weight").c_str());
    if (conv1.shape.size() != 4)
      throw std::invalid_argument(name + "conv1_weight: expected (C, Cin, 3, 3), got " + conv1.shape_string());
    LowResBlock b;
    b.channels = conv1.shape[0], b.in_channels = conv1.shape[1];
    const int64_t c = b.channels, cin = b.in_channels;
    b.conv1_weight = host_floats(conv1, {c, cin, 3, 3});
    b.scale = floats(field("scale"), name + "scale", {cin});
    b.shift = floats(field("shift"), name + "shift", {cin});
    b.slope = floats(field("slope"), name + "slope", {cin});
    b.conv1_bias = floats(field("conv1_bias"), name + "conv1_bias", {c});
    if (!(heads_inputs && j + 1 == blocks.size())) {  // else the heads kernel's (heads.h)
      b.conv2_weight = floats(field("conv2_weight"), name + "conv2_weight", {c, c, 3, 3});
      b.conv2_bias = floats(field("conv2_bias"), name + "conv2_bias", {c});
    }
    b.skip_weight = floats(field("skip_weight"), name + "skip_weight", {c, cin});
    b.skip_bias = floats(field("skip_bias"), name + "skip_bias", {c});
    p.blocks.push_back(b);
  }
  return std::make_unique<LowResStage>(p);
}

void run_stage(LowResStage& stage, py::handle features, py::handle out, py::handle skip, int num_threads,
               const std::string& isa) {
  const Isa path = parse_isa(isa);
  const ArrayView f = view_array(features, "features");
  if (f.shape.size() != 2 || f.shape[0] < 1)
    throw std::invalid_argument("features: expected (B, " + std::to_string(stage.in_features()) + ") with B >= 1, got " +
                                f.shape_string());
  const int64_t B = f.shape[0], S = stage.out_size();
  const float* in = host_floats(f, {B, stage.in_features()});
  const int64_t C = stage.out_channels();
  const std::vector<int64_t> shape = stage.heads_inputs() ? std::vector<int64_t>{B, S, S, C} : std::vector<int64_t>{B, C, S, S};
  float* o = writable_floats(view_array(out, "out"), shape);
  if (stage.heads_inputs() == skip.is_none())
    throw std::invalid_argument(stage.heads_inputs() ? "skip: this stage (heads_inputs) writes a skip array"
                                                     : "skip: only a heads_inputs stage writes one");
  float* k = skip.is_none() ? nullptr : writable_floats(view_array(skip, "skip"), shape);
  py::gil_scoped_release release;
  stage.run(in, B, o, k, num_threads, path);
}

}  // namespace

void register_lowres(py::module_& m) {
  py::class_<LowResStage>(m, "LowResStage", R"pbdoc(
The per-frame network's keypoint MLP and up-sampling blocks on the CPU, one avatar folded in (see
pybilayer.ops.LowResStage for the convention). Built from ``mlp`` [(weight (out, in), bias), ...],
``blocks`` [dict(scale, shift, slope, conv1_weight, conv1_bias, conv2_weight, conv2_bias, skip_weight,
skip_bias), ...] and the first block's ``input_size``; host float32 C-contiguous arrays, copied. conv1 runs as
Winograd F(4x4, 3x3) on maps of at least ``winograd_min_size`` px (a multiple of 4; <= 0: never). With
``heads_inputs`` the last block stops before its up-sampling convolution (it needs no conv2 weights). The
blocks on maps of at least ``sweep_min_size`` px (<= 0: none) run depth first over bands of rows.
)pbdoc")
      .def(py::init(&make_stage), py::arg("mlp"), py::arg("blocks"), py::arg("input_size"),
           py::arg("winograd_min_size") = 0, py::arg("heads_inputs") = false, py::arg("sweep_min_size") = 0)
      .def_property_readonly("in_features", &LowResStage::in_features)
      .def_property_readonly("out_channels", &LowResStage::out_channels)
      .def_property_readonly("out_size", &LowResStage::out_size)
      .def_property_readonly("heads_inputs", &LowResStage::heads_inputs)
      .def("run", &run_stage, py::arg("features"), py::arg("out"), py::arg("skip") = py::none(), py::kw_only(),
           py::arg("num_threads") = 0, py::arg("isa") = "best", R"pbdoc(
features (B, in_features) -> ``out`` (B, out_channels, out_size, out_size), written in full (with
``heads_inputs``: the last block's h, and its skip into ``skip``, (B, out_size, out_size, out_channels)
channels-last each). Calls on one stage are serialised. ``num_threads``: 0 uses every core;
``isa``: the code path, "best" (this CPU's widest), or one of
``pybilayer.native.capabilities().cpu_isas``; all but "portable" give the same bits.
)pbdoc");
}

}  // namespace bindings
}  // namespace pybilayer
