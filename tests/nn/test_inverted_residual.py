"""The fused inverted-residual block (fastmb::inverted_residual, eval on the CPU) against the same
block run layer by layer: every V2/V3 configuration and V1's depthwise-separable blocks (the
projection's activation in the op; with and without expansion, SE, residual;
strides 1 and 2; dilation; kernels 3 and 5; odd sizes; one image and several, on one thread and
two, so that each of the op's schedules runs), weights changed between calls, and the cases
where it must step aside."""

import contextlib
import copy

import pytest
import torch
from torch import nn

import fastmb
from fastmb.models.mobilenet_v1 import DepthwiseSeparable as V1Block
from fastmb.models.mobilenet_v2 import InvertedResidual as V2Block
from fastmb.models.mobilenet_v3 import InvertedResidual as V3Block
from fastmb.models.mobilenet_v3 import InvertedResidualConfig
from fastmb.ops import inverted_residual as ir
from fastmb.ops.inverted_residual import NATIVE, run_fused_block
from oracle import FLOOR, randomize_batch_norm, threads

pytestmark = pytest.mark.skipif(not NATIVE, reason="fastmb._C has no CPU inverted_residual kernel")

NORM = nn.BatchNorm2d

# (in, kernel, expanded, out, SE, activation, stride, dilation): the table rows' kinds.
V3_CASES = [
    (16, 3, 16, 16, False, "RE", 1, 1),  # no expansion, residual (V3-Large's first block)
    (16, 3, 16, 16, True, "RE", 2, 1),  # no expansion, SE, stride 2 (V3-Small's first block)
    (24, 3, 72, 24, False, "RE", 1, 1),  # residual, no SE
    (24, 5, 72, 40, True, "RE", 2, 1),  # SE, stride 2, kernel 5
    (40, 5, 120, 40, True, "HS", 1, 1),  # SE, residual
    (80, 3, 184, 80, False, "HS", 1, 1),  # hardswish, no SE, residual
    (112, 5, 672, 160, True, "HS", 1, 2),  # dilated, SE
    (24, 3, 88, 24, False, "RE", 1, 2),  # dilated, no SE, residual
]
V2_CASES = [(32, 16, 1, 1), (16, 24, 2, 6), (24, 24, 1, 6), (64, 96, 1, 6)]  # (in, out, stride, expand ratio)
V1_CASES = [(32, 64, 1, "relu"), (64, 128, 2, "relu6"), (24, 40, 2, "hardswish"), (48, 48, 1, "silu")]  # (in, out, stride, act)
SIZES = [(1, 17, 13), (3, 9, 11), (1, 40, 36)]  # one image small and large (row parts), several


def v3_block(case, seed: int = 0) -> V3Block:
    torch.manual_seed(seed)
    block = V3Block(InvertedResidualConfig(*case[:6], case[6], case[7], 1.0), NORM)
    randomize_batch_norm(block)
    return block.eval()


def v2_block(case, seed: int = 0) -> V2Block:
    torch.manual_seed(seed)
    block = V2Block(*case)
    randomize_batch_norm(block)
    return block.eval()


def v1_block(case, seed: int = 0) -> V1Block:
    torch.manual_seed(seed)
    block = V1Block(*case, NORM)
    randomize_batch_norm(block)
    return block.eval()


def layers_of(block: nn.Module) -> nn.Module:
    return block.block if isinstance(block, V3Block) else block.conv if isinstance(block, V2Block) else block


def residual(block: nn.Module) -> bool:
    return getattr(block, "use_res_connect", False)


def layer_by_layer(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block through its layers (the path before the fused op, which the reference backend
    and float64 take), in x's dtype."""
    y = layers_of(block)(x)
    return y + x if residual(block) else y


def check_against_layers(block: nn.Module, x: torch.Tensor) -> None:
    """DESIGN.md's rule: |fused - float64| <= 2 |layers in float32 - float64| + floor."""
    with torch.no_grad():
        fused = run_fused_block(block, layers_of(block), residual(block), x)
        assert fused is not None, "the fused op did not run"
        assert fused.is_contiguous(memory_format=torch.channels_last)
        with fastmb.use_backend("reference"):
            eager = layer_by_layer(block, x)
            oracle = layer_by_layer(copy.deepcopy(block).double(), x.double())
    assert fused.shape == oracle.shape
    scale = oracle.abs().max().item()
    fused_error = (fused.double() - oracle).abs().max().item()
    eager_error = (eager.double() - oracle).abs().max().item()
    assert fused_error <= 2 * eager_error + FLOOR[torch.float32] * max(scale, 1.0), (fused_error, eager_error)


BLOCKS = [(v3_block, case) for case in V3_CASES] + [(v2_block, case) for case in V2_CASES] + [(v1_block, case) for case in V1_CASES]


def block_id(block_case) -> str:
    build, case = block_case
    return build.__name__[:2] + "-" + "-".join(str(int(v) if isinstance(v, bool) else v) for v in case)


@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("block_case", BLOCKS, ids=block_id)
def test_block_matches_its_layers(block_case, size, thread_count):
    build, case = block_case
    x = torch.randn(size[0], case[0], *size[1:]).contiguous(memory_format=torch.channels_last)
    with threads(thread_count):
        check_against_layers(build(case), x)


@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", [V3_CASES[6], V3_CASES[5]], ids=["channels_split", "pixels_split"])
def test_smooth_activations_in_every_schedule(case, size, thread_count):
    """SiLU (timm's EfficientNets) after the expansion and the depthwise conv, in each schedule:
    the smooth activations' second loop runs per channel range when a small image's block is
    split between threads by channels (672 expanded channels), per row range otherwise (184)."""
    block = v3_block(case)
    block.block[0][2] = nn.SiLU()
    block.block[1].activation = "silu"
    x = torch.randn(size[0], case[0], *size[1:]).contiguous(memory_format=torch.channels_last)
    with threads(thread_count):
        check_against_layers(block, x)


def test_nchw_input_gives_a_channels_last_output():
    block = v3_block(V3_CASES[4])
    check_against_layers(block, torch.randn(2, 40, 15, 15))


def change_in_place(block: V3Block) -> None:
    with torch.no_grad():
        block.block[0][0].weight.mul_(1.5)


def change_by_data(block: V3Block) -> None:
    block.block[1][1].running_var.data = block.block[1][1].running_var.data * 2.0


def change_se(block: V3Block) -> None:
    with torch.no_grad():
        block.block[2].fc2.bias.add_(1.0)


def change_projection_parameter(block: V3Block) -> None:
    block.block[3][1].weight = nn.Parameter(torch.rand_like(block.block[3][1].weight))


def change_eps(block: V3Block) -> None:
    block.block[1][1].eps = 0.5


def change_depthwise_activation(block: V3Block) -> None:
    block.block[1].activation = "relu"


def change_expansion_activation_module(block: V3Block) -> None:
    block.block[0][2] = nn.ReLU6()


def change_se_gate(block: V3Block) -> None:
    block.block[2].gate = "sigmoid"


def change_state_dict(block: V3Block) -> None:
    other = v3_block(V3_CASES[4], seed=1)
    block.load_state_dict(other.state_dict())


@pytest.mark.parametrize(
    "change",
    [change_in_place, change_by_data, change_se, change_projection_parameter, change_eps, change_depthwise_activation,
     change_expansion_activation_module, change_se_gate, change_state_dict],
)
def test_weight_changes_between_calls_are_picked_up(change):
    block = v3_block(V3_CASES[4])
    x = torch.randn(1, 40, 14, 14).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        before = run_fused_block(block, block.block, True, x)
        change(block)
        after = run_fused_block(block, block.block, True, x)
        with fastmb.use_backend("reference"):
            expected = layer_by_layer(block, x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_a_swapped_child_is_picked_up():
    block = v3_block(V3_CASES[4])
    x = torch.randn(1, 40, 14, 14).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        run_fused_block(block, block.block, True, x)
        block.block[2] = nn.Identity()  # no longer a block the op runs: the layers run
        assert run_fused_block(block, block.block, True, x) is None
        torch.testing.assert_close(block(x), layer_by_layer(block, x))


@pytest.mark.parametrize(
    "setting",
    ["grad", "train", "child_train", "float64", "reference_backend", "bfloat16"],
)
def test_steps_aside_where_it_does_not_apply(setting):
    block = v3_block(V3_CASES[4])
    x = torch.randn(2, 40, 9, 9).contiguous(memory_format=torch.channels_last)
    context = contextlib.nullcontext()
    if setting == "grad":
        context = torch.enable_grad()
    elif setting == "train":
        block.train()
    elif setting == "child_train":
        block.block[1].train()
    elif setting in ("float64", "bfloat16"):
        block, x = block.to(getattr(torch, setting)), x.to(getattr(torch, setting))
    elif setting == "reference_backend":
        context = fastmb.use_backend("reference")
    with torch.no_grad(), context:
        assert run_fused_block(block, block.block, True, x) is None
        block(x)  # the layers run instead


def test_input_with_the_wrong_channel_count_gets_the_layers_error():
    block = v3_block(V3_CASES[4])
    with torch.no_grad(), pytest.raises(RuntimeError, match="channels|size"):
        block(torch.randn(1, 41, 9, 9))


def counting_op_calls(monkeypatch) -> list[int]:
    """The output channels of each fastmb::inverted_residual call from here on (both paths to
    the op, a block's own forward and run_layers, go through inverted_residual._OP)."""
    calls = []
    op = ir._OP
    monkeypatch.setattr(ir, "_OP", lambda x, *args: calls.append(args[-3].shape[0]) or op(x, *args))
    return calls


@pytest.mark.parametrize("name, blocks", [("mobilenet_v3_small", 11), ("mobilenet_v2", 17), ("mobilenet_v1", 13)])
def test_whole_models_run_one_op_per_block(monkeypatch, name, blocks):
    calls = counting_op_calls(monkeypatch)
    model = getattr(fastmb, name)().eval()
    randomize_batch_norm(model)
    x = torch.randn(2, 3, 96, 96)  # NCHW: the stem's channels_last weight makes it channels_last
    with torch.no_grad():
        fused = model(x)
        assert len(calls) == blocks
        with fastmb.use_backend("reference"):
            eager = model(x)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)


def test_run_layers_keeps_hooks_and_modes():
    """The V2/V3 forward sends blocks straight to the op (run_layers), except a block with a
    hook, which is called as a module so the hook runs, and a block in training mode."""
    model = fastmb.mobilenet_v3_small().eval()
    randomize_batch_norm(model)
    x = torch.randn(1, 3, 64, 64)
    seen = []
    model.features[4].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    model.features[6].train()  # its batch norms use batch statistics: the layers run
    layers = list(model.features)[:-1]
    with torch.no_grad():
        model(x)
        fused = ir.run_layers(layers, x)
        with fastmb.use_backend("reference"):
            eager = ir.run_layers(layers, x)
    assert seen == [torch.Size([1, 40, 4, 4])] * 3
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)
    model.features.register_forward_hook(lambda module, args, out: seen.append("features"))
    with torch.no_grad():
        model(x)  # a hook on the features Sequential: the model calls it
    assert seen[-1] == "features"


def test_weights_a_hook_changes_mid_forward_are_seen():
    """run_layers checks the blocks after a hooked one only once the hook has run: a hook that
    changes the next block's weight in place (after it was packed) is honoured. Compared on the
    last block's output: in these random-init models a change deeper in barely reaches it."""
    model = fastmb.mobilenet_v3_small().eval()
    randomize_batch_norm(model)
    layers = list(model.features)[:-1]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ir.run_layers(layers, x)  # every block packed
        weight = model.features[11].block[0][0].weight  # the last block: its output is compared
        target = weight * 1.5

        def change_the_next_block(module, args, out) -> None:
            weight.copy_(target)

        model.features[10].register_forward_hook(change_the_next_block)
        fused = ir.run_layers(layers, x)
        with fastmb.use_backend("reference"):
            eager = ir.run_layers(layers, x)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)


def test_fake_tensor_shape_matches():
    block = v3_block(V3_CASES[3])
    x = torch.randn(2, 24, 13, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        real = run_fused_block(block, block.block, False, x)
        args = block.__dict__["_fastmb_fused"][1].arguments()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.fastmb.inverted_residual(mode.from_tensor(x), *[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert fake.shape == real.shape and fake.stride() == real.stride()


def test_op_rejects_bad_arguments_by_name():
    block = v3_block(V3_CASES[3])
    x = torch.randn(1, 24, 13, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        run_fused_block(block, block.block, False, x)
    args = list(block.__dict__["_fastmb_fused"][1].arguments())
    op = torch.ops.fastmb.inverted_residual
    with pytest.raises(RuntimeError, match="expand_weight"):
        op(x, args[0][:, :5].contiguous(), *args[1:])
    with pytest.raises(RuntimeError, match="project_weight|project_bias"):  # the output channels come from the bias
        op(x, *args[:-3], args[-3][:3].contiguous(), *args[-2:])
    with pytest.raises(RuntimeError, match="channels_last float32"):
        op(x.double(), *args)
    with pytest.raises(RuntimeError, match="residual"):
        op(x, *args[:-2], True, args[-1])  # 24 -> 40 channels at stride 2: no residual possible
    with pytest.raises(RuntimeError, match="activation"):
        op(x, *args[:-1], "swish2")  # the projection's activation
    with pytest.raises(RuntimeError, match="SE tensors"):
        op(x, *args[:11], None, *args[12:])
