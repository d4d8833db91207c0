"""Property-based tests (hypothesis): both fused ops and both modules, on random shapes,
geometries, activations, modes and layouts, against eager PyTorch in float64 by DESIGN.md's rule.
FASTMB_PROPERTY_EXAMPLES sets the examples per test (default 1000, about 15 s in all)."""

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmb
from fastmb.ops.activations import ACTIVATIONS, GATES
from oracle import EagerSqueezeExcitation, assert_close_to_oracle, clone_as, eager_dwconv_bn_act, randomize_batch_norm, run

EXAMPLES = int(os.environ.get("FASTMB_PROPERTY_EXAMPLES", "1000"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
FORMATS = [torch.contiguous_format, torch.channels_last]


@st.composite
def dwconv_cases(draw):
    kernel = draw(st.integers(1, 7))
    stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    padding = draw(st.integers(0, (kernel - 1) * dilation))
    training = draw(st.booleans())
    n, c = draw(st.integers(0 if not training else 1, 3)), draw(st.integers(1, 20))
    extent = (kernel - 1) * dilation + 1 - 2 * padding  # the smallest input with an output
    h, w = draw(st.integers(max(1, extent), 14)), draw(st.integers(max(1, extent), 14))
    ho, wo = (h + 2 * padding - (kernel - 1) * dilation - 1) // stride + 1, (w + 2 * padding - (kernel - 1) * dilation - 1) // stride + 1
    if training and n * ho * wo < 2:  # batch norm needs two values per channel in training
        n = 2
    return {
        "shape": (n, c, h, w), "kernel": kernel, "stride": stride, "dilation": dilation, "padding": padding,
        "activation": draw(st.sampled_from(list(ACTIVATIONS))), "training": training,
        "format": draw(st.sampled_from(FORMATS)), "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        "momentum": draw(st.sampled_from([0.1, None])), "seed": draw(st.integers(0, 2**16)),
    }  # fmt: skip


def dwconv_pair(case: dict):
    eager = eager_dwconv_bn_act(case["shape"][1], case["kernel"], case["stride"], case["dilation"], case["activation"], case["momentum"])
    eager[0].padding = (case["padding"], case["padding"])
    fused = fastmb.nn.DWConvBNAct(case["shape"][1], case["kernel"], case["stride"], case["dilation"], case["activation"],
                                  momentum=case["momentum"])  # fmt: skip
    fused[0].padding = (case["padding"], case["padding"])
    randomize_batch_norm(eager)
    fused.load_state_dict(eager.state_dict())
    return eager.train(case["training"]), fused.train(case["training"])


def check(eager, fused, x: torch.Tensor, dtype: torch.dtype, memory_format, grad: bool = True) -> None:
    """DESIGN's rule against the same computation in float64 on the same inputs: x, the
    parameters and grad_y rounded to `dtype` first (else the rounding of the inputs alone moves
    values across an activation's kink, where its derivative jumps, in any low-precision run)."""
    g = torch.randn(clone_as(eager, torch.float64)(x.double()).shape) if grad and x.numel() else None
    x = x.to(dtype)
    oracle = run(clone_as(clone_as(eager, dtype), torch.float64), x.double(), None if g is None else g.to(dtype).double())
    baseline = run(clone_as(eager, dtype, memory_format), x.to(dtype).contiguous(memory_format=memory_format), g)
    actual = run(clone_as(fused, dtype, memory_format), x.to(dtype).contiguous(memory_format=memory_format), g)
    assert_close_to_oracle(actual, baseline, oracle, dtype)


@SETTINGS
@given(case=dwconv_cases())
def test_dwconv_bn_act(case):
    torch.manual_seed(case["seed"])
    eager, fused = dwconv_pair(case)
    x = torch.randn(case["shape"]) * 2 + 0.5
    check(eager, fused, x, case["dtype"], case["format"], grad=case["shape"][0] > 0)


@st.composite
def se_cases(draw):
    return {
        "shape": (draw(st.integers(1, 3)), draw(st.integers(1, 24)), draw(st.integers(1, 9)), draw(st.integers(1, 9))),
        "squeeze": draw(st.integers(1, 12)), "activation": draw(st.sampled_from(list(ACTIVATIONS))),
        "gate": draw(st.sampled_from(list(GATES))), "format": draw(st.sampled_from(FORMATS)),
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])), "seed": draw(st.integers(0, 2**16)),
    }  # fmt: skip


@SETTINGS
@given(case=se_cases())
def test_squeeze_excitation(case):
    torch.manual_seed(case["seed"])
    eager = EagerSqueezeExcitation(case["shape"][1], case["squeeze"], case["activation"], case["gate"])
    fused = fastmb.nn.SqueezeExcitation(case["shape"][1], case["squeeze"], case["activation"], case["gate"])
    fused.load_state_dict(eager.state_dict())
    check(eager, fused, torch.randn(case["shape"]), case["dtype"], case["format"])


@SETTINGS
@given(cases=st.lists(dwconv_cases(), min_size=2, max_size=4))
def test_module_sequences(cases):
    """One module through a sequence of calls: each call's mode and input differ, so running
    statistics and num_batches_tracked carry over from call to call as in eager."""
    torch.manual_seed(cases[0]["seed"])
    first = dict(cases[0], dtype=torch.float32)
    eager, fused = dwconv_pair(first)
    eager, fused = eager.double(), fused.double()  # float64 throughout: the statistics must match exactly
    for case in cases:
        n, _, h, w = case["shape"]
        h, w = first["shape"][2] + h % 5, first["shape"][3] + w % 5  # at least the first case's size, so the output is not empty
        span, stride = (first["kernel"] - 1) * first["dilation"] + 1, first["stride"]
        outputs = n * ((h + 2 * first["padding"] - span) // stride + 1) * ((w + 2 * first["padding"] - span) // stride + 1)
        training = case["training"] and outputs > 1  # batch norm needs two values per channel in training
        eager.train(training), fused.train(training)
        x = torch.randn(n, first["shape"][1], h, w, dtype=torch.float64)
        with torch.no_grad():
            expected, actual = eager(x), fused(x)
        torch.testing.assert_close(actual, expected, atol=1e-9, rtol=1e-9)
    for (name, a), (_, b) in zip(eager.state_dict().items(), fused.state_dict().items()):
        torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-9, msg=name)
