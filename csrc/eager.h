// The eager fast path's Python functions (csrc/eager.cpp), added to fastattn._C's module.
#pragma once
#include <Python.h>

namespace fastattn {
PyMethodDef* eager_methods();
}  // namespace fastattn
