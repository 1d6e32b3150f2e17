// Argument checks shared by the CPU and CUDA kernels of prmbench_fast, on LibTorch's stable ABI.
//
// Every failure throws std::runtime_error (a RuntimeError in Python) whose message names the argument and what was
// expected, so a caller can fix the call without reading the kernel. The helpers only look at metadata (shape, dtype,
// device): they never read tensor data, which keeps them free of host-device synchronisation on CUDA.
//
// Only headers of the stable ABI (torch/csrc/stable, torch/headeronly) are used anywhere in csrc/, so one binary loads
// under every torch from the version it targets (TORCH_TARGET_VERSION, set by setup.py) on.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/DeviceType.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace prmbench_fast {

using torch::headeronly::DeviceType;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Streams `parts` into one message and throws it. (STD_TORCH_CHECK would prefix every message with the C++ function,
// file and line, which mean nothing to a caller of the Python API.)
template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw std::runtime_error(message.str());
}

template <typename... Parts>
inline void check(bool condition, const Parts&... parts) {
  if (!condition) {
    fail(parts...);
  }
}

// "[4]", "[5, 1]": a shape as torch prints it.
inline std::string shape_of(const Tensor& tensor) {
  std::ostringstream shape;
  shape << "[";
  for (int64_t d = 0; d < tensor.dim(); ++d) {
    shape << (d == 0 ? "" : ", ") << tensor.size(d);
  }
  shape << "]";
  return shape.str();
}

// "cpu", "cuda:0", "meta": a device as torch prints it (the device types this op can meet by name).
inline std::string device_of(const Tensor& tensor) {
  const auto device = tensor.device();
  std::ostringstream name;
  switch (device.type()) {
    case DeviceType::CPU:
      name << "cpu";
      break;
    case DeviceType::CUDA:
      name << "cuda";
      break;
    case DeviceType::Meta:
      name << "meta";
      break;
    default:
      name << "device type " << static_cast<int>(device.type());
  }
  if (device.index() >= 0) {
    name << ":" << static_cast<int>(device.index());
  }
  return name.str();
}

// `tensor` must be one-dimensional with `expected_length` elements; `shape` spells the expected shape (e.g. "(B+1,)")
// and `origin` says where its symbols come from (e.g. "B = 3 is the length of sample_class").
inline void check_vector(
    const Tensor& tensor, const char* name, int64_t expected_length, const char* shape, const std::string& origin) {
  check(
      tensor.dim() == 1 && tensor.size(0) == expected_length,
      name, " must have shape ", shape, " = (", expected_length, ",), got ", shape_of(tensor), " (", origin, ")");
}

// `tensor` must be one-dimensional, of any length; `shape` names that length (e.g. "(N,)").
inline void check_any_vector(const Tensor& tensor, const char* name, const char* shape) {
  check(tensor.dim() == 1, name, " must have shape ", shape, " (one-dimensional), got ", shape_of(tensor));
}

inline void check_dtype(const Tensor& tensor, const char* name, ScalarType expected) {
  check(
      tensor.scalar_type() == expected,
      name, " must be ", torch::headeronly::toString(expected), ", got ",
      torch::headeronly::toString(tensor.scalar_type()));
}

// `tensor` must live on the device of `reference` (the op's first tensor argument, named `reference_name`).
inline void check_same_device(
    const Tensor& tensor, const char* name, const Tensor& reference, const char* reference_name) {
  check(
      tensor.device() == reference.device(),
      name, " must be on the same device as ", reference_name, " (", device_of(reference), "), got ",
      device_of(tensor));
}

inline void check_device_type(const Tensor& tensor, const char* name, DeviceType expected, const char* expected_name) {
  check(
      tensor.device().type() == expected, name, " must be a ", expected_name, " tensor, got one on ",
      device_of(tensor));
}

}  // namespace prmbench_fast
