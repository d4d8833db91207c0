#pragma once

#include <Python.h>

#include <ATen/core/Tensor.h>

namespace fastmb {
namespace cpu {
class PreparedChain;
}

// fastmb._C.prepare_chain(tensors, settings, names, stem_arguments): a capsule holding the
// fastmb::inverted_residual_chain call with those arguments (stem_arguments: () or the op's seven
// stem_* values), prepared once (cpu/inverted_residual.h). fastmb._C.run_chain(prepared, x) runs
// it on x as the op would, without the dispatcher's unboxing of the argument lists and with the
// blocks' checks made once per input size: a ForwardMemo replays a model's forward with them.
PyObject* prepare_chain(PyObject* module, PyObject* args);
PyObject* run_chain(PyObject* module, PyObject* args);

// The chain in one of prepare_chain's capsules; null, with no Python error set, for any other object.
const cpu::PreparedChain* prepared_chain_of(PyObject* capsule);
// The prepared chain on x as run_chain runs it (an event named as the op's for the profiler),
// with the GIL released by the caller.
at::Tensor run_prepared_chain(const cpu::PreparedChain& prepared, const at::Tensor& x);

}  // namespace fastmb
