// The single CUDA seam: the only file that tests PYBILAYER_WITH_CUDA.
//
// Everything that needs the CUDA runtime is declared here once. A CUDA build defines it in
// csrc/cuda/runtime.cu and csrc/compositor/cuda/compositor_cuda.cu; a CPU-only build gets the inline
// stubs below, which report why CUDA is unavailable instead of failing to link or import.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "compositor/compositor.h"

namespace pybilayer {

// A device, library or build feature that was asked for is not usable here. The bindings translate it
// into pybilayer.errors.BackendUnavailableError.
class BackendUnavailable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace cuda {

struct DeviceReport {
  int count = 0;           // usable devices (0 when the driver or device is missing)
  std::string name;        // name of device 0, when there is one
  std::string error;       // why there is none: the CUDA runtime's own words
};

#ifdef PYBILAYER_WITH_CUDA
constexpr bool kBuilt = true;

DeviceReport query_devices() noexcept;
// Throws BackendUnavailable (naming cudaGetDeviceCount's error) when no device can be used.
void require_device();

void* malloc_device(std::size_t nbytes, int* device);  // returns the pointer; *device = its ordinal
void free_device(void* ptr, int device) noexcept;
void copy(void* dst, const void* src, std::size_t nbytes, int device, bool to_device);

std::uintptr_t create_stream(int* device);
void destroy_stream(std::uintptr_t stream, int device) noexcept;
void synchronize_stream(std::uintptr_t stream, int device);

// The CUDA twin: one launch for the whole batch on `stream` (a cudaStream_t as an integer; 0 is the
// legacy default stream). Checks every pointer is device memory on one device, then launches.
void composite(const CompositeParams& params, std::uintptr_t stream);

#else
constexpr bool kBuilt = false;
constexpr const char* kNotBuilt =
    "pybilayer._C was built without CUDA (nvcc was not found at build time, or PYBILAYER_NO_CUDA=1); "
    "rebuild with nvcc on PATH to use a GPU";

inline DeviceReport query_devices() noexcept { return {0, "", kNotBuilt}; }
[[noreturn]] inline void require_device() { throw BackendUnavailable(kNotBuilt); }
[[noreturn]] inline void* malloc_device(std::size_t, int*) { require_device(); }
inline void free_device(void*, int) noexcept {}
[[noreturn]] inline void copy(void*, const void*, std::size_t, int, bool) { require_device(); }
[[noreturn]] inline std::uintptr_t create_stream(int*) { require_device(); }
inline void destroy_stream(std::uintptr_t, int) noexcept {}
[[noreturn]] inline void synchronize_stream(std::uintptr_t, int) { require_device(); }
[[noreturn]] inline void composite(const CompositeParams&, std::uintptr_t) { require_device(); }
#endif

}  // namespace cuda
}  // namespace pybilayer
