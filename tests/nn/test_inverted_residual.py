"""The fused inverted-residual block (fastmb::inverted_residual, eval on the CPU) against the same
block run layer by layer: every V2/V3 configuration and V1's depthwise-separable blocks (the
projection's activation in the op; with and without expansion, SE, residual;
strides 1 and 2; dilation; kernels 3 and 5; odd sizes; one image and several, on one to four
threads, so that each of the op's schedules runs), weights changed between calls, and the cases
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
from fastmb.ops.packing import pack_panels
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


# (images, height, width) on 2-4 threads: 3 or 5 images leave a remainder that runs in row parts
# after the whole images (or, small, phase by phase); 2 images on 3 threads split into 3 parts each.
UNEVEN_SIZES = [(3, 40, 36), (5, 17, 13), (2, 30, 20)]


@pytest.mark.parametrize(
    "size, thread_count",
    [(size, count) for size in SIZES for count in (1, 2)] + [(size, count) for size in UNEVEN_SIZES for count in (2, 3, 4)],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"threads{v}",
)
@pytest.mark.parametrize("block_case", BLOCKS, ids=block_id)
def test_block_matches_its_layers(block_case, size, thread_count):
    build, case = block_case
    x = torch.randn(size[0], case[0], *size[1:]).contiguous(memory_format=torch.channels_last)
    with threads(thread_count):
        check_against_layers(build(case), x)


@pytest.mark.parametrize("thread_count", [2, 3])
@pytest.mark.parametrize("case", [V3_CASES[6], V3_CASES[4], V3_CASES[2]], ids=["heavy_se", "se", "no_se"])
def test_whole_images_handed_out_to_free_threads(case, thread_count):
    """16 images: whole images go to whichever thread is free, with heavy SE (672 channels at
    7x7) in equal groups of several images (4 + 4 a thread on 2 threads); on 3 threads the
    remainder after 15 whole images runs in row parts."""
    x = torch.randn(16, case[0], 7, 7).contiguous(memory_format=torch.channels_last)
    with threads(thread_count):
        check_against_layers(v3_block(case), x)


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


def composite_block(x, expand_weight, expand_bias, dw_weight, dw_scale, dw_shift, stride, padding, dilation, project_weight, project_bias):
    """The op's arithmetic as torch ops (no SE, ReLU after the expansion and the depthwise conv),
    in x's dtype."""
    y = torch.relu(nn.functional.conv2d(x, expand_weight[:, :, None, None], expand_bias))
    y = nn.functional.conv2d(y, dw_weight, None, stride, padding, dilation, groups=dw_weight.shape[0])
    y = torch.relu(y * dw_scale[:, None, None] + dw_shift[:, None, None])
    return nn.functional.conv2d(y, project_weight[:, :, None, None], project_bias)


@pytest.mark.parametrize("thread_count", [1, 2, 3, 4])
@pytest.mark.parametrize("height", [150, 41, 21])
@pytest.mark.parametrize("kernel, stride, dilation", [(1, 2, 1), (3, 3, 1), (3, 2, 2), (5, 1, 1)])
def test_bands_of_one_image_in_row_parts(kernel, stride, dilation, height, thread_count):
    """One image split between threads into row parts, whose bands keep only the expanded rows
    they read (a window that slides down the part, or, for the second thread of a pair of parts,
    up from the bottom until it meets the first), with strides that skip rows between bands,
    dilation, and kernels that share rows between them. Three threads keep a part each; two and
    four share their rows in pairs. Two threads on 14-27 output rows (height 41, or 21 at stride
    1) split them in halves that share one buffer of expanded rows; fewer rows run phase by
    phase."""
    torch.manual_seed(thread_count)  # each thread count its own image: rows left by the last test differ
    cin, c, cout = 24, 72, 40
    x = torch.randn(1, cin, height, 23).contiguous(memory_format=torch.channels_last)
    tensors = [torch.randn(c, cin) * 0.2, torch.randn(c), torch.randn(c, 1, kernel, kernel), torch.rand(c) + 0.5, torch.randn(c),
               torch.randn(cout, c) * 0.1, torch.randn(cout)]  # fmt: skip
    expand_weight, expand_bias, dw_weight, dw_scale, dw_shift, project_weight, project_bias = tensors
    padding = (kernel - 1) * dilation // 2

    def fused_block(image: torch.Tensor) -> torch.Tensor:
        return torch.ops.fastmb.inverted_residual(
            image, pack_panels(expand_weight), expand_bias, "relu", dw_weight, dw_scale, dw_shift, [stride] * 2, [padding] * 4,
            [dilation] * 2, "relu", None, None, None, None, "relu", "sigmoid", pack_panels(project_weight), project_bias, False,
        )  # fmt: skip

    with threads(thread_count):
        fused_block(torch.randn_like(x))  # another image first: rows left in the buffers must not be read
        fused = fused_block(x)
    eager = composite_block(x, *tensors[:5], stride, padding, dilation, *tensors[5:])
    oracle = composite_block(x.double(), *(t.double() for t in tensors[:5]), stride, padding, dilation, *(t.double() for t in tensors[5:]))
    assert fused.shape == oracle.shape
    fused_error = (fused.double() - oracle).abs().max().item()
    eager_error = (eager.double() - oracle).abs().max().item()
    assert fused_error <= 2 * eager_error + FLOOR[torch.float32] * max(oracle.abs().max().item(), 1.0), (fused_error, eager_error)


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


@pytest.mark.parametrize("name, blocks", [("mobilenet_v3_small", 11), ("mobilenet_v2", 17), ("mobilenet_v1", 13)])
def test_whole_models_run_their_blocks_in_one_op_call(native_block_calls, name, blocks):
    """The stem and every block of a builder's features, in one call."""
    model = getattr(fastmb, name)().eval()
    randomize_batch_norm(model)
    x = torch.randn(2, 3, 96, 96)  # NCHW: the stem's channels_last weight makes it channels_last
    with torch.no_grad():
        fused = model(x)
        assert native_block_calls == [("stem", 0)] + [("block", 0)] * (blocks - 1)
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


# Blocks whose channels chain (24 -> 24 -> 40 -> 40 -> 80 -> 80 -> 112 -> 64 -> 64): each kind of
# V3 block, a dilated one, a V1 block (the projection's activation) and a V2 block.
CHAIN = [
    (v3_block, V3_CASES[2]), (v3_block, V3_CASES[3]), (v3_block, V3_CASES[4]), (v3_block, (40, 3, 240, 80, False, "HS", 2, 1)),
    (v3_block, V3_CASES[5]), (v3_block, (80, 3, 480, 112, True, "HS", 1, 2)), (v1_block, (112, 64, 1, "relu6")),
    (v2_block, (64, 64, 1, 6)),
]  # fmt: skip


def chain_blocks() -> list[nn.Module]:
    return [build(case, seed) for seed, (build, case) in enumerate(CHAIN)]


@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize("size", [(1, 17, 13), (3, 9, 11), (1, 40, 36)], ids=lambda s: "x".join(map(str, s)))
def test_a_chain_of_blocks_is_one_call_equal_to_a_call_per_block(size, thread_count, native_block_calls):
    blocks = chain_blocks()
    x = torch.randn(size[0], 24, *size[1:]).contiguous(memory_format=torch.channels_last)
    with threads(thread_count), torch.no_grad():
        chained = ir.run_layers(blocks, x)
        assert native_block_calls == [("block", 0)] * len(blocks)
        one_by_one = x
        for block in blocks:
            one_by_one = run_fused_block(block, layers_of(block), residual(block), one_by_one)
    assert torch.equal(chained, one_by_one)


# Blocks without SE whose outputs keep at least 28 rows from a 57-60-row input: at batch 1 on two
# threads each shares its rows from both ends, and runs of them are linked into one parallel region
# (each thread goes on to the next block without a join). Residual, dilated, stride 2, no
# expansion (V1), kernel 5; an SE block ends the first run of five, two blocks after it are another.
LINKED_CHAIN = [
    (v3_block, (24, 3, 72, 24, False, "RE", 1, 1)), (v3_block, (24, 3, 88, 24, False, "RE", 1, 2)), (v2_block, (24, 32, 2, 6)),
    (v1_block, (32, 32, 1, "relu6")), (v3_block, (32, 5, 96, 32, False, "HS", 1, 1)), (v3_block, (32, 3, 96, 32, True, "HS", 1, 1)),
    (v3_block, (32, 3, 64, 32, False, "RE", 1, 1)), (v2_block, (32, 32, 1, 4)),
]  # fmt: skip


@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize("rows", [60, 57])
def test_linked_blocks_equal_a_call_per_block(rows, thread_count, native_block_calls):
    blocks = [build(case, seed) for seed, (build, case) in enumerate(LINKED_CHAIN)]
    x = torch.randn(1, 24, rows, 29).contiguous(memory_format=torch.channels_last)
    with threads(thread_count), torch.no_grad():
        for _ in range(3):  # each run's threads meet at other rows
            chained = ir.run_layers(blocks, x)
            one_by_one = x
            for block in blocks:
                one_by_one = run_fused_block(block, layers_of(block), residual(block), one_by_one)
            assert torch.equal(chained, one_by_one)
        assert native_block_calls[:len(blocks)] == [("block", 0)] * len(blocks)
        with fastmb.use_backend("reference"):
            eager = ir.run_layers(blocks, x)
    torch.testing.assert_close(chained, eager, rtol=1e-4, atol=1e-4)


def test_a_chain_stops_at_a_hook_and_at_a_layer_without_a_plan(native_block_calls):
    """A hooked block runs as its module after the blocks before it have run, so its hook sees
    their output; the blocks after it are checked and run once it has returned."""
    blocks = chain_blocks()
    blocks.insert(3, nn.Identity())
    seen = []
    blocks[5].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(1, 24, 16, 16)
    with torch.no_grad():
        fused = ir.run_layers(blocks, x)
        with fastmb.use_backend("reference"):
            eager = ir.run_layers(blocks, x)
    calls = [call for _, call in native_block_calls]
    assert calls == [0, 0, 0, 1, 2, 3, 3, 3] and seen == [torch.Size([1, 80, 4, 4])] * 2
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)


def chain_arguments(blocks: list[nn.Module], x: torch.Tensor) -> tuple[list, list, list]:
    """fastmb::inverted_residual_chain's lists for `blocks`, as run_layers makes them."""
    with torch.no_grad():
        parts = [plan.chained(arguments) for plan, arguments in ir._chain(blocks, x.shape[1])]
    return [t for p in parts for t in p[0]], [v for p in parts for v in p[1]], [n for p in parts for n in p[2]]


def test_chain_takes_depthwise_weights_in_any_layout():
    """The plans pass each depthwise weight as a view of a taps-major tensor, read in place; the
    op repacks one in another layout (a plain contiguous (C, 1, kH, kW), columns before rows)."""
    blocks = chain_blocks()
    x = torch.randn(2, 24, 11, 9).contiguous(memory_format=torch.channels_last)
    tensors, settings, names = chain_arguments(blocks, x)
    op = torch.ops.fastmb.inverted_residual_chain
    relayouts = (lambda w: w.contiguous(), lambda w: w.transpose(2, 3).contiguous().transpose(2, 3))
    with torch.no_grad():
        expected = op(x, tensors, settings, names)
        for relayout in relayouts:
            relaid = [relayout(t) if i % 11 == 2 else t for i, t in enumerate(tensors)]
            assert relaid[2].stride() != tensors[2].stride()
            torch.testing.assert_close(op(x, relaid, settings, names), expected, rtol=0, atol=0)


def test_fake_tensor_shape_of_a_chain():
    blocks = chain_blocks()
    x = torch.randn(2, 24, 19, 13).contiguous(memory_format=torch.channels_last)
    tensors, settings, names = chain_arguments(blocks, x)
    with torch.no_grad():
        real = torch.ops.fastmb.inverted_residual_chain(x, tensors, settings, names)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_tensors = [mode.from_tensor(t) if t is not None else None for t in tensors]
        fake = torch.ops.fastmb.inverted_residual_chain(mode.from_tensor(x), fake_tensors, settings, names)
    assert fake.shape == real.shape == (2, 64, 5, 4) and fake.stride() == real.stride()


def test_chain_op_rejects_bad_arguments_by_block_and_name():
    blocks = chain_blocks()
    x = torch.randn(1, 24, 13, 11).contiguous(memory_format=torch.channels_last)
    tensors, settings, names = chain_arguments(blocks, x)
    op = torch.ops.fastmb.inverted_residual_chain
    with pytest.raises(RuntimeError, match="per block"):
        op(x, tensors[:-1], settings, names)
    with pytest.raises(RuntimeError, match="per block"):
        op(x, tensors, settings + [1], names)
    with pytest.raises(RuntimeError, match=r"block 2\): the dw_weight is missing"):
        op(x, [None if i == 2 * 11 + 2 else t for i, t in enumerate(tensors)], settings, names)
    with pytest.raises(RuntimeError, match=r"block 3\): dw_scale"):
        op(x, [t[:5].contiguous() if i == 3 * 11 + 3 else t for i, t in enumerate(tensors)], settings, names)
    with pytest.raises(RuntimeError, match=r"block 1\): expand_weight"):  # without 24 -> 40, the 40 -> 40 block gets 24 channels
        op(x, tensors[:11] + tensors[22:], settings[:9] + settings[18:], names[:5] + names[10:])
    with pytest.raises(RuntimeError, match=r"block 4\): residual"):  # stride 2 at block 4: no residual possible
        op(x, tensors, [2 if i in (4 * 9, 4 * 9 + 1) else v for i, v in enumerate(settings)], names)
    with pytest.raises(RuntimeError, match=r"block 0\): .*stride"):
        op(x, tensors, [0] + settings[1:], names)
    with pytest.raises(RuntimeError, match="activation 'swish2'|unknown activation"):
        op(x, tensors, settings, names[:-1] + ["swish2"])
    with pytest.raises(RuntimeError, match="channels_last float32"):
        op(x.double(), tensors, settings, names)


def test_fake_tensor_shape_matches():
    block = v3_block(V3_CASES[3])
    x = torch.randn(2, 24, 13, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        real = run_fused_block(block, block.block, False, x)
        args = block.__dict__["_fastmb_fused"][-1].arguments()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.fastmb.inverted_residual(mode.from_tensor(x), *[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert fake.shape == real.shape and fake.stride() == real.stride()


def test_op_rejects_bad_arguments_by_name():
    block = v3_block(V3_CASES[3])
    x = torch.randn(1, 24, 13, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        run_fused_block(block, block.block, False, x)
    args = list(block.__dict__["_fastmb_fused"][-1].arguments())
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


# A stem computed as the first block reads it (the op's stem_* arguments, run_layers): (stem
# output channels, activation, kernel, stride) and the block after it in each builder.
STEM_CASES = [
    ((16, "hardswish", 3, 2), (v3_block, V3_CASES[0])),  # V3-Large: a residual block
    ((16, "hardswish", 3, 2), (v3_block, V3_CASES[1])),  # V3-Small: SE, stride 2
    ((32, "relu6", 3, 2), (v2_block, V2_CASES[0])),  # V2
    ((32, "relu", 3, 1), (v1_block, V1_CASES[0])),  # V1's depthwise-separable block, a stride-1 stem
    ((16, "silu", 5, 3), (v3_block, V3_CASES[0])),  # a 5x5 stem of stride 3 (vector-filling channels)
    ((24, "relu", 3, 2), (v3_block, (24, 3, 24, 24, False, "RE", 1, 1))),  # 24 channels: not whole AVX-512 vectors
]
STEM_SIZES = [(1, 34, 30), (3, 17, 23), (1, 80, 70), (2, 9, 7)]  # row parts, several images, a large one, image split


def stem_and_block(stem_case, block_case, seed: int = 0) -> list[nn.Module]:
    channels, activation, kernel, stride = stem_case
    build, case = block_case
    torch.manual_seed(seed)
    stem = fastmb.nn.ConvBNAct(3, channels, kernel, stride, activation=activation)
    randomize_batch_norm(stem)
    return [stem.eval(), build(case, seed)]


def run_stem_and_block(layers: list[nn.Module], x: torch.Tensor, calls: list) -> torch.Tensor:
    """run_layers over [stem, block], checking that it made one op call with the stem
    (`calls`: the native_block_calls fixture's list)."""
    calls.clear()
    with torch.no_grad():
        y = ir.run_layers(layers, x)
    assert len(calls) == 1 and calls[0][0] == "stem", f"expected one op call with the stem, got {calls}"
    return y


def stem_layer_by_layer(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    stem, block = layers
    return layer_by_layer(block, stem(x))


@pytest.mark.parametrize(
    "size, thread_count",
    # the last two: images left over after the whole ones read the stem's output of their own image
    [(size, count) for size in STEM_SIZES for count in (1, 2)] + [((3, 80, 70), 2), ((5, 34, 30), 3)],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"threads{v}",
)
@pytest.mark.parametrize("cases", STEM_CASES, ids=lambda c: f"stem{c[0][0]}-{c[0][1]}-k{c[0][2]}s{c[0][3]}-{block_id(c[1])}")
def test_stem_and_block_match_their_layers(cases, size, thread_count, native_block_calls):
    """DESIGN.md's rule against the layers in float64, as check_against_layers."""
    layers = stem_and_block(*cases)
    x = torch.randn(size[0], 3, *size[1:])
    with threads(thread_count):
        fused = run_stem_and_block(layers, x, native_block_calls)
    with torch.no_grad(), fastmb.use_backend("reference"):
        eager = stem_layer_by_layer(layers, x)
        oracle = stem_layer_by_layer([copy.deepcopy(m).double() for m in layers], x.double())
    assert fused.shape == oracle.shape and fused.is_contiguous(memory_format=torch.channels_last)
    scale = oracle.abs().max().item()
    fused_error = (fused.double() - oracle).abs().max().item()
    eager_error = (eager.double() - oracle).abs().max().item()
    assert fused_error <= 2 * eager_error + FLOOR[torch.float32] * max(scale, 1.0), (fused_error, eager_error)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_stem_reads_any_input_layout(layout, native_block_calls):
    layers = stem_and_block(*STEM_CASES[0])
    x = torch.randn(2, 3, 21, 19)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(2, 3, 42, 19)[:, :, ::2]
    fused = run_stem_and_block(layers, x, native_block_calls)
    with torch.no_grad(), fastmb.use_backend("reference"):
        expected = stem_layer_by_layer(layers, x)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def change_stem_weight(layers: list[nn.Module]) -> None:
    with torch.no_grad():
        layers[0][0].weight.mul_(1.5)


def change_stem_statistics(layers: list[nn.Module]) -> None:
    layers[0][1].running_var.data = layers[0][1].running_var.data * 3.0


def change_stem_activation(layers: list[nn.Module]) -> None:
    layers[0][2] = nn.ReLU()


def change_stem_stride(layers: list[nn.Module]) -> None:
    layers[0][0].stride = (1, 1)


@pytest.mark.parametrize("change", [change_stem_weight, change_stem_statistics, change_stem_activation, change_stem_stride])
def test_stem_changes_between_calls_are_picked_up(change, native_block_calls):
    layers = stem_and_block(*STEM_CASES[0])
    x = torch.randn(1, 3, 24, 20)
    before = run_stem_and_block(layers, x, native_block_calls)
    change(layers)
    after = run_stem_and_block(layers, x, native_block_calls)
    with torch.no_grad(), fastmb.use_backend("reference"):
        expected = stem_layer_by_layer(layers, x)
    assert before.shape != after.shape or not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def hook_on_stem(layers: list[nn.Module]) -> None:
    layers[0].register_forward_hook(lambda module, args, out: None)


def stem_in_training(layers: list[nn.Module]) -> None:
    layers[0].train()


def se_and_residual_block(layers: list[nn.Module]) -> None:
    layers[1] = v3_block((16, 3, 16, 16, True, "RE", 1, 1))  # the op takes a residual or SE after a stem, not both


def eight_input_channels(layers: list[nn.Module]) -> None:
    layers[0] = fastmb.nn.ConvBNAct(8, 16, 3, 2, activation="hardswish").eval()


def a_pointwise_first_layer(layers: list[nn.Module]) -> None:
    layers[0] = fastmb.nn.ConvBNAct(3, 16, 1, 1, activation="hardswish").eval()


def an_expanding_block(layers: list[nn.Module]) -> None:
    layers[1] = v3_block((16, 3, 64, 24, False, "RE", 2, 1))


@pytest.mark.parametrize(
    "setting", [hook_on_stem, stem_in_training, se_and_residual_block, eight_input_channels, a_pointwise_first_layer, an_expanding_block]
)
def test_stem_steps_aside_where_it_does_not_apply(setting, native_block_calls):
    """The stem then runs as its module and the block as its own op call (or its layers)."""
    layers = stem_and_block(*STEM_CASES[0])
    setting(layers)
    in_channels = layers[0][0].in_channels
    x = torch.randn(2, in_channels, 20, 18)
    with torch.no_grad():
        fused = ir.run_layers(layers, x)
        with fastmb.use_backend("reference"):
            expected = stem_layer_by_layer(layers, x)
    assert "stem" not in [kind for kind, _ in native_block_calls]
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)


def test_models_run_the_stem_in_the_first_block(native_block_calls):
    for name in ("mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v2", "mobilenet_v1"):
        native_block_calls.clear()
        model = getattr(fastmb, name)().eval()
        randomize_batch_norm(model)
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
        kinds = [kind for kind, _ in native_block_calls]
        assert kinds[0] == "stem" and "stem" not in kinds[1:], (name, kinds)


def stem_arguments(layers: list[nn.Module], x: torch.Tensor) -> tuple[tuple, tuple]:
    with torch.no_grad():
        ir.run_layers(layers, x)
    return ir.block_plan(layers[1], layers_of(layers[1]), residual(layers[1])).arguments(), ir.stem_plan(layers[0]).arguments()


@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize("size", STEM_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("stem_case", [case[0] for case in STEM_CASES], ids=lambda c: f"stem{c[0]}-{c[1]}-k{c[2]}s{c[3]}")
def test_a_stem_before_a_layer_without_a_plan_runs_alone(stem_case, size, thread_count, native_block_calls):
    """Its own op call (no blocks), under DESIGN.md's rule against the stem in float64; the
    layer after it runs as its module."""
    layers = [stem_and_block(stem_case, BLOCKS[0])[0], nn.Conv2d(stem_case[0], 8, 1)]
    x = torch.randn(size[0], 3, *size[1:])
    with threads(thread_count), torch.no_grad():
        fused = ir.run_layers(layers[:1], x)
        assert ir.run_layers(layers, x).shape[1] == 8
        with fastmb.use_backend("reference"):
            eager = layers[0](x)
        oracle = copy.deepcopy(layers[0]).double()(x.double())
    assert [kind for kind, _ in native_block_calls] == ["stem alone", "stem alone"]
    assert fused.shape == oracle.shape and fused.is_contiguous(memory_format=torch.channels_last)
    scale = oracle.abs().max().item()
    fused_error = (fused.double() - oracle).abs().max().item()
    eager_error = (eager.double() - oracle).abs().max().item()
    assert fused_error <= 2 * eager_error + FLOOR[torch.float32] * max(scale, 1.0), (fused_error, eager_error)


def test_fake_tensor_shape_of_a_stem_alone():
    stem = stem_and_block(*STEM_CASES[2])[0]
    x = torch.randn(2, 3, 23, 17)
    stem_args = ir.stem_plan(stem).arguments()
    with torch.no_grad():
        real = torch.ops.fastmb.inverted_residual_chain(x, [], [], [], *stem_args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in stem_args]
        fake = torch.ops.fastmb.inverted_residual_chain(mode.from_tensor(x), [], [], [], *fake_args)
    assert fake.shape == real.shape == (2, 32, 12, 9) and fake.stride() == real.stride()
    with pytest.raises(RuntimeError, match="at least one block, or a stem"):
        torch.ops.fastmb.inverted_residual_chain(x.contiguous(memory_format=torch.channels_last), [], [], [])


def test_fake_tensor_shape_with_a_stem():
    layers = stem_and_block(*STEM_CASES[1])
    x = torch.randn(2, 3, 23, 17)
    block_args, stem_args = stem_arguments(layers, x)
    with torch.no_grad():
        real = torch.ops.fastmb.inverted_residual(x, *block_args, *stem_args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in (*block_args, *stem_args)]
        fake = torch.ops.fastmb.inverted_residual(mode.from_tensor(x), *fake_args)
    assert fake.shape == real.shape and fake.stride() == real.stride()


def test_op_rejects_bad_stem_arguments_by_name():
    layers = stem_and_block(*STEM_CASES[0])
    x = torch.randn(1, 3, 20, 18)
    block_args, stem_args = stem_arguments(layers, x)
    weight, scale, shift, stride, padding, dilation, activation = stem_args
    op = torch.ops.fastmb.inverted_residual
    with pytest.raises(RuntimeError, match="go together"):
        op(x, *block_args, weight, None, shift)
    with pytest.raises(RuntimeError, match="stem_weight"):
        op(x, *block_args, weight[:, :2].contiguous(), *stem_args[1:])  # 2 input channels for a 3-channel image
    with pytest.raises(RuntimeError, match="dw_weight"):
        op(x, *block_args, weight[:8].contiguous(), scale[:8].contiguous(), shift[:8].contiguous(), *stem_args[3:])
    with pytest.raises(RuntimeError, match="stem_scale"):
        op(x, *block_args, weight, scale[:5].contiguous(), *stem_args[2:])
    with pytest.raises(RuntimeError, match="stem_scale"):
        op(x, *block_args, weight, scale.double(), *stem_args[2:])
    with pytest.raises(RuntimeError, match="stride"):
        op(x, *block_args, weight, scale, shift, [0, 2], *stem_args[4:])
    with pytest.raises(RuntimeError, match="empty"):
        op(x[:, :, :1, :1], *block_args, weight, scale, shift, stride, [0, 0], dilation, activation)  # 1x1 image, 3x3 kernel, no padding
    with pytest.raises(RuntimeError, match="activation"):
        op(x, *block_args, *stem_args[:-1], "swish2")
    with pytest.raises(RuntimeError, match="image"):
        op(x.double(), *block_args, *stem_args)
    expand = (torch.zeros(1, 16, 16), torch.zeros(16))
    with pytest.raises(RuntimeError, match="expansion"):
        op(x, expand[0], expand[1], *block_args[2:], *stem_args)
    se_residual = stem_and_block(*STEM_CASES[0])
    se_and_residual_block(se_residual)
    se_args, se_stem = stem_arguments(se_residual, x)
    with pytest.raises(RuntimeError, match="residual or SE"):
        op(x, *se_args, *se_stem)


class _DoubledDepthwise(fastmb.nn.DWConvBNAct):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class _ShiftedSE(fastmb.nn.SqueezeExcitation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


class _HalvedConv(fastmb.nn.ConvBNAct):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


@pytest.mark.parametrize(
    "path, cls",
    [("features.2.block.1", _DoubledDepthwise), ("features.4.block.2", _ShiftedSE), ("features.4.block.0", _HalvedConv),
     ("features.0", _HalvedConv), ("features.12", _HalvedConv)],
    ids=["depthwise", "se", "expansion", "stem", "head_conv"],
)  # fmt: skip
def test_subclasses_with_a_forward_of_their_own_are_not_fused(path, cls):
    """A fused module's subclass whose forward computes something else is called (the block, stem
    and head ops ran their parents' computation instead: outputs 50-100% off)."""
    model = fastmb.mobilenet_v3_small(num_classes=10).eval()
    randomize_batch_norm(model)
    model.get_submodule(path).__class__ = cls
    # the features as the model's forward runs them (its random logits hardly depend on them), or
    # the logits where the head op is concerned
    forward = model if path == "features.12" else lambda x: ir.run_layers(model.features, x)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        forward(x)
        with fastmb.use_backend("reference"):
            expected = forward(x)
        assert (forward(x) - expected).abs().max() <= 1e-5 * expected.abs().max()
