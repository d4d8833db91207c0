// fastmb._C.tensor_stamps (tensor_stamps.h), apart from fastmb.cpp: torch's Python tensor
// header takes several seconds to compile, and the schemas do not need it.
#include "tensor_stamps.h"

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>

namespace fastmb {

PyObject* tensor_stamps(PyObject* /*module*/, PyObject* tensors) {
  PyObject* items = PySequence_Fast(tensors, "tensor_stamps takes a sequence of tensors");
  if (items == nullptr) return nullptr;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
  PyObject* stamps = PyBytes_FromStringAndSize(nullptr, count * 2 * Py_ssize_t(sizeof(int64_t)));
  if (stamps == nullptr) {
    Py_DECREF(items);
    return nullptr;
  }
  auto* values = reinterpret_cast<int64_t*>(PyBytes_AS_STRING(stamps));
  PyObject** objects = PySequence_Fast_ITEMS(items);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!THPVariable_Check(objects[i])) {
      PyErr_Format(PyExc_TypeError, "tensor_stamps: item %zd is a %s, not a tensor", i, Py_TYPE(objects[i])->tp_name);
      Py_DECREF(items);
      Py_DECREF(stamps);
      return nullptr;
    }
    try {  // inference tensors have no version counter (as Tensor._version, an error)
      const at::Tensor& tensor = THPVariable_Unpack(objects[i]);
      values[2 * i] = reinterpret_cast<intptr_t>(tensor.data_ptr());
      values[2 * i + 1] = int64_t(tensor._version());
    } catch (const c10::Error& error) {
      PyErr_SetString(PyExc_RuntimeError, error.what_without_backtrace());
      Py_DECREF(items);
      Py_DECREF(stamps);
      return nullptr;
    }
  }
  Py_DECREF(items);
  return stamps;
}

}  // namespace fastmb
