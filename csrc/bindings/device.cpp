// DeviceBuffer and Stream: owners of CUDA memory and streams for callers without torch CUDA
// (e.g. TensorRT bindings). Both raise BackendUnavailableError where no GPU can be used.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "../dispatch.h"
#include "register.h"

namespace py = pybind11;

namespace pybilayer {
namespace bindings {
namespace {

struct Dtype {
  const char* typestr;
  std::size_t itemsize;
};

const std::map<std::string, Dtype>& dtypes() {
  static const std::map<std::string, Dtype> table = {
      {"uint8", {"|u1", 1}}, {"int8", {"|i1", 1}},  {"bool", {"|b1", 1}},      {"int32", {"<i4", 4}},
      {"int64", {"<i8", 8}}, {"float16", {"<f2", 2}}, {"float32", {"<f4", 4}}};
  return table;
}

class DeviceBuffer {
 public:
  DeviceBuffer(const py::object& shape, const std::string& dtype) {
    const auto found = dtypes().find(dtype);
    if (found == dtypes().end()) throw std::invalid_argument("dtype: unsupported '" + dtype + "'");
    dtype_ = found->second;
    if (py::isinstance<py::int_>(shape))
      shape_.push_back(shape.cast<int64_t>());
    else
      shape_ = shape.cast<std::vector<int64_t>>();
    std::size_t count = 1;
    for (int64_t extent : shape_) {
      if (extent < 0) throw std::invalid_argument("shape: extents must be >= 0");
      count *= static_cast<std::size_t>(extent);
    }
    nbytes_ = count * dtype_.itemsize;
    ptr_ = cuda::malloc_device(nbytes_, &device_);
  }
  ~DeviceBuffer() { cuda::free_device(ptr_, device_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  std::uintptr_t ptr() const { return reinterpret_cast<std::uintptr_t>(ptr_); }
  std::size_t nbytes() const { return nbytes_; }
  int device() const { return device_; }
  py::tuple shape() const { return py::cast(shape_); }

  py::dict cuda_array_interface() const {
    py::dict interface;
    interface["shape"] = shape();
    interface["typestr"] = dtype_.typestr;
    interface["data"] = py::make_tuple(ptr(), false);
    interface["strides"] = py::none();
    interface["version"] = 3;
    return interface;
  }

  void copy_from_host(const py::buffer& source) {
    const py::buffer_info info = source.request();
    require_same_size(info, "source");
    py::gil_scoped_release release;
    cuda::copy(ptr_, info.ptr, nbytes_, device_, true);
  }

  void copy_to_host(const py::buffer& destination) {
    const py::buffer_info info = destination.request(true);
    require_same_size(info, "destination");
    py::gil_scoped_release release;
    cuda::copy(info.ptr, ptr_, nbytes_, device_, false);
  }

 private:
  void require_same_size(const py::buffer_info& info, const char* name) const {
    if (static_cast<std::size_t>(info.size * info.itemsize) != nbytes_)
      throw std::invalid_argument(std::string(name) + ": holds " + std::to_string(info.size * info.itemsize) +
                                  " bytes, the buffer " + std::to_string(nbytes_));
    if (!PyBuffer_IsContiguous(info.view(), 'C'))
      throw std::invalid_argument(std::string(name) + ": must be C-contiguous");
  }

  void* ptr_ = nullptr;
  std::size_t nbytes_ = 0;
  int device_ = 0;
  std::vector<int64_t> shape_;
  Dtype dtype_{};
};

class Stream {
 public:
  Stream() { handle_ = cuda::create_stream(&device_); }
  ~Stream() { cuda::destroy_stream(handle_, device_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  std::uintptr_t handle() const { return handle_; }
  int device() const { return device_; }
  void synchronize() const {
    py::gil_scoped_release release;
    cuda::synchronize_stream(handle_, device_);
  }

 private:
  std::uintptr_t handle_ = 0;
  int device_ = 0;
};

}  // namespace

void register_device(py::module_& m) {
  py::class_<DeviceBuffer>(m, "DeviceBuffer", R"pbdoc(
CUDA device memory owned by Python: cudaMalloc on creation (on the current device), cudaFree when the
object dies. Exposes __cuda_array_interface__, so torch.as_tensor(buf, device="cuda") or
pybilayer.ops.composite read it without a copy. Raises BackendUnavailableError where no GPU is usable.

    buf = DeviceBuffer(1024)                       # 1024 bytes
    frame = DeviceBuffer((1, 256, 256, 3), "uint8")
)pbdoc")
      .def(py::init<const py::object&, const std::string&>(), py::arg("shape"), py::arg("dtype") = "uint8")
      .def_property_readonly("ptr", &DeviceBuffer::ptr, "Device address as an int.")
      .def_property_readonly("nbytes", &DeviceBuffer::nbytes)
      .def_property_readonly("device", &DeviceBuffer::device, "CUDA device ordinal.")
      .def_property_readonly("shape", &DeviceBuffer::shape)
      .def_property_readonly("__cuda_array_interface__", &DeviceBuffer::cuda_array_interface)
      .def("copy_from_host", &DeviceBuffer::copy_from_host, py::arg("source"),
           "Synchronous copy from a C-contiguous host buffer of exactly nbytes.")
      .def("copy_to_host", &DeviceBuffer::copy_to_host, py::arg("destination"),
           "Synchronous copy into a writable C-contiguous host buffer of exactly nbytes.");

  py::class_<Stream>(m, "Stream", R"pbdoc(
A non-blocking CUDA stream owned by Python (cudaStreamCreateWithFlags; destroyed with the object).
``handle`` is the cudaStream_t as an int, as pybilayer.ops.composite(stream=...) and TensorRT's
execute_async_v3 take it. Raises BackendUnavailableError where no GPU is usable.
)pbdoc")
      .def(py::init<>())
      .def_property_readonly("handle", &Stream::handle)
      .def_property_readonly("device", &Stream::device)
      .def("synchronize", &Stream::synchronize, "Wait until all work queued on the stream has finished.");
}

}  // namespace bindings
}  // namespace pybilayer
