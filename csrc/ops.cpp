// Op schemas of the prmbench_fast library. Each op is defined once here; the CPU and CUDA kernels register their
// implementations beside their code (STABLE_TORCH_LIBRARY_IMPL), the fake kernel is registered in prmbench_fast/ops.py.
//
// Everything in csrc/ is written against LibTorch's stable ABI (torch/csrc/stable, torch/headeronly) and Python's
// limited API, so one build loads under every supported torch and every CPython >= 3.10 (setup.py sets
// TORCH_TARGET_VERSION to the oldest supported torch and Py_LIMITED_API to 3.10).
#include <Python.h>
#include <torch/csrc/stable/library.h>

#include "result_dicts.h"

extern "C" {
// `import prmbench_fast._C` loads this shared object, which runs the registrations below. The module holds one
// function, the fast path of parse_results (result_dicts.cpp); the ops are reached through torch.ops.
PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"flat_from_results", prmbench_fast_flat_from_results, METH_VARARGS,
       "Official result dicts -> the flat predictions arrays, or None (prmbench_fast.predictions._parse_compiled)."},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

STABLE_TORCH_LIBRARY(prmbench_fast, m) {
  m.def(
      "step_confusion(Tensor step_values, Tensor thresholds, Tensor cu_labels, Tensor error_steps, "
      "Tensor cu_errors, Tensor sample_class, int num_classes) -> (Tensor, Tensor, Tensor)");
}
