// Device discovery, device memory and streams: the CUDA side of dispatch.h.
#include <cuda_runtime.h>

#include "../dispatch.h"
#include "check.h"

namespace pybilayer {
namespace cuda {

DeviceReport query_devices() noexcept {
  DeviceReport report;
  const cudaError_t status = cudaGetDeviceCount(&report.count);
  if (status != cudaSuccess) {
    cudaGetLastError();
    report.count = 0;
    report.error = std::string("cudaGetDeviceCount: ") + cudaGetErrorName(status) + ": " + cudaGetErrorString(status);
    return report;
  }
  if (report.count == 0) {
    report.error = "cudaGetDeviceCount: no CUDA device";
    return report;
  }
  cudaDeviceProp properties{};
  if (cudaGetDeviceProperties(&properties, 0) == cudaSuccess) report.name = properties.name;
  return report;
}

void require_device() {
  int count = 0;  // cheap, unlike the device properties query_devices() reads
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status == cudaSuccess && count > 0) return;
  cudaGetLastError();
  throw BackendUnavailable(std::string("no usable CUDA device: cudaGetDeviceCount: ") +
                           (status == cudaSuccess ? "no CUDA device"
                                                  : std::string(cudaGetErrorName(status)) + ": " +
                                                        cudaGetErrorString(status)));
}

void* malloc_device(std::size_t nbytes, int* device) {
  require_device();
  check(cudaGetDevice(device), "cudaGetDevice");
  void* ptr = nullptr;
  check(cudaMalloc(&ptr, nbytes), "cudaMalloc(" + std::to_string(nbytes) + " bytes)");
  return ptr;
}

void free_device(void* ptr, int device) noexcept {
  if (ptr == nullptr) return;
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device);
  cudaFree(ptr);
  cudaSetDevice(previous);
}

void copy(void* dst, const void* src, std::size_t nbytes, int device, bool to_device) {
  DeviceGuard guard(device);
  check(cudaMemcpy(dst, src, nbytes, to_device ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost), "cudaMemcpy");
}

std::uintptr_t create_stream(int* device) {
  require_device();
  check(cudaGetDevice(device), "cudaGetDevice");
  cudaStream_t stream = nullptr;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  return reinterpret_cast<std::uintptr_t>(stream);
}

void destroy_stream(std::uintptr_t stream, int device) noexcept {
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device);
  cudaStreamDestroy(reinterpret_cast<cudaStream_t>(stream));
  cudaSetDevice(previous);
}

void synchronize_stream(std::uintptr_t stream, int device) {
  DeviceGuard guard(device);
  check(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
}

}  // namespace cuda
}  // namespace pybilayer
