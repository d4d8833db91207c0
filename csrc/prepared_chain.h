#pragma once

#include <Python.h>

namespace fastmb {

// fastmb._C.prepare_chain(tensors, settings, names, stem_arguments): a capsule holding the
// fastmb::inverted_residual_chain call with those arguments (stem_arguments: () or the op's seven
// stem_* values), prepared once (cpu/inverted_residual.h). fastmb._C.run_chain(prepared, x) runs
// it on x as the op would, without the dispatcher's unboxing of the argument lists and with the
// blocks' checks made once per input size: a ForwardMemo replays a model's forward with them.
PyObject* prepare_chain(PyObject* module, PyObject* args);
PyObject* run_chain(PyObject* module, PyObject* args);

}  // namespace fastmb
