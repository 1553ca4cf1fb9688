// Makes fastattn._C importable from Python. The ops register themselves (TORCH_LIBRARY_*) when
// the library is loaded, so the module itself is empty; import torch before it.
#include <Python.h>

namespace {
PyModuleDef fastattn_module = {PyModuleDef_HEAD_INIT, "_C",
                               "fastattn's C++/CUDA kernels (torch.ops.fastattn.*)", -1,
                               nullptr};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastattn_module); }
