// CUDA implementation of prmbench_fast::step_confusion (schema in ops.cpp, semantics in
// prmbench_fast/reference.py::step_confusion_reference).
//
// One thread counts one sample (grid-stride loop) with the same `count_sample` the CPU kernel runs, writes its
// sample_counts row, and adds its TP/FP/TN/FN to a per-block class histogram in shared memory; each block then adds
// its histogram to the zero-initialised global class_counts. There is no host synchronisation: all sizes come from
// tensor metadata. The checks that need the data (offsets, error steps, class ids) run in the kernel and never trap
// (a device-side assert would leave a sticky error in the process's CUDA context): each thread ORs the BadInput flags
// of its sample into the bad_input output, clamps malformed offsets and skips bad class ids so that nothing is read or
// written out of bounds, and prmbench_fast/ops.py raises when it reads a nonzero flag.
//
// Like the CPU kernel it uses the stable ABI only: the device guard and the current stream come from its C shim
// (torch/csrc/stable/accelerator.h and aoti_torch_get_current_cuda_stream, declared when USE_CUDA is defined, which
// setup.py does for this build).
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
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

// The histogram is updated with 64-bit unsigned atomics and stored as int64; the counts are non-negative, so both
// views hold the same bits.
static_assert(sizeof(unsigned long long) == sizeof(int64_t), "int64 counts are updated as unsigned long long");

constexpr int kThreadsPerBlock = 256;
// Enough blocks to fill any current GPU (~132 SMs x 8 resident blocks); more would only add histogram flushes, and the
// grid-stride loop covers any batch size.
constexpr int64_t kMaxBlocks = 1024;
// The per-block histogram (num_classes x 4 x 8 bytes) fits the 48 KiB of shared memory every GPU grants without an
// opt-in for num_classes <= 1536. Above that, threads add straight into global memory instead.
constexpr int64_t kMaxSharedHistogramBytes = 48 * 1024;

// [begin, end) of sample b in a tensor of `total` elements, clamped so malformed offsets cannot read out of bounds.
// Returns `flag` when the offsets decrease here; with every sample checked, and the two ends checked once (see
// `end_flags`), that is exactly the CPU op's check_offsets.
__device__ inline int sample_range(
    const int64_t* offsets, int64_t b, int64_t total, int flag, int64_t* begin, int64_t* end) {
  const int64_t lo = offsets[b];
  const int64_t hi = offsets[b + 1];
  *begin = lo < 0 ? 0 : (lo > total ? total : lo);
  *end = hi < *begin ? *begin : (hi > total ? total : hi);
  return hi < lo ? flag : 0;
}

// Offsets must start at 0 and end at the length of the tensor they slice.
__device__ inline int end_flags(const int64_t* offsets, int64_t num_samples, int64_t total, int flag) {
  return (offsets[0] != 0 || offsets[num_samples] != total) ? flag : 0;
}

template <typename scalar_t>
__global__ void step_confusion_kernel(
    const scalar_t* __restrict__ values,
    const double* __restrict__ thresholds,
    const int64_t* __restrict__ cu_labels,
    const int64_t* __restrict__ error_steps,
    const int64_t* __restrict__ cu_errors,
    const int64_t* __restrict__ sample_class,
    int64_t num_samples,
    int64_t num_values,
    int64_t num_error_steps,
    int64_t num_classes,
    bool shared_histogram,
    int64_t* __restrict__ sample_counts,
    unsigned long long* __restrict__ class_counts,
    int* __restrict__ bad_input) {
  extern __shared__ unsigned long long block_counts[];
  const int64_t histogram_size = num_classes * kConfusionColumns;
  unsigned long long* histogram = shared_histogram ? block_counts : class_counts;
  if (shared_histogram) {
    for (int64_t k = threadIdx.x; k < histogram_size; k += blockDim.x) {
      block_counts[k] = 0;
    }
  }
  __syncthreads();

  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int flags = first == 0 ? end_flags(cu_labels, num_samples, num_values, kBadLabelOffsets) |
                               end_flags(cu_errors, num_samples, num_error_steps, kBadErrorOffsets)
                         : 0;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t b = first; b < num_samples; b += stride) {
    int64_t label_begin, label_end, error_begin, error_end;
    flags |= sample_range(cu_labels, b, num_values, kBadLabelOffsets, &label_begin, &label_end);
    flags |= sample_range(cu_errors, b, num_error_steps, kBadErrorOffsets, &error_begin, &error_end);
    for (int64_t e = error_begin; e < error_end; ++e) {
      flags |= error_steps[e] < 0 ? kNegativeErrorStep : 0;
    }
    int64_t counts[kSampleColumns];  // kept local so the histogram update below does not read global memory back
    count_sample(
        values + label_begin, label_end - label_begin, thresholds[b], error_steps + error_begin,
        error_end - error_begin, counts);
    for (int64_t k = 0; k < kSampleColumns; ++k) {
      sample_counts[b * kSampleColumns + k] = counts[k];
    }

    const int64_t cls = sample_class[b];
    if (cls < 0 || cls >= num_classes) {
      flags |= kClassOutOfRange;  // and never write outside the histogram
      continue;
    }
    for (int64_t k = 0; k < kConfusionColumns; ++k) {
      // TP/FP/TN/FN are never negative, so the unsigned add is exact.
      atomicAdd(&histogram[cls * kConfusionColumns + k], static_cast<unsigned long long>(counts[k]));
    }
  }
  if (flags != 0) {  // only bad inputs pay for the atomic
    atomicOr(bad_input, flags);
  }

  if (shared_histogram) {
    __syncthreads();
    for (int64_t k = threadIdx.x; k < histogram_size; k += blockDim.x) {
      if (block_counts[k] != 0) {
        atomicAdd(&class_counts[k], block_counts[k]);
      }
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> step_confusion_cuda(
    Tensor step_values_in,
    Tensor thresholds_in,
    Tensor cu_labels_in,
    Tensor error_steps_in,
    Tensor cu_errors_in,
    Tensor sample_class_in,
    int64_t num_classes) {
  // The dispatcher routes here when any argument is a CUDA tensor, so the device checks below are what catch a
  // mix of CPU and CUDA tensors (or two GPUs).
  const int64_t num_samples = check_step_confusion_args(
      step_values_in, thresholds_in, cu_labels_in, error_steps_in, cu_errors_in, sample_class_in, num_classes);
  check_device_type(step_values_in, "step_values", DeviceType::CUDA, "CUDA");
  const int32_t device_index = step_values_in.get_device_index();
  const torch::stable::accelerator::DeviceGuard device_guard(device_index);

  // contiguous() is a no-op for contiguous inputs and otherwise an asynchronous copy on the current stream.
  const Tensor step_values = torch::stable::contiguous(step_values_in);
  const Tensor thresholds = torch::stable::contiguous(thresholds_in);
  const Tensor cu_labels = torch::stable::contiguous(cu_labels_in);
  const Tensor error_steps = torch::stable::contiguous(error_steps_in);
  const Tensor cu_errors = torch::stable::contiguous(cu_errors_in);
  const Tensor sample_class = torch::stable::contiguous(sample_class_in);

  // Every row of sample_counts is written by the kernel; class_counts and bad_input are accumulated into, so they
  // start at zero.
  Tensor sample_counts = torch::stable::new_empty(cu_labels, std::vector<int64_t>{num_samples, kSampleColumns});
  Tensor class_counts = torch::stable::new_zeros(cu_labels, std::vector<int64_t>{num_classes, kConfusionColumns});
  Tensor bad_input = torch::stable::new_zeros(cu_labels, std::vector<int64_t>{}, ScalarType::Int);

  const int64_t histogram_bytes = num_classes * kConfusionColumns * static_cast<int64_t>(sizeof(unsigned long long));
  const bool shared_histogram = histogram_bytes <= kMaxSharedHistogramBytes;
  const size_t shared_bytes = shared_histogram ? static_cast<size_t>(histogram_bytes) : 0;
  // At least one block, even for an empty batch: its first thread checks the ends of the offsets.
  const int64_t wanted_blocks = (num_samples + kThreadsPerBlock - 1) / kThreadsPerBlock;
  const unsigned int blocks = static_cast<unsigned int>(
      wanted_blocks < 1 ? 1 : (wanted_blocks < kMaxBlocks ? wanted_blocks : kMaxBlocks));
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream));

  dispatch_step_values(step_values.scalar_type(), [&](auto value_type) {
    using scalar_t = decltype(value_type);
    step_confusion_kernel<scalar_t><<<blocks, kThreadsPerBlock, shared_bytes, static_cast<cudaStream_t>(stream)>>>(
        step_values.const_data_ptr<scalar_t>(),
        thresholds.const_data_ptr<double>(),
        cu_labels.const_data_ptr<int64_t>(),
        error_steps.const_data_ptr<int64_t>(),
        cu_errors.const_data_ptr<int64_t>(),
        sample_class.const_data_ptr<int64_t>(),
        num_samples,
        step_values.size(0),
        error_steps.size(0),
        num_classes,
        shared_histogram,
        sample_counts.mutable_data_ptr<int64_t>(),
        reinterpret_cast<unsigned long long*>(class_counts.mutable_data_ptr<int64_t>()),
        bad_input.mutable_data_ptr<int32_t>());
  });
  const cudaError_t launched = cudaGetLastError();
  check(launched == cudaSuccess, "step_confusion: CUDA kernel launch failed: ", cudaGetErrorString(launched));
  return {class_counts, sample_counts, bad_input};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(prmbench_fast, CUDA, m) {
  m.impl("step_confusion", TORCH_BOX(&step_confusion_cuda));
}

}  // namespace prmbench_fast
