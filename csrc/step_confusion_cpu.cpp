// CPU implementation of prmbench_fast::step_confusion (schema in ops.cpp, semantics in
// prmbench_fast/reference.py::step_confusion_reference).
//
// Samples are independent: torch::stable::parallel_for (torch's own thread pool, behind the stable ABI) splits them
// across threads and each sample writes only its own row of sample_counts. The per-class sums are then added up in
// sample order on one thread, so the result never depends on the thread count (the sums are integers, but a fixed
// order also keeps the code free of atomics).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "checks.h"
#include "step_confusion.h"

namespace prmbench_fast {
namespace {

// A sample (~13 labels) takes ~17 ns, so the whole benchmark (6,969 samples) is ~0.12 ms on one thread. A parallel
// region costs ~10 us on idle cores but milliseconds when the cores are shared (measured here: 0.12 ms on one thread
// vs 8-12 ms on two busy ones), so only batches of 16k+ samples (~0.3 ms of work per chunk) are split across threads.
constexpr int64_t kSamplesPerTask = 16384;

// `offsets` (B+1,) must start at 0, never decrease and end at `total` (the length of the tensor it slices, named
// `sliced`). Reading it out of bounds would otherwise read outside that tensor.
void check_offsets(const Tensor& offsets, const char* name, int64_t total, const char* sliced) {
  const int64_t* data = offsets.const_data_ptr<int64_t>();
  const int64_t last = offsets.size(0) - 1;
  check(data[0] == 0, name, "[0] must be 0, got ", data[0]);
  for (int64_t b = 0; b < last; ++b) {
    check(
        data[b] <= data[b + 1], name, " must be non-decreasing, got ", name, "[", b, "] = ", data[b], " > ", name, "[",
        b + 1, "] = ", data[b + 1]);
  }
  check(
      data[last] == total, name, "[B] must equal the length of ", sliced, " (", total, "), got ", data[last]);
}

void check_class_ids(const Tensor& sample_class, int64_t num_classes) {
  const int64_t* data = sample_class.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < sample_class.size(0); ++b) {
    check(
        data[b] >= 0 && data[b] < num_classes,
        "sample_class[", b, "] = ", data[b], " is out of range: class ids must be in [0, num_classes) = [0, ",
        num_classes, ")");
  }
}

// Negative error steps cannot come from 1-based PRMBench data; the reference would index another sample's labels.
void check_error_steps(const Tensor& error_steps) {
  const int64_t* data = error_steps.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < error_steps.size(0); ++e) {
    check(data[e] >= 0, "error_steps must be 0-based (>= 0), got error_steps[", e, "] = ", data[e]);
  }
}

template <typename scalar_t>
void count_samples(
    const Tensor& step_values,
    const Tensor& thresholds,
    const Tensor& cu_labels,
    const Tensor& error_steps,
    const Tensor& cu_errors,
    Tensor& sample_counts) {
  const scalar_t* values = step_values.const_data_ptr<scalar_t>();
  const double* threshold = thresholds.const_data_ptr<double>();
  const int64_t* label_offsets = cu_labels.const_data_ptr<int64_t>();
  const int64_t* errors = error_steps.const_data_ptr<int64_t>();
  const int64_t* error_offsets = cu_errors.const_data_ptr<int64_t>();
  int64_t* out = sample_counts.mutable_data_ptr<int64_t>();

  torch::stable::parallel_for(0, sample_counts.size(0), kSamplesPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      count_sample(
          values + label_offsets[b], label_offsets[b + 1] - label_offsets[b], threshold[b], errors + error_offsets[b],
          error_offsets[b + 1] - error_offsets[b], out + b * kSampleColumns);
    }
  });
}

void sum_by_class(const Tensor& sample_counts, const Tensor& sample_class, Tensor& class_counts) {
  const int64_t* rows = sample_counts.const_data_ptr<int64_t>();
  const int64_t* classes = sample_class.const_data_ptr<int64_t>();
  int64_t* sums = class_counts.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < sample_counts.size(0); ++b) {
    for (int64_t k = 0; k < kConfusionColumns; ++k) {
      sums[classes[b] * kConfusionColumns + k] += rows[b * kSampleColumns + k];
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> step_confusion_cpu(
    Tensor step_values_in,
    Tensor thresholds_in,
    Tensor cu_labels_in,
    Tensor error_steps_in,
    Tensor cu_errors_in,
    Tensor sample_class_in,
    int64_t num_classes) {
  const int64_t num_samples = check_step_confusion_args(
      step_values_in, thresholds_in, cu_labels_in, error_steps_in, cu_errors_in, sample_class_in, num_classes);
  check_device_type(step_values_in, "step_values", DeviceType::CPU, "CPU");

  // The kernel walks raw pointers; contiguous() is free for the usual contiguous inputs and makes strided views work.
  const Tensor step_values = torch::stable::contiguous(step_values_in);
  const Tensor thresholds = torch::stable::contiguous(thresholds_in);
  const Tensor cu_labels = torch::stable::contiguous(cu_labels_in);
  const Tensor error_steps = torch::stable::contiguous(error_steps_in);
  const Tensor cu_errors = torch::stable::contiguous(cu_errors_in);
  const Tensor sample_class = torch::stable::contiguous(sample_class_in);

  // Reading the data is cheap on the CPU, so every precondition the kernel relies on for memory safety is checked.
  check_offsets(cu_labels, "cu_labels", step_values.size(0), "step_values");
  check_offsets(cu_errors, "cu_errors", error_steps.size(0), "error_steps");
  check_error_steps(error_steps);
  check_class_ids(sample_class, num_classes);

  Tensor sample_counts = torch::stable::new_empty(cu_labels, std::vector<int64_t>{num_samples, kSampleColumns});
  Tensor class_counts = torch::stable::new_zeros(cu_labels, std::vector<int64_t>{num_classes, kConfusionColumns});
  dispatch_step_values(step_values.scalar_type(), [&](auto value_type) {
    count_samples<decltype(value_type)>(step_values, thresholds, cu_labels, error_steps, cu_errors, sample_counts);
  });
  sum_by_class(sample_counts, sample_class, class_counts);
  // Bad inputs raised above; the flag exists so that both devices return the same outputs.
  return {class_counts, sample_counts, torch::stable::new_zeros(cu_labels, std::vector<int64_t>{}, ScalarType::Int)};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(prmbench_fast, CPU, m) {
  m.impl("step_confusion", TORCH_BOX(&step_confusion_cpu));
}

}  // namespace prmbench_fast
