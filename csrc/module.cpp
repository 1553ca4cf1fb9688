// Makes fastattn._C importable from Python. The ops register themselves (TORCH_LIBRARY_*) when
// the library is loaded; the module's own functions are the eager fast path (csrc/eager.cpp).
// Import torch before it.
#include <Python.h>

#include "eager.h"

namespace {
PyModuleDef fastattn_module = {PyModuleDef_HEAD_INIT, "_C",
                               "fastattn's C++/CUDA kernels (torch.ops.fastattn_kernels.*)", -1,
                               nullptr};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  fastattn_module.m_methods = fastattn::eager_methods();
  return PyModule_Create(&fastattn_module);
}
