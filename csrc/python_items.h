// A Python sequence's items as C++ values, for the Python-facing functions of the prepared calls
// (prepared_chain.cpp, forward_replay.cpp).
#pragma once

#include <Python.h>

#include <c10/util/ScopeExit.h>
#include <torch/csrc/Exceptions.h>

#include <vector>

namespace fastmb {

// Each item of `sequence` through `item` (which raises on a wrong item); `what` is the error
// when it is no sequence. Items kept as PyObject* are borrowed from the sequence.
template <typename T, typename Item>
std::vector<T> items(PyObject* sequence, const char* what, const Item& item) {
  PyObject* fast = PySequence_Fast(sequence, what);
  if (fast == nullptr) throw python_error();
  const auto release = c10::make_scope_exit([fast] { Py_DECREF(fast); });
  std::vector<T> values;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(fast);
  values.reserve(count);
  for (Py_ssize_t i = 0; i < count; ++i) values.push_back(item(PySequence_Fast_GET_ITEM(fast, i)));
  return values;
}

}  // namespace fastmb
