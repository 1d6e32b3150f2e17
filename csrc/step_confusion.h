// What the CPU and the CUDA implementations of prmbench_fast::step_confusion share: the argument checks that need only
// metadata, and the counting of one sample. Both kernels call the same `count_sample`, so the CPU tests (exact
// comparison with the torch reference and with a transcription of the official loop) also cover the arithmetic that
// the CUDA kernel runs; only the CUDA launch and reduction are specific to it.
//
// Layout (the words of prmbench_fast/reference.py::step_confusion_reference):
//   step_values (N,) bool/float32/float64, thresholds (B,) float64, cu_labels (B+1,) int64,
//   error_steps (E,) int64 (0-based), cu_errors (B+1,) int64, sample_class (B,) int64;
//   outputs class_counts (num_classes, 4) int64 [TP, FP, TN, FN],
//   sample_counts (B, 6) int64 [TP, FP, TN, FN, positive_labels, first_error_hit] and
//   bad_input () int32, a bitwise OR of BadInput flags (0: the inputs were valid, the counts are meaningful).
#pragma once

#include <cstdint>
#include <string>

#include "checks.h"

// count_sample runs on the host (CPU op) and on the device (one CUDA thread per sample).
#ifdef __CUDACC__
#define PRMBENCH_HOST_DEVICE __host__ __device__
#else
#define PRMBENCH_HOST_DEVICE
#endif

namespace prmbench_fast {

constexpr int64_t kConfusionColumns = 4;  // TP, FP, TN, FN
constexpr int64_t kSampleColumns = 6;     // TP, FP, TN, FN, positive_labels, first_error_hit
enum SampleColumn : int { kTP = 0, kFP = 1, kTN = 2, kFN = 3, kPositiveLabels = 4, kFirstErrorHit = 5 };

// What the data of the inputs can get wrong. The CPU op raises on the first violation it finds and returns 0; the CUDA
// op cannot raise from the device without a trap, which would poison the whole process's CUDA context, so it ORs
// these flags into its bad_input output instead (and reads nothing out of bounds), and prmbench_fast/ops.py raises
// the CPU op's error when the flag is read. The values are part of the op's contract (ops.py spells them out).
enum BadInput : int32_t {
  kBadLabelOffsets = 1,     // cu_labels does not start at 0, decreases, or does not end at N
  kBadErrorOffsets = 2,     // the same for cu_errors and E
  kNegativeErrorStep = 4,   // an error step < 0
  kClassOutOfRange = 8,     // a sample_class outside [0, num_classes)
};

// Checks that need no tensor data (so no device sync): ranks, lengths, dtypes, one device, num_classes >= 1.
// Returns the batch size B.
inline int64_t check_step_confusion_args(
    const Tensor& step_values,
    const Tensor& thresholds,
    const Tensor& cu_labels,
    const Tensor& error_steps,
    const Tensor& cu_errors,
    const Tensor& sample_class,
    int64_t num_classes) {
  check(num_classes >= 1, "num_classes must be >= 1, got ", num_classes);
  // B is read from sample_class, so a wrong length is reported on the offsets or thresholds that disagree with it.
  check_any_vector(sample_class, "sample_class", "(B,)");
  const int64_t num_samples = sample_class.size(0);
  const std::string origin = "B = " + std::to_string(num_samples) + " is the length of sample_class";
  check_vector(cu_labels, "cu_labels", num_samples + 1, "(B+1,)", origin);
  check_vector(cu_errors, "cu_errors", num_samples + 1, "(B+1,)", origin);
  check_vector(thresholds, "thresholds", num_samples, "(B,)", origin);
  check_any_vector(step_values, "step_values", "(N,)");
  check_any_vector(error_steps, "error_steps", "(E,)");

  const auto value_type = step_values.scalar_type();
  check(
      value_type == ScalarType::Bool || value_type == ScalarType::Float || value_type == ScalarType::Double,
      "step_values must be bool, float32 or float64, got ", torch::headeronly::toString(value_type));
  check_dtype(thresholds, "thresholds", ScalarType::Double);
  check_dtype(cu_labels, "cu_labels", ScalarType::Long);
  check_dtype(error_steps, "error_steps", ScalarType::Long);
  check_dtype(cu_errors, "cu_errors", ScalarType::Long);
  check_dtype(sample_class, "sample_class", ScalarType::Long);

  check_same_device(thresholds, "thresholds", step_values, "step_values");
  check_same_device(cu_labels, "cu_labels", step_values, "step_values");
  check_same_device(error_steps, "error_steps", step_values, "step_values");
  check_same_device(cu_errors, "cu_errors", step_values, "step_values");
  check_same_device(sample_class, "sample_class", step_values, "step_values");
  return num_samples;
}

// Calls `body(scalar_t{})` with the C++ type of step_values' dtype (bool, float or double: what
// check_step_confusion_args admits), as AT_DISPATCH does outside the stable ABI.
template <typename Body>
inline void dispatch_step_values(ScalarType type, const Body& body) {
  switch (type) {
    case ScalarType::Bool:
      body(bool{});
      break;
    case ScalarType::Float:
      body(float{});
      break;
    case ScalarType::Double:
      body(double{});
      break;
    default:
      fail("step_values must be bool, float32 or float64, got ", torch::headeronly::toString(type));
  }
}

// A label is positive ("this step is correct"). Bool values are the labels themselves; floating values are compared
// with the sample's threshold in float64, as the official adapters compare Python floats (NaN is never positive).
PRMBENCH_HOST_DEVICE inline bool is_positive(bool value, double /*threshold*/) {
  return value;
}
PRMBENCH_HOST_DEVICE inline bool is_positive(float value, double threshold) {
  return static_cast<double>(value) > threshold;
}
PRMBENCH_HOST_DEVICE inline bool is_positive(double value, double threshold) {
  return value > threshold;
}

// True when `errors[j]` already occurred in `errors[0, j)`: the official loop tests `i in error_steps`, so a repeated
// error step is one error step. Quadratic in the sample's error count, which averages 2.1 on PRMBench; in exchange it
// needs no scratch memory, which keeps the CUDA thread simple.
PRMBENCH_HOST_DEVICE inline bool seen_before(const int64_t* errors, int64_t j) {
  for (int64_t k = 0; k < j; ++k) {
    if (errors[k] == errors[j]) {
      return true;
    }
  }
  return false;
}

// Counts one sample: `values` are its `num_labels` labels or scores, `errors` its `num_errors` error steps (0-based,
// any order). Writes the six columns of its sample_counts row to `out`.
//
// Instead of testing every label for membership in the error list, it counts the positive labels once and then
// visits each distinct in-range error step: FP are the positive labels on error steps, TN the other error steps, and
// TP/FN follow by subtraction. An error step outside [0, num_labels) is never scored (the official loop only visits
// label indices); the first error step is the minimum over all of them, scored only when it is in range.
template <typename scalar_t>
PRMBENCH_HOST_DEVICE inline void count_sample(
    const scalar_t* values,
    int64_t num_labels,
    double threshold,
    const int64_t* errors,
    int64_t num_errors,
    int64_t* out) {
  int64_t positive_labels = 0;
  for (int64_t i = 0; i < num_labels; ++i) {
    positive_labels += is_positive(values[i], threshold) ? 1 : 0;
  }

  int64_t error_labels = 0;     // distinct error steps that have a label
  int64_t positive_errors = 0;  // ... whose label is positive
  int64_t first_error = 0;      // meaningful only when num_errors > 0
  for (int64_t j = 0; j < num_errors; ++j) {
    const int64_t step = errors[j];
    first_error = (j == 0 || step < first_error) ? step : first_error;
    if (step < 0 || step >= num_labels || seen_before(errors, j)) {
      continue;
    }
    error_labels += 1;
    positive_errors += is_positive(values[step], threshold) ? 1 : 0;
  }

  const int64_t negative_errors = error_labels - positive_errors;
  out[kTP] = positive_labels - positive_errors;
  out[kFP] = positive_errors;
  out[kTN] = negative_errors;
  out[kFN] = (num_labels - positive_labels) - negative_errors;
  out[kPositiveLabels] = positive_labels;
  const bool first_error_scored = num_errors > 0 && first_error >= 0 && first_error < num_labels;
  out[kFirstErrorHit] = first_error_scored ? (is_positive(values[first_error], threshold) ? 0 : 1) : -1;
}

}  // namespace prmbench_fast
