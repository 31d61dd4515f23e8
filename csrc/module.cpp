// The Python module lightcnn._C. Importing it runs the static TORCH_LIBRARY_FRAGMENT / _IMPL
// registrations of every file in csrc/ and csrc/cuda/, which create torch.ops.lightcnn.*.
// It defines no Python functions: the Python face of the ops lives in lightcnn/ops/.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
