"""The CPU output cache (csrc/output_cache.cpp): an op's output of 1 MiB or more reuses the block
an earlier output of its size released. Each test fills the first call's outputs with NaN before
releasing them, so a kernel that left any value of a reused block unwritten fails."""

import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fastmb

pytestmark = pytest.mark.skipif(not fastmb._extension.has_kernel("batch_norm_act", "CPU"), reason="the native CPU operators were not built")

MIB_OF_FLOATS = 2**18


def assert_reuses_poisoned_blocks(run: Callable[[], list[torch.Tensor]]) -> None:
    """run() twice: the second call's outputs equal the first's although they are written into
    the first's blocks, NaN-filled and released in between."""
    # No name may keep a first output alive past `del` (a loop variable, pytest's rewrite of an
    # assert over them): only comprehensions see them.
    first = run()
    large = all([t.numel() >= MIB_OF_FLOATS for t in first])
    assert large
    expected = [t.clone() for t in first]
    blocks = {t.data_ptr() for t in first}
    with torch.no_grad():
        [t.fill_(float("nan")) for t in first]
    del first
    second = run()
    assert blocks & {t.data_ptr() for t in second}, "no output reused a released block"
    for ours, theirs in zip(second, expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_batch_norm_act_outputs_reuse_released_blocks():
    z = torch.randn(2, 32, 64, 64).contiguous(memory_format=torch.channels_last)
    gamma, beta, grad_y = torch.rand(32) + 0.5, torch.randn(32), torch.randn_like(z)

    def run() -> list[torch.Tensor]:
        y, mean, var = torch.ops.fastmb.batch_norm_act(z, gamma, beta, 1e-5, "hardswish")
        grad_z, _, _ = torch.ops.fastmb.batch_norm_act_backward(grad_y, z, gamma, beta, mean, var, 1e-5, "hardswish", [True, True])
        return [y, grad_z]

    assert_reuses_poisoned_blocks(run)


def test_stem_output_reuses_released_blocks():
    x, weight, gamma, beta = torch.randn(2, 3, 128, 128), torch.randn(32, 3, 3, 3), torch.rand(32) + 0.5, torch.randn(32)
    assert_reuses_poisoned_blocks(lambda: [torch.ops.fastmb.stem_conv_bn_act(x, weight, gamma, beta, [2, 2], [1, 1], [1, 1], 1e-5, "relu")[0]])


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "contiguous"])
def test_fused_ops_outputs_and_input_grads_reuse_released_blocks(memory_format):
    """The depthwise and SE ops in training, forward and backward, through the public ops."""
    x = torch.randn(2, 32, 64, 64).contiguous(memory_format=memory_format)
    dw_weight, gamma, beta = torch.randn(32, 1, 3, 3), torch.rand(32) + 0.5, torch.randn(32)
    fc1_weight, fc1_bias, fc2_weight, fc2_bias = torch.randn(8, 32), torch.randn(8), torch.randn(32, 8), torch.randn(32)

    def run() -> list[torch.Tensor]:
        leaf = x.detach().requires_grad_()
        with fastmb.use_backend("cpu"):
            y = fastmb.ops.dwconv_bn_act(leaf, dw_weight, gamma, beta, training=True, activation="relu")
            out = fastmb.ops.squeeze_excitation(y, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        out.backward(torch.ones_like(out))
        return [y.detach(), out.detach(), leaf.grad]

    assert_reuses_poisoned_blocks(run)


def test_threads_taking_and_releasing_blocks_at_once():
    """Python threads (the ops release the GIL) allocating and releasing same-size outputs."""
    z = torch.randn(2, 32, 64, 64).contiguous(memory_format=torch.channels_last)
    expected = torch.ops.fastmb.batch_norm_act(z, None, None, 1e-5, "relu6")[0].clone()

    def work(_: int) -> bool:
        return all(torch.equal(torch.ops.fastmb.batch_norm_act(z, None, None, 1e-5, "relu6")[0], expected) for _ in range(20))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(4)))


def test_forked_child_allocates():
    """A child forked from a process whose cache holds blocks takes and releases them itself."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    z = torch.randn(2, 32, 64, 64).contiguous(memory_format=torch.channels_last)
    expected = torch.ops.fastmb.batch_norm_act(z, None, None, 1e-5, "relu")[0].clone()
    pid = os.fork()
    if pid == 0:  # the child, on one thread (no OpenMP team across fork): exit status 0 if right
        torch.set_num_threads(1)
        outputs = [torch.ops.fastmb.batch_norm_act(z, None, None, 1e-5, "relu")[0] for _ in range(3)]  # statistics summed on one thread
        ok = all(torch.allclose(y, expected, rtol=1e-5, atol=1e-5) for y in outputs)
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish in 60 s")
    assert os.WIFEXITED(done[1]) and os.WEXITSTATUS(done[1]) == 0


def test_empty_cache_frees_idle_blocks_only():
    z = torch.randn(2, 32, 64, 64).contiguous(memory_format=torch.channels_last)
    kept = torch.ops.fastmb.batch_norm_act(z, None, None, 1e-5, "relu")[0]
    torch.ops.fastmb.batch_norm_act(z, None, None, 1e-5, "relu")  # its output released at once
    assert fastmb.empty_cache() >= z.numel() * z.element_size()
    assert fastmb.empty_cache() == 0
    del kept  # a block in use when the cache was emptied is kept for reuse when released
    assert fastmb.empty_cache() >= z.numel() * z.element_size()
