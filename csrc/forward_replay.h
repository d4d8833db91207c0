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

// fastmb._C.replay_gate(default_runs_cpu, opened): what fastmb.dispatch tells the replays. The
// process-wide backend lets the CPU ops run (True or False; None: unchanged), and `opened` (+1,
// -1, 0) use_backend or record_backends blocks were opened or closed in some thread: while one is
// open, replays take the Python path, which reads the thread's own backend and records it.
PyObject* replay_gate(PyObject* module, PyObject* args);

}  // namespace fastmb
