// CUDA runtime helpers for the .cu files (CUDA builds only; the rest of csrc sees dispatch.h).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../dispatch.h"

namespace pybilayer {
namespace cuda {

// Throws on a CUDA error. "No device / no driver" errors become BackendUnavailable, the rest
// std::runtime_error; either way the message names the call and carries CUDA's own words.
inline void check(cudaError_t status, const std::string& what) {
  if (status == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so later calls are not blamed for it
  const std::string message = what + ": " + cudaGetErrorName(status) + ": " + cudaGetErrorString(status);
  if (status == cudaErrorNoDevice || status == cudaErrorInsufficientDriver || status == cudaErrorInvalidDevice)
    throw BackendUnavailable(message);
  throw std::runtime_error(message);
}

// Makes `device` current for a scope and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device >= 0 && device != previous_) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace cuda
}  // namespace pybilayer
