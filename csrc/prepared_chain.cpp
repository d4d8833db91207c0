// fastmb._C.prepare_chain and run_chain (prepared_chain.h), apart from fastmb.cpp for the same
// reason as slot_stamps.cpp: torch's Python headers take seconds to compile.
#include "prepared_chain.h"

#include <ATen/record_function.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <c10/util/ScopeExit.h>

#include <optional>
#include <string>
#include <vector>

#include "cpu/inverted_residual.h"
#include "python_items.h"

namespace fastmb {
namespace {

constexpr const char* kCapsule = "fastmb.PreparedChain";

at::Tensor tensor(PyObject* value, const char* what) {
  TORCH_CHECK_TYPE(THPVariable_Check(value), "prepare_chain: ", what, " must be a tensor, got ", Py_TYPE(value)->tp_name);
  return THPVariable_Unpack(value);
}
std::optional<at::Tensor> optional_tensor(PyObject* value, const char* what) {
  if (value == Py_None) return std::nullopt;
  return tensor(value, what);
}
int64_t integer(PyObject* value) {
  const long long v = PyLong_AsLongLong(value);
  if (v == -1 && PyErr_Occurred()) throw python_error();
  return v;
}
std::string text(PyObject* value) {
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(value, &size);
  if (data == nullptr) throw python_error();
  return {data, size_t(size)};
}
std::vector<int64_t> integers(PyObject* sequence) { return items<int64_t>(sequence, "prepare_chain: expected a list of ints", integer); }

void delete_prepared(PyObject* capsule) { delete static_cast<cpu::PreparedChain*>(PyCapsule_GetPointer(capsule, kCapsule)); }

}  // namespace

PyObject* prepare_chain(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *tensors = nullptr, *settings = nullptr, *names = nullptr, *stem_arguments = nullptr;
  if (!PyArg_ParseTuple(args, "OOOO", &tensors, &settings, &names, &stem_arguments)) return nullptr;
  cpu::ChainStem stem;
  PyObject* stem_values = PySequence_Fast(stem_arguments, "prepare_chain: stem_arguments must be a sequence");
  if (stem_values == nullptr) return nullptr;
  const auto release = c10::make_scope_exit([stem_values] { Py_DECREF(stem_values); });  // its items are borrowed
  const Py_ssize_t stem_count = PySequence_Fast_GET_SIZE(stem_values);
  TORCH_CHECK_VALUE(stem_count == 0 || stem_count == 7, "prepare_chain: stem_arguments must be () or the op's seven stem_* values, got ",
                    stem_count);
  if (stem_count == 7) {
    PyObject** value = PySequence_Fast_ITEMS(stem_values);
    stem.weight = optional_tensor(value[0], "stem_weight");
    stem.scale = optional_tensor(value[1], "stem_scale");
    stem.shift = optional_tensor(value[2], "stem_shift");
    stem.stride = integers(value[3]), stem.padding = integers(value[4]), stem.dilation = integers(value[5]);
    stem.activation = text(value[6]);
  }
  auto prepared = std::make_unique<cpu::PreparedChain>(
      items<std::optional<at::Tensor>>(tensors, "prepare_chain: tensors must be a sequence",
                                       [](PyObject* v) { return optional_tensor(v, "each of tensors"); }),
      integers(settings), items<std::string>(names, "prepare_chain: names must be a sequence", text), std::move(stem));
  PyObject* capsule = PyCapsule_New(prepared.get(), kCapsule, delete_prepared);
  if (capsule != nullptr) prepared.release();
  return capsule;
  END_HANDLE_TH_ERRORS
}

const cpu::PreparedChain* prepared_chain_of(PyObject* capsule) {
  return PyCapsule_IsValid(capsule, kCapsule) ? static_cast<const cpu::PreparedChain*>(PyCapsule_GetPointer(capsule, kCapsule)) : nullptr;
}

at::Tensor run_prepared_chain(const cpu::PreparedChain& prepared, const at::Tensor& x) {
  RECORD_FUNCTION("fastmb::inverted_residual_chain", std::vector<c10::IValue>{});
  return prepared.run(x);
}

PyObject* run_chain(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *capsule = nullptr, *x = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &capsule, &x)) return nullptr;
  const auto* prepared = static_cast<const cpu::PreparedChain*>(PyCapsule_GetPointer(capsule, kCapsule));
  if (prepared == nullptr) return nullptr;  // not one of prepare_chain's: its error is set
  TORCH_CHECK_TYPE(THPVariable_Check(x), "run_chain: x must be a tensor, got ", Py_TYPE(x)->tp_name);
  const at::Tensor input = THPVariable_Unpack(x);
  at::Tensor y;
  {
    // Other Python threads run meanwhile, as they do while an op runs.
    const pybind11::gil_scoped_release no_gil;
    y = run_prepared_chain(*prepared, input);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

}  // namespace fastmb
