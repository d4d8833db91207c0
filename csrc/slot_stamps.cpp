// fastmb._C.slot_stamps (slot_stamps.h), apart from fastmb.cpp: torch's Python tensor header takes
// several seconds to compile, and the schemas do not need it.
#include "slot_stamps.h"

#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>

namespace fastmb {
namespace {

// The (dict, key) slot's value (borrowed; null when absent, or with a Python error set), or for
// (dict, None) the dict's size in `size`.
bool slot_value(PyObject* slot, Py_ssize_t i, PyObject** value, int64_t* size) {
  if (!PyTuple_Check(slot) || PyTuple_GET_SIZE(slot) != 2 || !PyDict_Check(PyTuple_GET_ITEM(slot, 0))) {
    PyErr_Format(PyExc_TypeError, "slot_stamps: slot %zd must be a (dict, key) tuple", i);
    return false;
  }
  PyObject *holder = PyTuple_GET_ITEM(slot, 0), *key = PyTuple_GET_ITEM(slot, 1);
  *value = nullptr;
  if (key == Py_None) {
    *size = PyDict_GET_SIZE(holder);
    return true;
  }
  *value = PyDict_GetItemWithError(holder, key);
  *size = reinterpret_cast<intptr_t>(*value);
  return *value != nullptr || !PyErr_Occurred();
}

// A tensor's data address and version counter into stamp[0..1]; false with a Python error set.
bool stamp_tensor(PyObject* value, int64_t* stamp) {
  try {  // inference tensors have no version counter (as Tensor._version, an error)
    const at::Tensor& tensor = THPVariable_Unpack(value);
    stamp[0] = reinterpret_cast<intptr_t>(tensor.data_ptr());
    stamp[1] = int64_t(tensor._version());
  } catch (const c10::Error& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what_without_backtrace());
    return false;
  }
  return true;
}

}  // namespace

PyObject* slot_stamps(PyObject* /*module*/, PyObject* args) {
  PyObject* slots = nullptr;
  Py_ssize_t tensor_slots = 0;
  if (!PyArg_ParseTuple(args, "On", &slots, &tensor_slots)) return nullptr;
  PyObject* items = PySequence_Fast(slots, "slot_stamps takes a sequence of (dict, key) slots");
  if (items == nullptr) return nullptr;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
  tensor_slots = std::clamp<Py_ssize_t>(tensor_slots, 0, count);
  PyObject* stamps = PyBytes_FromStringAndSize(nullptr, (count + 2 * tensor_slots) * Py_ssize_t(sizeof(int64_t)));
  if (stamps != nullptr) {
    auto* values = reinterpret_cast<int64_t*>(PyBytes_AS_STRING(stamps));
    PyObject** objects = PySequence_Fast_ITEMS(items);
    auto* tensor_class = reinterpret_cast<PyTypeObject*>(THPVariableClass);
    for (Py_ssize_t i = 0; i < count; ++i) {
      PyObject* value = nullptr;
      bool ok = slot_value(objects[i], i, &value, values);
      if (ok && i < tensor_slots) {
        values[1] = values[2] = 0;
        // A subtype test, not isinstance: that takes the metaclass's Python-level path.
        if (value != nullptr && PyType_IsSubtype(Py_TYPE(value), tensor_class)) ok = stamp_tensor(value, values + 1);
        values += 2;
      }
      if (!ok) {
        Py_CLEAR(stamps);
        break;
      }
      ++values;
    }
  }
  Py_DECREF(items);
  return stamps;
}

}  // namespace fastmb
