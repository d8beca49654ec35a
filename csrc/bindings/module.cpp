// pybilayer._C: the compositor, the heads, device buffers and streams. Thin: checks and translation only.
#include <pybind11/pybind11.h>
#include <pybind11/gil_safe_call_once.h>

#include "../dispatch.h"
#include "register.h"

#ifndef PYBILAYER_CUDA_ARCHITECTURES
#define PYBILAYER_CUDA_ARCHITECTURES ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pybilayer native core: the fused compositor (CPU and CUDA twins), the fused heads (CPU), device buffers, streams.";

  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::object> backend_unavailable;
  backend_unavailable.call_once_and_store_result(
      [] { return py::module_::import("pybilayer.errors").attr("BackendUnavailableError"); });
  py::register_exception_translator([](std::exception_ptr thrown) {
    try {
      if (thrown) std::rethrow_exception(thrown);
    } catch (const pybilayer::BackendUnavailable& error) {
      py::set_error(backend_unavailable.get_stored(), error.what());
    }
  });

  pybilayer::bindings::register_compositor(m);
  pybilayer::bindings::register_device(m);
  pybilayer::bindings::register_heads(m);
  pybilayer::bindings::register_lowres(m);

  m.def("build_info", [] {
    py::dict info;
    info["cuda"] = pybilayer::cuda::kBuilt;
    info["cuda_architectures"] = PYBILAYER_CUDA_ARCHITECTURES;
    return info;
  }, "How this module was built: {'cuda': bool, 'cuda_architectures': str}.");
  m.def("cuda_devices", [] {
    const pybilayer::cuda::DeviceReport report = pybilayer::cuda::query_devices();
    py::dict devices;
    devices["count"] = report.count;
    devices["name"] = report.name.empty() ? py::object(py::none()) : py::object(py::str(report.name));
    devices["error"] = report.error.empty() ? py::object(py::none()) : py::object(py::str(report.error));
    return devices;
  }, "Usable CUDA devices: {'count': int, 'name': name of device 0 or None, 'error': why none, or None}.");
}
