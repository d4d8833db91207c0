#pragma once

#include <Python.h>

namespace fastmb {

// fastmb._C.prepare_replay(in_channels, steps): a capsule holding a ForwardMemo's op calls as one
// native call, each step ("chain", prepare_chain's capsule, whether it has a stem) or ("head",
// the classifier_head op's arguments after x). fastmb._C.replay(replay, check, x) runs it after
// the Watch's short check (check: Watch.short_check()): the output, or None where the Python path
// must decide (x or the thread's state is not what the replay covers, or a watched dict or
// tensor changed). The Python memo spent 50-110 us a forward at batch 1 around the op calls,
// every line out of cache after the weights went through it.
PyObject* prepare_replay(PyObject* module, PyObject* args);
PyObject* replay(PyObject* module, PyObject* args);

// fastmb._C.replay_backend(default_runs_cpu, thread_runs_cpu, recording): what fastmb.dispatch
// tells the replays, which cannot read its Python state cheaply: whether the process-wide backend
// runs the CPU ops (a bool, or None: unchanged), this thread's use_backend choice (-1 none, 0
// another backend, 1 auto or cpu; None: unchanged), and record_backends blocks opened (+1) or
// closed (-1) in this thread, during which replays leave the forward to the Python path, which
// records its backend. Returns this thread's previous choice, for use_backend to restore.
PyObject* replay_backend(PyObject* module, PyObject* args);

}  // namespace fastmb
