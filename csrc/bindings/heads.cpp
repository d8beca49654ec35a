// pybilayer._C.heads, upsample_conv_heads, depth_to_space_box and upsample_conv: array views -> params ->
// the CPU kernels of heads.h.
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

// The (B, 4C, s+1, s+1) tap groups, checked.
Phases read_phases(py::handle phases) {
  const ArrayView view = view_array(phases, "phases");
  const std::vector<int64_t>& shape = view.shape;
  if (shape.size() != 4 || shape[1] < 4 || shape[1] % 4 != 0 || shape[2] < 2 || shape[3] != shape[2])
    throw std::invalid_argument("phases: expected (B, 4C, s+1, s+1) with C >= 1 and s >= 1, got " +
                                view.shape_string());
  return {shape[0], shape[1] / 4, shape[2] - 1, host_floats(view, shape)};
}

// The up-sampling convolution's input (B, Cin, s, s), weight (C, Cin, 3, 3), bias (C,) and skip (B, C, s, s)
// or None, checked; with channels_last input (B, s, s, Cin) and skip (B, s, s, C).
UpsampleConv read_upsample_conv(py::handle input, py::handle weight, py::handle bias, py::handle skip,
                                bool channels_last) {
  const ArrayView in = view_array(input, "input"), w = view_array(weight, "conv_weight");
  const int64_t channel_axis = channels_last ? 3 : 1, other_side_axis = channels_last ? 1 : 3;  // the sides: 2 and this
  if (in.shape.size() != 4 || in.shape[channel_axis] < 1 || in.shape[2] < 1 || in.shape[other_side_axis] != in.shape[2])
    throw std::invalid_argument(std::string("input: expected ") + (channels_last ? "(B, s, s, Cin)" : "(B, Cin, s, s)") +
                                " with Cin >= 1 and s >= 1, got " + in.shape_string());
  if (w.shape.size() != 4 || w.shape[0] < 1)
    throw std::invalid_argument("conv_weight: expected (C, Cin, 3, 3) with C >= 1, got " + w.shape_string());
  UpsampleConv conv;
  conv.batch = in.shape[0], conv.in_channels = in.shape[channel_axis], conv.channels = w.shape[0];
  conv.low_size = in.shape[2], conv.channels_last = channels_last;
  const int64_t B = conv.batch, C = conv.channels, s = conv.low_size;
  conv.input = host_floats(in, in.shape);
  conv.weight = host_floats(w, {C, conv.in_channels, 3, 3});
  conv.bias = host_floats(view_array(bias, "conv_bias"), {C});
  if (!skip.is_none())
    conv.skip = host_floats(view_array(skip, "skip"), channels_last ? std::vector<int64_t>{B, s, s, C} : std::vector<int64_t>{B, C, s, s});
  return conv;
}

void run_heads(HeadsParams& p, int64_t B, int64_t C, int64_t S, py::handle scale, py::handle shift, py::handle slope,
               py::handle weight, py::handle bias, py::handle delta_uv, py::handle lf, py::handle mask_logits,
               int num_threads, Isa isa) {
  p.scale = host_floats(view_array(scale, "scale"), {C});
  p.shift = host_floats(view_array(shift, "shift"), {C});
  p.slope = host_floats(view_array(slope, "slope"), {C});
  p.weight = host_floats(view_array(weight, "weight"), {kHeadChannels, C, 3, 3});
  p.bias = host_floats(view_array(bias, "bias"), {kHeadChannels});
  p.delta_uv = writable_floats(view_array(delta_uv, "delta_uv"), {B, 2, S, S});
  p.lf = writable_floats(view_array(lf, "lf"), {B, 3, S, S});
  p.mask_logits = writable_floats(view_array(mask_logits, "mask_logits"), {B, 1, S, S});

  py::gil_scoped_release release;
  heads_cpu(p, num_threads, isa);
}

void heads(py::handle phases, py::handle scale, py::handle shift, py::handle slope, py::handle weight,
           py::handle bias, py::handle delta_uv, py::handle lf, py::handle mask_logits, int num_threads,
           const std::string& isa) {
  const Isa path = parse_isa(isa);
  HeadsParams p;
  const Phases groups = read_phases(phases);
  p.groups = groups;
  run_heads(p, groups.batch, groups.channels, 2 * groups.low_size, scale, shift, slope, weight, bias, delta_uv, lf,
            mask_logits, num_threads, path);
}

void upsample_conv_heads(py::handle input, py::handle conv_weight, py::handle conv_bias, py::handle skip,
                         py::handle scale, py::handle shift, py::handle slope, py::handle weight, py::handle bias,
                         py::handle delta_uv, py::handle lf, py::handle mask_logits, bool channels_last,
                         int num_threads, const std::string& isa) {
  const Isa path = parse_isa(isa);
  HeadsParams p;
  const UpsampleConv conv = read_upsample_conv(input, conv_weight, conv_bias, skip, channels_last);
  p.groups = conv;
  run_heads(p, conv.batch, conv.channels, 2 * conv.low_size, scale, shift, slope, weight, bias, delta_uv, lf,
            mask_logits, num_threads, path);
}

void block_output(const TapGroups& groups, int64_t B, int64_t C, int64_t S, py::handle out, int num_threads,
                  Isa isa) {
  BlockOutputParams p;
  p.groups = groups;
  p.out = writable_floats(view_array(out, "out"), {B, C, S, S});

  py::gil_scoped_release release;
  block_output_cpu(p, num_threads, isa);
}

void depth_to_space_box(py::handle phases, py::handle out, int num_threads, const std::string& isa) {
  const Isa path = parse_isa(isa);
  const Phases groups = read_phases(phases);
  block_output(groups, groups.batch, groups.channels, 2 * groups.low_size, out, num_threads, path);
}

void upsample_conv(py::handle input, py::handle conv_weight, py::handle conv_bias, py::handle skip, py::handle out,
                   bool channels_last, int num_threads, const std::string& isa) {
  const Isa path = parse_isa(isa);
  const UpsampleConv conv = read_upsample_conv(input, conv_weight, conv_bias, skip, channels_last);
  block_output(conv, conv.batch, conv.channels, 2 * conv.low_size, out, num_threads, path);
}

}  // namespace

void register_heads(py::module_& m) {
  m.def("heads", &heads, py::arg("phases"), py::arg("scale"), py::arg("shift"), py::arg("slope"), py::arg("weight"),
        py::arg("bias"), py::arg("delta_uv"), py::arg("lf"), py::arg("mask_logits"), py::kw_only(),
        py::arg("num_threads") = 0, py::arg("isa") = "best",
        R"pbdoc(
The per-frame network's last steps on the CPU, written into ``delta_uv``, ``lf`` and ``mask_logits``
(see pybilayer.ops.heads for the convention).

Host float32 C-contiguous arrays, read and written without a copy. ``num_threads``: 0 uses every core.
``isa``: the code path, "best" (this CPU's widest), or one of
``pybilayer.native.capabilities().cpu_isas`` ("portable" forces the direct convolution).
)pbdoc");
  m.def("upsample_conv_heads", &upsample_conv_heads, py::arg("input"), py::arg("conv_weight"), py::arg("conv_bias"),
        py::arg("skip"), py::arg("scale"), py::arg("shift"), py::arg("slope"), py::arg("weight"), py::arg("bias"),
        py::arg("delta_uv"), py::arg("lf"), py::arg("mask_logits"), py::kw_only(), py::arg("channels_last") = false,
        py::arg("num_threads") = 0, py::arg("isa") = "best",
        R"pbdoc(
``heads`` with the tap groups computed from the last up-sampling convolution's input (B, Cin, s, s),
``conv_weight`` (C, Cin, 3, 3), ``conv_bias`` (C,) and ``skip`` (B, C, s, s) or None (see
pybilayer.ops.heads); with ``channels_last`` input (B, s, s, Cin) and skip (B, s, s, C). Same array rules
as ``heads``.
)pbdoc");
  m.def("depth_to_space_box", &depth_to_space_box, py::arg("phases"), py::arg("out"), py::kw_only(),
        py::arg("num_threads") = 0, py::arg("isa") = "best",
        R"pbdoc(
The depth-to-space and 2x2 box sum that finish an up-sampling convolution computed as four tap groups,
written into ``out`` (B, C, 2s, 2s) (see pybilayer.ops.depth_to_space_box). Same array rules as ``heads``.
)pbdoc");
  m.def("upsample_conv", &upsample_conv, py::arg("input"), py::arg("conv_weight"), py::arg("conv_bias"),
        py::arg("skip"), py::arg("out"), py::kw_only(), py::arg("channels_last") = false, py::arg("num_threads") = 0,
        py::arg("isa") = "best",
        R"pbdoc(
conv3x3(up2(input), conv_weight, padding 1) + conv_bias + up2(skip) for nearest 2x up-sampling, written
into ``out`` (B, C, 2s, 2s), computed at the low resolution as four tap groups (see
pybilayer.ops.upsample_conv). Same array rules and ``channels_last`` as ``upsample_conv_heads``; ``skip``
may be None.
)pbdoc");
}

}  // namespace bindings
}  // namespace pybilayer
