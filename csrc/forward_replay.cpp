// fastmb._C.prepare_replay, replay and replay_backend (forward_replay.h), apart from fastmb.cpp for
// the same reason as slot_stamps.cpp: torch's Python headers take seconds to compile.
#include "forward_replay.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/util/ScopeExit.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "cpu/classifier_head.h"
#include "prepared_chain.h"
#include "python_items.h"
#include "slot_stamps.h"

namespace fastmb {
namespace {

constexpr const char* kCapsule = "fastmb.ForwardReplay";

// What fastmb.dispatch chose (replay_backend): whether the process-wide backend runs the CPU ops;
// this thread's use_backend choice (-1 none, 0 another backend, 1 auto or cpu); and how many
// record_backends blocks this thread has open.
std::atomic<bool> default_backend_runs_cpu{true};
thread_local int thread_backend_runs_cpu = -1;
thread_local int64_t recording_blocks = 0;

PyObject* borrowed(PyObject* value) { return value; }

at::Tensor tensor_of(PyObject* value, const char* what) {
  TORCH_CHECK_TYPE(THPVariable_Check(value), "prepare_replay: ", what, " must be a tensor, got ", Py_TYPE(value)->tp_name);
  return THPVariable_Unpack(value);
}

std::string text_of(PyObject* value, const char* what) {
  TORCH_CHECK_TYPE(PyUnicode_Check(value), "prepare_replay: ", what, " must be a str, got ", Py_TYPE(value)->tp_name);
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(value, &size);
  if (data == nullptr) throw python_error();
  return {data, size_t(size)};
}

// A chain op call: prepare_chain's capsule (held), and whether the chain starts with a stem (which
// reads the image in any layout; the blocks take channels_last).
struct ChainStep {
  PyObject* capsule;
  const cpu::PreparedChain* chain;
  bool stem;
  at::Tensor run(const at::Tensor& x) const { return run_prepared_chain(*chain, stem ? x : x.contiguous(at::MemoryFormat::ChannelsLast)); }
};

// A classifier_head op call, its arguments held.
struct HeadStep {
  at::Tensor conv_weight, conv_bias;
  std::string conv_activation;
  std::vector<at::Tensor> fc_weights, fc_biases;
  std::vector<std::string> fc_activations;
  std::optional<at::Tensor> fc1_by_groups;
  at::Tensor run(const at::Tensor& x) const {
    RECORD_FUNCTION("fastmb::classifier_head", std::vector<c10::IValue>{});
    return cpu::classifier_head(x.contiguous(at::MemoryFormat::ChannelsLast), conv_weight, conv_bias, conv_activation, fc_weights,
                                fc_biases, fc_activations, fc1_by_groups);
  }
};

HeadStep head_step(PyObject* arguments) {
  const std::vector<PyObject*> values = items<PyObject*>(arguments, "prepare_replay: a head step's arguments must be a sequence", borrowed);
  TORCH_CHECK_VALUE(values.size() == 7, "prepare_replay: a head step takes classifier_head's 7 arguments after x, got ", values.size());
  const auto tensor_in = [](const char* what) { return [what](PyObject* value) { return tensor_of(value, what); }; };
  HeadStep head{tensor_of(values[0], "conv_weight"), tensor_of(values[1], "conv_bias"), text_of(values[2], "conv_activation")};
  head.fc_weights = items<at::Tensor>(values[3], "prepare_replay: fc_weights must be a sequence", tensor_in("each of fc_weights"));
  head.fc_biases = items<at::Tensor>(values[4], "prepare_replay: fc_biases must be a sequence", tensor_in("each of fc_biases"));
  head.fc_activations = items<std::string>(values[5], "prepare_replay: fc_activations must be a sequence",
                                           [](PyObject* value) { return text_of(value, "each of fc_activations"); });
  if (values[6] != Py_None) head.fc1_by_groups = tensor_of(values[6], "fc1_by_groups");
  return head;
}

// The key set of a dense CPU tensor (an inference tensor's is a part of it): a tensor with any
// other key (a negative or conjugate view, sparse, functorch's or functionalization's wrappers)
// goes through the dispatcher, which handles it.
c10::DispatchKeySet dense_cpu_keys() {
  return c10::DispatchKeySet(c10::DispatchKey::CPU) | c10::getAutogradRelatedKeySetFromBackend(c10::BackendComponent::CPUBit) |
         c10::getAutocastRelatedKeySetFromBackend(c10::BackendComponent::CPUBit);
}

// The watch's short check (Watch.short_check): its dicts and their versions (dict_versions'
// bytes), its tensors and their stamps (tensor_stamps' bytes), each checked here: the tuple comes
// from Python at every call. Held by the memo, not by the capsule: the dicts hold the memo, and a
// capsule's references are invisible to the garbage collector (a model and its memo would never
// be freed).
bool check_unchanged(PyObject* check) {
  TORCH_CHECK_TYPE(PyTuple_Check(check) && PyTuple_GET_SIZE(check) == 4, "replay: check must be Watch.short_check()'s 4-tuple");
  PyObject *dicts = PyTuple_GET_ITEM(check, 0), *versions = PyTuple_GET_ITEM(check, 1), *tensors = PyTuple_GET_ITEM(check, 2),
           *stamps = PyTuple_GET_ITEM(check, 3);
  TORCH_CHECK_TYPE(PyTuple_Check(dicts) && PyTuple_Check(tensors) && PyBytes_Check(versions) && PyBytes_Check(stamps),
                   "replay: check must hold (tuple of dicts, bytes, tuple of tensors, bytes)");
  const Py_ssize_t dict_count = PyTuple_GET_SIZE(dicts), tensor_count = PyTuple_GET_SIZE(tensors);
  TORCH_CHECK_VALUE(PyBytes_GET_SIZE(versions) == dict_count * Py_ssize_t(sizeof(uint64_t)) &&
                        PyBytes_GET_SIZE(stamps) == tensor_count * 2 * Py_ssize_t(sizeof(int64_t)),
                    "replay: check's bytes must hold 8 bytes a dict and 16 a tensor");
  PyObject** dict_items = &PyTuple_GET_ITEM(dicts, 0);
  PyObject** tensor_items = &PyTuple_GET_ITEM(tensors, 0);
  // Each object out of cache after a forward (V3-Large: 1375 dicts, 266 tensors): all their first
  // lines in flight before the type checks.
  for (Py_ssize_t i = 0; i < dict_count; ++i) __builtin_prefetch(dict_items[i]);
  for (Py_ssize_t i = 0; i < tensor_count; ++i) __builtin_prefetch(tensor_items[i]);
  for (Py_ssize_t i = 0; i < dict_count; ++i) TORCH_CHECK_TYPE(PyDict_Check(dict_items[i]), "replay: check's dicts must be dicts");
  for (Py_ssize_t i = 0; i < tensor_count; ++i) TORCH_CHECK_TYPE(THPVariable_Check(tensor_items[i]), "replay: check's tensors must be tensors");
  return dicts_unchanged(dict_items, dict_count, PyBytes_AS_STRING(versions)) &&
         tensors_unchanged(tensor_items, tensor_count, PyBytes_AS_STRING(stamps));
}

class Replay {
 public:
  Replay(int64_t in_channels, std::vector<std::variant<ChainStep, HeadStep>> steps) : in_channels_(in_channels), steps_(std::move(steps)) {}
  Replay(const Replay&) = delete;
  Replay& operator=(const Replay&) = delete;
  ~Replay() {  // the capsule's destructor: with the GIL
    for (const auto& step : steps_)
      if (const auto* chain = std::get_if<ChainStep>(&step)) Py_DECREF(chain->capsule);
  }

  // Whether the replay may take x here, as the Python path's checks (eval_op_applies,
  // runs_composite) would let it: exactly a torch.Tensor (fake, functional and other subclasses
  // take the Python path), dense float32 CPU (N, in_channels, H, W), no autograd, autocast, JIT
  // trace, functorch transform or other dispatch key forced in this thread, dispatch or
  // torch-function mode (which see the op calls the Python path makes) or forward-AD tangent, and
  // the CPU ops chosen for this thread, which records no backends (the Python path notes them).
  bool takes(PyObject* object) const {
    if (Py_TYPE(object) != reinterpret_cast<PyTypeObject*>(THPVariableClass)) return false;
    const bool runs_cpu = thread_backend_runs_cpu >= 0 ? thread_backend_runs_cpu == 1 : default_backend_runs_cpu.load(std::memory_order_relaxed);
    if (!runs_cpu || recording_blocks > 0) return false;
    if (at::GradMode::is_enabled() || at::autocast::is_autocast_enabled(at::kCPU) || torch::jit::tracer::isTracing()) return false;
    // BackendSelect and ADInplaceOrView are included by default (the latter not in inference mode).
    static const c10::DispatchKeySet forced_by_default{c10::DispatchKey::BackendSelect, c10::DispatchKey::ADInplaceOrView};
    if (!forced_by_default.isSupersetOf(c10::impl::tls_local_dispatch_key_set().included_) || c10::impl::dispatch_mode_enabled() ||
        at::impl::PythonTorchFunctionTLS::stack_len() > 0)
      return false;
    static const c10::DispatchKeySet dense = dense_cpu_keys();
    const at::Tensor& x = THPVariable_Unpack(object);
    return x.defined() && dense.isSupersetOf(x.key_set()) && x.layout() == at::kStrided && x.scalar_type() == at::kFloat && x.dim() == 4 &&
           x.size(1) == in_channels_ && !x._fw_grad(/*level=*/0).defined();
  }

  at::Tensor run(at::Tensor x) const {
    for (const auto& step : steps_) x = std::visit([&x](const auto& call) { return call.run(x); }, step);
    return x;
  }

 private:
  int64_t in_channels_;
  std::vector<std::variant<ChainStep, HeadStep>> steps_;
};

void delete_replay(PyObject* capsule) { delete static_cast<Replay*>(PyCapsule_GetPointer(capsule, kCapsule)); }

}  // namespace

PyObject* prepare_replay(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* steps = nullptr;
  long long in_channels = 0;
  if (!PyArg_ParseTuple(args, "LO", &in_channels, &steps)) return nullptr;
  std::vector<std::variant<ChainStep, HeadStep>> step_items;
  bool made = false;
  const auto release = c10::make_scope_exit([&] {  // the capsules taken, if no Replay holds them
    if (made) return;
    for (const auto& step : step_items)
      if (const auto* chain = std::get_if<ChainStep>(&step)) Py_DECREF(chain->capsule);
  });
  for (PyObject* step : items<PyObject*>(steps, "prepare_replay: steps must be a sequence", borrowed)) {
    TORCH_CHECK_TYPE(PyTuple_Check(step) && PyTuple_GET_SIZE(step) >= 2, "prepare_replay: each step must be a (kind, ...) tuple");
    const std::string kind = text_of(PyTuple_GET_ITEM(step, 0), "a step's kind");
    if (kind == "chain") {
      TORCH_CHECK_VALUE(PyTuple_GET_SIZE(step) == 3, "prepare_replay: a chain step is (\"chain\", capsule, stem)");
      PyObject* capsule = PyTuple_GET_ITEM(step, 1);
      const cpu::PreparedChain* chain = prepared_chain_of(capsule);
      TORCH_CHECK_TYPE(chain != nullptr, "prepare_replay: a chain step's capsule must be prepare_chain's");
      Py_INCREF(capsule);
      step_items.emplace_back(ChainStep{capsule, chain, PyObject_IsTrue(PyTuple_GET_ITEM(step, 2)) == 1});
    } else {
      TORCH_CHECK_VALUE(kind == "head" && PyTuple_GET_SIZE(step) == 2, "prepare_replay: a step is (\"chain\", capsule, stem) or (\"head\", arguments)");
      step_items.emplace_back(head_step(PyTuple_GET_ITEM(step, 1)));
    }
  }
  auto prepared = std::make_unique<Replay>(in_channels, std::move(step_items));
  made = true;
  PyObject* capsule = PyCapsule_New(prepared.get(), kCapsule, delete_replay);
  if (capsule != nullptr) prepared.release();
  return capsule;
  END_HANDLE_TH_ERRORS
}

PyObject* replay(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *capsule = nullptr, *check = nullptr, *x = nullptr;
  if (!PyArg_ParseTuple(args, "OOO", &capsule, &check, &x)) return nullptr;
  const auto* prepared = static_cast<const Replay*>(PyCapsule_GetPointer(capsule, kCapsule));
  if (prepared == nullptr) return nullptr;  // not one of prepare_replay's: its error is set
  if (!prepared->takes(x) || !check_unchanged(check)) Py_RETURN_NONE;
  const at::Tensor input = THPVariable_Unpack(x);
  at::Tensor y;
  {
    // Other Python threads run meanwhile, as they do while an op runs.
    const pybind11::gil_scoped_release no_gil;
    y = prepared->run(input);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyObject* replay_backend(PyObject* /*module*/, PyObject* args) {
  PyObject *default_runs_cpu = nullptr, *thread_runs_cpu = nullptr;
  long long recording = 0;
  if (!PyArg_ParseTuple(args, "OOL", &default_runs_cpu, &thread_runs_cpu, &recording)) return nullptr;
  const int previous = thread_backend_runs_cpu;
  if (default_runs_cpu != Py_None) default_backend_runs_cpu.store(PyObject_IsTrue(default_runs_cpu) == 1);
  if (thread_runs_cpu != Py_None) {
    const long state = PyLong_AsLong(thread_runs_cpu);
    if (state == -1 && PyErr_Occurred()) return nullptr;
    thread_backend_runs_cpu = int(std::clamp<long>(state, -1, 1));
  }
  recording_blocks += recording;
  return PyLong_FromLong(previous);
}

}  // namespace fastmb
