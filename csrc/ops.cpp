// Op schemas of the prmbench_fast library. Each op is defined once here; the CPU and CUDA kernels register their
// implementations beside their code (TORCH_LIBRARY_IMPL), the fake kernel is registered in prmbench_fast/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import prmbench_fast._C` loads this shared object, which runs the registrations below. The module itself is empty;
// built against the limited API so one binary serves every CPython >= 3.10.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(prmbench_fast, m) {
  m.def(
      "step_confusion(Tensor step_values, Tensor thresholds, Tensor cu_labels, Tensor error_steps, "
      "Tensor cu_errors, Tensor sample_class, int num_classes) -> (Tensor, Tensor, Tensor)");
}
