// pybilayer._C: the compositor, the heads, device buffers and streams. Thin: checks and translation only.
#include <pybind11/pybind11.h>
#include <pybind11/gil_safe_call_once.h>
#include <pybind11/stl.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "../cpu_features.h"
#include "../dispatch.h"
#include "../parallel.h"
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

  m.def("_stealing_ranges_trace", [](int64_t n, int workers, int slow_worker, double delay_us) {
    // For the tests: the items each worker took, in order, where `slow_worker` sleeps `delay_us` per item.
    std::vector<std::vector<int64_t>> taken(workers);
    {
      py::gil_scoped_release release;
      pybilayer::StealingRanges ranges(n, workers);
      std::vector<std::thread> threads;
      for (int w = 0; w < workers; ++w)
        threads.emplace_back([&, w] {
          for (int64_t item; (item = ranges.take(w)) >= 0;) {
            taken[w].push_back(item);
            if (w == slow_worker) std::this_thread::sleep_for(std::chrono::duration<double, std::micro>(delay_us));
          }
        });
      for (std::thread& t : threads) t.join();
    }
    return taken;
  }, py::arg("n"), py::arg("workers"), py::arg("slow_worker") = -1, py::arg("delay_us") = 0.0);

  m.def("build_info", [] {
    py::dict info;
    info["cuda"] = pybilayer::cuda::kBuilt;
    info["cuda_architectures"] = PYBILAYER_CUDA_ARCHITECTURES;
    return info;
  }, "How this module was built: {'cuda': bool, 'cuda_architectures': str}.");
  m.def("cpu_isas", [] {
    std::vector<std::string> names;
    for (int isa = 0; isa <= static_cast<int>(pybilayer::best_isa()); ++isa)
      names.push_back(pybilayer::isa_name(static_cast<pybilayer::Isa>(isa)));
    return names;
  }, "The CPU kernels' code paths this CPU runs, narrowest first: 'portable', then 'avx2', 'avx512'.");
  m.def("cuda_devices", [] {
    const pybilayer::cuda::DeviceReport report = pybilayer::cuda::query_devices();
    py::dict devices;
    devices["count"] = report.count;
    devices["name"] = report.name.empty() ? py::object(py::none()) : py::object(py::str(report.name));
    devices["error"] = report.error.empty() ? py::object(py::none()) : py::object(py::str(report.error));
    return devices;
  }, "Usable CUDA devices: {'count': int, 'name': name of device 0 or None, 'error': why none, or None}.");
}
