"""fastmb.ops.squeeze_excitation against the float64 eager oracle, on every available backend."""

import pytest
import torch

import fastmb
from fastmb.nn import SqueezeExcitation
from fastmb import dispatch
from oracle import EagerSqueezeExcitation, assert_close_to_oracle, clone_as, run

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = [torch.contiguous_format, torch.channels_last]


def compare(shape, squeeze, activation, gate, dtype, memory_format, device):
    eager = EagerSqueezeExcitation(shape[1], squeeze, activation, gate)
    fused = SqueezeExcitation(shape[1], squeeze, activation, gate)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(shape) * 2 + 0.5
    grad = torch.randn(shape)
    oracle = run(clone_as(eager, torch.float64), x.double(), grad.double())
    inputs = (x.to(device, dtype, memory_format=memory_format), grad.to(device))
    baseline = run(clone_as(eager, dtype).to(device), *inputs)
    actual = run(clone_as(fused, dtype).to(device), *inputs)
    assert actual["y"].dtype == dtype
    for fmt in FORMATS:
        assert actual["y"].is_contiguous(memory_format=fmt) == baseline["y"].is_contiguous(memory_format=fmt)
    assert_close_to_oracle(actual, baseline, oracle, dtype)


@pytest.mark.parametrize(
    "activation, gate", [("relu", "hardsigmoid"), ("hardswish", "sigmoid"), ("relu6", "hardsigmoid"), ("silu", "sigmoid"), ("gelu", "sigmoid")]
)
@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_eager(backend, device, dtype, memory_format, activation, gate):
    compare((3, 16, 7, 7), 8, activation, gate, dtype, memory_format, device)


@pytest.mark.parametrize("shape, squeeze", [((0, 8, 5, 5), 4), ((2, 1, 3, 3), 1), ((3, 13, 1, 1), 7), ((1, 24, 2, 17), 8)], ids=str)
def test_odd_shapes(backend, device, shape, squeeze):
    compare(shape, squeeze, "relu", "hardsigmoid", torch.float32, torch.contiguous_format, device)
    compare(shape, squeeze, "relu", "hardsigmoid", torch.float32, torch.channels_last, device)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_channels_and_many_pixels(backend, device, dtype, batch):
    """131 channels (vectors and a tail; on 2 threads the CPU means take blocks of 64 channels
    at batch 1, whole images at batch 2), a squeeze of 37 (FC rows with vector tails), 323
    pixels (more than one partial sum per mean)."""
    compare((batch, 131, 17, 19), 37, "hardswish", "hardsigmoid", dtype, torch.channels_last, device)


def test_non_contiguous_input(backend, device):
    eager = EagerSqueezeExcitation(6, 3)
    fused = SqueezeExcitation(6, 3)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, 12, 9, 20)[:, ::2, :, ::2]
    grad = torch.randn(2, 6, 9, 10)
    oracle = run(clone_as(eager, torch.float64), x.double(), grad.double())
    baseline = run(eager.to(device), x.to(device), grad.to(device))
    assert_close_to_oracle(run(fused.to(device), x.to(device), grad.to(device)), baseline, oracle, torch.float32)


def test_fp32_weights_with_half_input(backend, device):
    """Mixed precision as autocast leaves it: fp16/bf16 activations, fp32 parameters."""
    eager = EagerSqueezeExcitation(8, 4)
    fused = SqueezeExcitation(8, 4).to(device)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, 8, 5, 5)
    expected = eager.double()(x.double())
    lower = torch.bfloat16 if device == "cpu" else torch.float16
    actual = fused(x.to(device, lower))
    assert actual.dtype == lower
    torch.testing.assert_close(actual.double().cpu(), expected, atol=5e-2, rtol=2e-2)


def test_nan_propagates_like_eager(backend, device):
    eager = EagerSqueezeExcitation(4, 2)
    fused = SqueezeExcitation(4, 2).to(device)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, 4, 3, 3)
    x[1, 2, 1, 1] = float("nan")
    expected, actual = eager(x), fused(x.to(device)).cpu()
    torch.testing.assert_close(actual.isnan(), expected.isnan())
    torch.testing.assert_close(actual[~expected.isnan()], expected[~expected.isnan()])


@pytest.mark.parametrize(
    "activation, gate", [("relu", "hardsigmoid"), ("hardswish", "sigmoid"), ("identity", "sigmoid"), ("silu", "sigmoid"), ("gelu_tanh", "hardsigmoid")]
)
@pytest.mark.parametrize("biases", [True, False])
def test_gradcheck(backend, device, activation, gate, biases):
    options = {"dtype": torch.float64, "device": device, "requires_grad": True}
    x = torch.randn(2, 6, 4, 3, **options)
    weights = [torch.randn(3, 6, **options), torch.randn(3, **options) if biases else None]
    weights += [torch.randn(6, 3, 1, 1, **options), torch.randn(6, **options) if biases else None]
    inputs = [t for t in (x, *weights) if t is not None]

    def fn(*tensors):
        it = iter(tensors)
        args = [next(it) if t is not None else None for t in (x, *weights)]
        return fastmb.ops.squeeze_excitation(*args, activation=activation, gate=gate)

    # Fast mode (one random projection of the Jacobian) where each call is interpreted Triton.
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton")


def test_opcheck(backend, device, opcheck_utils):
    """torch.library.opcheck on the backend's registered operators (native, Triton, reference)."""
    kernel = dispatch.kernels("squeeze_excitation")[backend]
    x = torch.randn(2, 6, 5, 4, device=device, requires_grad=True)
    weights = [torch.randn(3, 6, device=device, requires_grad=True), torch.randn(3, device=device, requires_grad=True)]
    weights += [torch.randn(6, 3, device=device, requires_grad=True), None]
    args = (x, *weights, "hardswish", "hardsigmoid")
    torch.library.opcheck(kernel.forward, args, test_utils=opcheck_utils)
    y, pooled = kernel.forward(*args)
    detached = [None if t is None else t.detach() for t in weights]
    backward_args = (torch.randn_like(y), x.detach(), pooled.detach(), *detached, "hardswish", "hardsigmoid")
    torch.library.opcheck(kernel.backward, backward_args, test_utils=opcheck_utils)


def valid_arguments(device="cpu"):
    return {
        "x": torch.randn(2, 8, 5, 5, device=device),
        "fc1_weight": torch.randn(4, 8, 1, 1, device=device),
        "fc1_bias": torch.randn(4, device=device),
        "fc2_weight": torch.randn(8, 4, 1, 1, device=device),
        "fc2_bias": torch.randn(8, device=device),
    }


@pytest.mark.parametrize(
    "change, error, names",
    [
        ({"x": torch.randn(8, 5, 5)}, ValueError, "x must be 4-D"),
        ({"x": torch.ones(2, 8, 5, 5, dtype=torch.int32)}, TypeError, "x must be a floating-point"),
        ({"fc1_weight": torch.randn(4, 7, 1, 1)}, ValueError, "fc1_weight must have shape"),
        ({"fc1_weight": torch.randn(4, 8, 3, 3)}, ValueError, "fc1_weight must be a 1x1"),
        ({"fc2_weight": torch.randn(8, 5)}, ValueError, "fc2_weight must have shape"),
        ({"fc2_weight": torch.randn(7, 4)}, ValueError, "fc2_weight must have shape"),
        ({"fc1_bias": torch.randn(5)}, ValueError, "fc1_bias must have 4 elements"),
        ({"fc2_bias": torch.randn(4)}, ValueError, "fc2_bias must have 8 elements"),
        ({"fc2_bias": torch.randn(8, device="meta")}, ValueError, "fc2_bias is on meta"),
        ({"activation": "swish"}, ValueError, "activation must be one of"),
        ({"gate": "relu"}, ValueError, "gate must be one of"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_input_names_the_argument(change, error, names):
    arguments = valid_arguments()
    keywords = {k: change.pop(k) for k in list(change) if k not in arguments}
    arguments.update(change)
    with pytest.raises(error, match=names):
        fastmb.ops.squeeze_excitation(*arguments.values(), **keywords)


def test_autocast_output_dtype_follows_x(backend, device):
    eager = EagerSqueezeExcitation(8, 4).to(device)
    fused = SqueezeExcitation(8, 4).to(device)
    fused.load_state_dict(eager.state_dict())
    lower = torch.bfloat16 if device == "cpu" else torch.float16
    for x in (torch.randn(2, 8, 5, 5, device=device), torch.randn(2, 8, 5, 5, device=device, dtype=lower)):
        with torch.autocast(device, dtype=lower):
            expected, actual = eager(x), fused(x)
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual.float(), expected.float(), atol=5e-2, rtol=5e-2)


def test_kernels_that_index_pixels_in_32_bits_send_larger_inputs_to_the_reference():
    """The Triton kernels take fewer than 2^31 - 2^16 pixels in all (meta tensors: no memory)."""
    triton_kernels = pytest.importorskip("fastmb.kernels.squeeze_excitation")
    assert triton_kernels.supports(torch.empty(2, 8, 32767, 32767, device="meta"))
    assert not triton_kernels.supports(torch.empty(2, 8, 32768, 32768, device="meta"))
