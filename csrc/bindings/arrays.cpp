#include "arrays.h"

#include <stdexcept>

namespace py = pybind11;

namespace pybilayer {
namespace bindings {

std::string ArrayView::shape_string() const {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

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

ArrayView view_array(py::handle obj, const char* name) {
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

  const std::string typestr = py::str(interface["typestr"]);
  if (typestr == "<f4")
    view.type = ScalarType::kFloat32;
  else if (typestr == "<f2")
    view.type = ScalarType::kFloat16;
  else if (typestr == "|u1")
    view.type = ScalarType::kUInt8;
  else
    throw std::invalid_argument(std::string(name) + ": unsupported dtype (array typestr '" + typestr +
                                "'); expected float32, float16 or uint8");

  for (py::handle extent : py::tuple(interface["shape"])) view.shape.push_back(extent.cast<int64_t>());

  py::object data = interface["data"];
  if (!py::isinstance<py::tuple>(data))
    throw std::invalid_argument(std::string(name) + ": array interface without a (pointer, readonly) data tuple");
  view.data = reinterpret_cast<void*>(data[py::int_(0)].cast<std::uintptr_t>());
  view.readonly = data[py::int_(1)].cast<bool>();

  if (interface.contains("mask") && !interface["mask"].is_none())
    throw std::invalid_argument(std::string(name) + ": masked arrays are not supported");

  if (interface.contains("strides") && !interface["strides"].is_none()) {
    const py::tuple strides(interface["strides"]);
    const int64_t itemsize = view.type == ScalarType::kFloat32 ? 4 : view.type == ScalarType::kFloat16 ? 2 : 1;
    int64_t expected = itemsize;
    for (size_t i = view.shape.size(); i-- > 0;) {
      // Extents of 1 may carry any stride; they never move the pointer.
      if (view.shape[i] != 1 && strides[i].cast<int64_t>() != expected)
        throw std::invalid_argument(std::string(name) + ": must be C-contiguous (got strides " +
                                    std::string(py::str(strides)) + " for shape " + view.shape_string() +
                                    "); call .contiguous() / np.ascontiguousarray first");
      expected *= view.shape[i];
    }
  }
  return view;
}

}  // namespace bindings
}  // namespace pybilayer
