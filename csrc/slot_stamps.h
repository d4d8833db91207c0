#pragma once

#include <Python.h>

namespace fastmb {

// fastmb._C.slot_stamps(slots, tensor_slots): bytes with an int64 per (dict, key) slot, the address
// of the value held at key (0 when absent), and for each of the first `tensor_slots` two more, a
// tensor's data address and version counter (0 for anything else); for (dict, None), the dict's
// size. The fused CPU forwards compare what their plans were made from with it (modules'
// parameters, buffers, children, settings, hooks): one C loop where Python reads took 0.25-0.35
// ms a forward at batch 1, each read a cache miss once the op's weights have passed through the
// caches. The other slots' values are not read, for the same reason.
PyObject* slot_stamps(PyObject* module, PyObject* args);

// fastmb._C.dict_versions(dicts): bytes with each dict's version (PEP 509: CPython 3.11-3.13 give
// every dict a new one at each change to it), or None where the interpreter keeps none. One read
// per dict: where no watched dict has changed, the watch checks its tensors alone.
PyObject* dict_versions(PyObject* module, PyObject* args);

// fastmb._C.tensor_stamps(tensors): bytes with each tensor's data address and version counter.
PyObject* tensor_stamps(PyObject* module, PyObject* args);

// Whether each of `count` dicts still has the version dict_versions gave (`versions`), and each
// tensor the stamp tensor_stamps gave (`stamps`): a Watch's short check, for callers in C++ (a
// ForwardMemo's replay, forward_replay.cpp). The objects must be those the bytes were taken from,
// and the dicts' first lines are best prefetched (each a miss after a forward). Needs the GIL;
// sets no Python error.
bool dicts_unchanged(PyObject* const* dicts, Py_ssize_t count, const char* versions);
bool tensors_unchanged(PyObject* const* tensors, Py_ssize_t count, const char* stamps);

}  // namespace fastmb
