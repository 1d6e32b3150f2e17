// Argument checks shared by the CPU and CUDA kernels of prmbench_fast.
//
// Every failure is a c10::Error (RuntimeError in Python) whose message names the argument and what was expected, so a
// caller can fix the call without reading the kernel. The helpers only look at metadata (shape, dtype, device): they
// never read tensor data, which keeps them free of host-device synchronisation on CUDA.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

namespace prmbench_fast {

// `tensor` must be one-dimensional with `expected_length` elements; `shape` spells the expected shape (e.g. "(B+1,)")
// and `origin` says where its symbols come from (e.g. "B = 3 is the length of sample_class").
inline void check_vector(
    const at::Tensor& tensor, const char* name, int64_t expected_length, const char* shape, const std::string& origin) {
  TORCH_CHECK(
      tensor.dim() == 1 && tensor.size(0) == expected_length,
      name, " must have shape ", shape, " = (", expected_length, ",), got ", tensor.sizes(), " (", origin, ")");
}

// `tensor` must be one-dimensional, of any length; `shape` names that length (e.g. "(N,)").
inline void check_any_vector(const at::Tensor& tensor, const char* name, const char* shape) {
  TORCH_CHECK(tensor.dim() == 1, name, " must have shape ", shape, " (one-dimensional), got ", tensor.sizes());
}

inline void check_dtype(const at::Tensor& tensor, const char* name, at::ScalarType expected) {
  TORCH_CHECK(tensor.scalar_type() == expected, name, " must be ", expected, ", got ", tensor.scalar_type());
}

// `tensor` must live on `device` (the device of the op's first tensor argument, named `reference_name`).
inline void check_same_device(
    const at::Tensor& tensor, const char* name, const c10::Device& device, const char* reference_name) {
  TORCH_CHECK(
      tensor.device() == device,
      name, " must be on the same device as ", reference_name, " (", device, "), got ", tensor.device());
}

inline void check_device_type(const at::Tensor& tensor, const char* name, c10::DeviceType expected) {
  TORCH_CHECK(
      tensor.device().type() == expected,
      name, " must be a ", c10::DeviceTypeName(expected), " tensor, got one on ", tensor.device());
}

}  // namespace prmbench_fast
