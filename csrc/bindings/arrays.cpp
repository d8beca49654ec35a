#include "arrays.h"

#include <pybind11/numpy.h>

#include <stdexcept>

namespace py = pybind11;

namespace pybilayer {
namespace bindings {

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

std::string ArrayView::shape_string() const { return bindings::shape_string(shape); }

std::string ArrayView::type_string() const {
  switch (type) {
    case ScalarType::kFloat16: return "float16";
    case ScalarType::kUInt8: return "uint8";
    default: return "float32";
  }
}

std::string ArrayView::residence_string() const {
  return residence == Residence::kCuda ? "on a CUDA device" : "in host memory";
}

namespace {

int64_t itemsize(ScalarType type) { return type == ScalarType::kFloat32 ? 4 : type == ScalarType::kFloat16 ? 2 : 1; }

ScalarType scalar_type(const std::string& typestr, const char* name) {
  if (typestr == "<f4") return ScalarType::kFloat32;
  if (typestr == "<f2") return ScalarType::kFloat16;
  if (typestr == "|u1") return ScalarType::kUInt8;
  throw std::invalid_argument(std::string(name) + ": unsupported dtype (array typestr '" + typestr +
                              "'); expected float32, float16 or uint8");
}

// Byte strides must be those of a C-contiguous array; extents of 1 may carry any stride.
void require_contiguous(const ArrayView& view, const std::vector<int64_t>& strides) {
  for (int64_t extent : view.shape)
    if (extent == 0) return;  // an empty array has no layout to get wrong
  int64_t expected = itemsize(view.type);
  for (size_t i = view.shape.size(); i-- > 0;) {
    if (view.shape[i] != 1 && strides[i] != expected) {
      std::string got = "(";
      for (size_t j = 0; j < strides.size(); ++j) got += (j ? ", " : "") + std::to_string(strides[j]);
      throw std::invalid_argument(view.name + ": must be C-contiguous (got byte strides " + got + ") for shape " +
                                  view.shape_string() + "); call .contiguous() / np.ascontiguousarray first");
    }
    expected *= view.shape[i];
  }
}

// numpy arrays directly: no interface dict to build and parse on every call.
ArrayView view_numpy(const py::array& array, const char* name) {
  ArrayView view;
  view.name = name;
  const py::dtype dtype = array.dtype();
  const std::string typestr = std::string(1, dtype.byteorder() == '=' ? '<' : dtype.byteorder()) + dtype.kind() +
                              std::to_string(dtype.itemsize());
  view.type = scalar_type(typestr == "<u1" ? "|u1" : typestr, name);
  std::vector<int64_t> strides;
  for (py::ssize_t i = 0; i < array.ndim(); ++i) {
    view.shape.push_back(array.shape(i));
    strides.push_back(array.strides(i));
  }
  require_contiguous(view, strides);
  view.data = const_cast<void*>(array.data());
  view.readonly = !array.writeable();
  return view;
}

}  // namespace

ArrayView view_array(py::handle obj, const char* name) {
  if (py::isinstance<py::array>(obj)) return view_numpy(py::reinterpret_borrow<py::array>(obj), name);
  ArrayView view;
  view.name = name;
  py::dict interface;
  if (py::hasattr(obj, "__cuda_array_interface__")) {
    interface = obj.attr("__cuda_array_interface__");
    view.residence = Residence::kCuda;
  } else if (py::hasattr(obj, "__array_interface__")) {
    interface = obj.attr("__array_interface__");
  } else {
    throw std::invalid_argument(std::string(name) +
                                ": expected an array (numpy, torch, or an object exposing __array_interface__ or "
                                "__cuda_array_interface__), got " + std::string(py::str(py::type::of(obj).attr("__name__"))));
  }

  view.type = scalar_type(py::str(interface["typestr"]), name);
  for (py::handle extent : py::tuple(interface["shape"])) view.shape.push_back(extent.cast<int64_t>());

  py::object data = interface["data"];
  if (!py::isinstance<py::tuple>(data))
    throw std::invalid_argument(std::string(name) + ": array interface without a (pointer, readonly) data tuple");
  view.data = reinterpret_cast<void*>(data[py::int_(0)].cast<std::uintptr_t>());
  view.readonly = data[py::int_(1)].cast<bool>();

  if (interface.contains("mask") && !interface["mask"].is_none())
    throw std::invalid_argument(std::string(name) + ": masked arrays are not supported");

  if (interface.contains("strides") && !interface["strides"].is_none()) {
    std::vector<int64_t> strides;
    for (py::handle stride : py::tuple(interface["strides"])) strides.push_back(stride.cast<int64_t>());
    require_contiguous(view, strides);
  }
  return view;
}

const float* host_floats(const ArrayView& a, const std::vector<int64_t>& shape) {
  if (a.residence != Residence::kHost)
    throw std::invalid_argument(a.name + ": must be in host memory (this kernel runs on the CPU)");
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

}  // namespace bindings
}  // namespace pybilayer
