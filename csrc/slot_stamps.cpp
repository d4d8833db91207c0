// fastmb._C.slot_stamps (slot_stamps.h), apart from fastmb.cpp: torch's Python tensor header takes
// several seconds to compile, and the schemas do not need it.
#include "slot_stamps.h"

#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fastmb {
namespace {

// slot as (dict, key) when it is one, else false.
bool dict_slot(PyObject* slot, PyObject** holder, PyObject** key) {
  if (!PyTuple_Check(slot) || PyTuple_GET_SIZE(slot) != 2 || !PyDict_Check(PyTuple_GET_ITEM(slot, 0))) return false;
  *holder = PyTuple_GET_ITEM(slot, 0);
  *key = PyTuple_GET_ITEM(slot, 1);
  return true;
}

// The (dict, key) slot's value (borrowed; null when absent, or with a Python error set), or for
// (dict, None) the dict's size in `size`.
bool slot_value(PyObject* slot, Py_ssize_t i, PyObject** value, int64_t* size) {
  PyObject *holder = nullptr, *key = nullptr;
  if (!dict_slot(slot, &holder, &key)) {
    PyErr_Format(PyExc_TypeError, "slot_stamps: slot %zd must be a (dict, key) tuple", i);
    return false;
  }
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

void prefetch_lines(const void* address, int lines) {
  for (int line = 0; line < lines; ++line) __builtin_prefetch(static_cast<const char*>(address) + 64 * line);
}

// The TensorImpls of the objects that are tensors (their Python objects already prefetched), then
// their storages: the last two levels of the prefetch passes below.
void prefetch_tensor_internals(PyObject* const* objects, Py_ssize_t count) {
  auto* tensor_class = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  std::vector<const c10::TensorImpl*> impls;
  impls.reserve(count);
  for (Py_ssize_t i = 0; i < count; ++i)
    if (PyType_IsSubtype(Py_TYPE(objects[i]), tensor_class)) {
      impls.push_back(THPVariable_Unpack(objects[i]).unsafeGetTensorImpl());
      prefetch_lines(impls.back(), 4);  // its storage, version counter and sizes
    }
  for (const c10::TensorImpl* impl : impls)
    if (impl->has_storage()) __builtin_prefetch(impl->storage().unsafeGetStorageImpl());
}

// Every read slot_stamps makes misses the caches after a forward (the op's weights went through
// them), and each slot's reads depend on one another (tuple, dict, its table, the value, its
// TensorImpl, storage): one slot at a time, the CPU mostly waits on memory. These passes walk all
// slots one level deeper each and only prefetch, so that each level's misses are in flight
// together: V3-Large's 843 slots took 100 us after a forward instead of 176 (31 us hot, not 14).
// Each object's type is checked before it is read; errors are left to the stamps' own pass.
void prefetch_slots(PyObject** slots, Py_ssize_t count, Py_ssize_t tensor_slots) {
  PyObject *holder = nullptr, *key = nullptr;
  for (Py_ssize_t i = 0; i < count; ++i) __builtin_prefetch(slots[i]);
  for (Py_ssize_t i = 0; i < count; ++i)
    if (PyTuple_Check(slots[i]) && PyTuple_GET_SIZE(slots[i]) == 2) {
      __builtin_prefetch(PyTuple_GET_ITEM(slots[i], 0));
      __builtin_prefetch(PyTuple_GET_ITEM(slots[i], 1));
    }
  for (Py_ssize_t i = 0; i < count; ++i)
    if (dict_slot(slots[i], &holder, &key)) {
      const auto* dict = reinterpret_cast<const PyDictObject*>(holder);
      prefetch_lines(dict->ma_keys, 4);  // a small dict's table: header, indices, first entries (2 to 8 lines timed the same)
      if (dict->ma_values != nullptr) __builtin_prefetch(dict->ma_values);
    }
  // The tensors: their Python objects, then their TensorImpls, then their storages. Holding the
  // values between passes (a key's __eq__ may run Python that drops one) cost more than looking
  // them up again.
  for (Py_ssize_t i = 0; i < tensor_slots; ++i) {
    PyObject* value = nullptr;
    int64_t size = 0;
    if (!slot_value(slots[i], i, &value, &size)) {
      PyErr_Clear();  // the stamps' own pass reports it
      return;
    }
    if (value != nullptr) __builtin_prefetch(value);
  }
  std::vector<PyObject*> values;
  values.reserve(tensor_slots);
  for (Py_ssize_t i = 0; i < tensor_slots; ++i) {
    dict_slot(slots[i], &holder, &key);  // every one is: the pass above checked them
    if (PyObject* value = PyDict_GetItem(holder, key); value != nullptr) values.push_back(value);
  }
  prefetch_tensor_internals(values.data(), Py_ssize_t(values.size()));
}

// The tensors' Python objects, then their TensorImpls, storages and version counters, each
// level's misses in flight together (as prefetch_slots).
void prefetch_tensors(PyObject* const* objects, Py_ssize_t count) {
  for (Py_ssize_t i = 0; i < count; ++i) __builtin_prefetch(objects[i]);
  prefetch_tensor_internals(objects, count);
}

#if PY_VERSION_HEX < 0x030E0000  // 3.14 dropped the versions
uint64_t dict_version(PyObject* dict) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"  // 3.12 and 3.13 keep it, deprecated
  return reinterpret_cast<PyDictObject*>(dict)->ma_version_tag;
#pragma GCC diagnostic pop
}
#endif

}  // namespace

bool dicts_unchanged(PyObject* const* dicts, Py_ssize_t count, const char* versions) {
#if PY_VERSION_HEX >= 0x030E0000
  (void)dicts, (void)count, (void)versions;
  return false;
#else
  for (Py_ssize_t i = 0; i < count; ++i) {
    uint64_t version = 0;
    std::memcpy(&version, versions + i * Py_ssize_t(sizeof version), sizeof version);
    if (dict_version(dicts[i]) != version) return false;
  }
  return true;
#endif
}

bool tensors_unchanged(PyObject* const* tensors, Py_ssize_t count, const char* stamps) {
  prefetch_tensors(tensors, count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    int64_t now[2], then[2];
    if (!stamp_tensor(tensors[i], now)) {  // it has no version counter now: changed
      PyErr_Clear();
      return false;
    }
    std::memcpy(then, stamps + 2 * i * Py_ssize_t(sizeof(int64_t)), sizeof then);
    if (now[0] != then[0] || now[1] != then[1]) return false;
  }
  return true;
}

PyObject* dict_versions(PyObject* /*module*/, PyObject* args) {
#if PY_VERSION_HEX >= 0x030E0000  // 3.14 dropped the versions
  (void)args;
  Py_RETURN_NONE;
#else
  PyObject* dicts = nullptr;
  if (!PyArg_ParseTuple(args, "O", &dicts)) return nullptr;
  PyObject* items = PySequence_Fast(dicts, "dict_versions takes a sequence of dicts");
  if (items == nullptr) return nullptr;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
  PyObject* versions = PyBytes_FromStringAndSize(nullptr, count * Py_ssize_t(sizeof(uint64_t)));
  if (versions != nullptr) {
    auto* values = reinterpret_cast<uint64_t*>(PyBytes_AS_STRING(versions));
    PyObject** objects = PySequence_Fast_ITEMS(items);
    for (Py_ssize_t i = 0; i < count; ++i) {
      if (!PyDict_Check(objects[i])) {
        PyErr_Format(PyExc_TypeError, "dict_versions: item %zd must be a dict", i);
        Py_CLEAR(versions);
        break;
      }
      values[i] = dict_version(objects[i]);
    }
  }
  Py_DECREF(items);
  return versions;
#endif
}

PyObject* tensor_stamps(PyObject* /*module*/, PyObject* args) {
  PyObject* tensors = nullptr;
  if (!PyArg_ParseTuple(args, "O", &tensors)) return nullptr;
  PyObject* items = PySequence_Fast(tensors, "tensor_stamps takes a sequence of tensors");
  if (items == nullptr) return nullptr;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
  PyObject* stamps = PyBytes_FromStringAndSize(nullptr, 2 * count * Py_ssize_t(sizeof(int64_t)));
  if (stamps != nullptr) {
    auto* values = reinterpret_cast<int64_t*>(PyBytes_AS_STRING(stamps));
    PyObject** objects = PySequence_Fast_ITEMS(items);
    prefetch_tensors(objects, count);
    auto* tensor_class = reinterpret_cast<PyTypeObject*>(THPVariableClass);
    for (Py_ssize_t i = 0; i < count; ++i) {
      if (!PyType_IsSubtype(Py_TYPE(objects[i]), tensor_class)) {
        PyErr_Format(PyExc_TypeError, "tensor_stamps: item %zd must be a tensor", i);
        Py_CLEAR(stamps);
        break;
      }
      if (!stamp_tensor(objects[i], values + 2 * i)) {
        Py_CLEAR(stamps);
        break;
      }
    }
  }
  Py_DECREF(items);
  return stamps;
}

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
    prefetch_slots(objects, count, tensor_slots);
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
