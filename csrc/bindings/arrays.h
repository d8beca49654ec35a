// Zero-copy views of Python arrays: anything exposing __cuda_array_interface__ (torch CUDA tensors,
// CuPy, DeviceBuffer) or __array_interface__ (numpy). Errors name the argument.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../compositor/compositor.h"

namespace pybilayer {
namespace bindings {

enum class Residence { kHost, kCuda };

struct ArrayView {
  std::string name;
  void* data = nullptr;
  ScalarType type = ScalarType::kFloat32;
  std::vector<int64_t> shape;
  Residence residence = Residence::kHost;
  bool readonly = false;

  std::string shape_string() const;
  std::string type_string() const;
  std::string residence_string() const;
};

// "(2, 3)", "(5,)": a shape as Python prints it.
std::string shape_string(const std::vector<int64_t>& shape);

// Reads the array interface of `obj`; requires a C-contiguous float32, float16 or uint8 array.
ArrayView view_array(pybind11::handle obj, const char* name);

// The data of a host float32 array of exactly `shape` (for the CPU kernels); std::invalid_argument naming
// the array otherwise. writable_floats also requires a writable array.
const float* host_floats(const ArrayView& a, const std::vector<int64_t>& shape);
float* writable_floats(const ArrayView& a, const std::vector<int64_t>& shape);

}  // namespace bindings
}  // namespace pybilayer
