"""A model's repeated eval forwards on the CPU run as their op calls (ForwardMemo) while nothing
they were planned from changed, and through the full checks again after any change."""

import contextlib
import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_hooks

import fastmb
from fastmb import dispatch
from fastmb.ops import inverted_residual as ir
from oracle import randomize_batch_norm

pytestmark = pytest.mark.skipif(not ir.NATIVE, reason="needs the CPU extension")


def small_model(name: str = "mobilenet_v3_small") -> nn.Module:
    torch.manual_seed(0)
    model = getattr(fastmb, name)(num_classes=10).eval()
    randomize_batch_norm(model)
    return model


def image() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(1, 3, 64, 64)


def memo_of(model: nn.Module) -> ir.ForwardMemo | None:
    return model.__dict__.get("_fastmb_forward")


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with fastmb.use_backend("reference"):
        return model(x)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v2", "mobilenet_v1"])
def test_repeated_forwards_skip_the_checks_and_agree(name, monkeypatch):
    model, x = small_model(name), image()
    with torch.no_grad():
        first = model(x)
        assert isinstance(memo_of(model), ir.ForwardMemo)
        planned = []
        original = ir._planned
        monkeypatch.setattr(ir, "_planned", lambda layer: planned.append(layer) or original(layer))
        with dispatch.record_backends() as backends:
            again = model(x)
        expected = reference(model, x)
    assert planned == [] and backends == {"cpu"}
    assert torch.equal(first, again)
    torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-4)


def scale_block_weight(model: nn.Module) -> None:
    with torch.no_grad():
        model.features[4].block[0][0].weight.mul_(1.5)


def replace_bn_data(model: nn.Module) -> None:
    bn = model.features[5].block[1][1]
    bn.running_var.data = bn.running_var.data * 3.0


def replace_classifier_parameter(model: nn.Module) -> None:
    model.classifier[0].weight = nn.Parameter(torch.randn_like(model.classifier[0].weight))


def scale_stem_weight(model: nn.Module) -> None:
    with torch.no_grad():
        model.features[0][0].weight.mul_(-1.0)


def change_eps(model: nn.Module) -> None:
    model.features[3].block[1][1].eps = 0.5


def change_depthwise_activation(model: nn.Module) -> None:
    model.features[4].block[1].activation = "relu"


def change_se_gate(model: nn.Module) -> None:
    model.features[4].block[2].gate = "sigmoid"


def swap_depthwise_activation_module(model: nn.Module) -> None:
    model.features[4].block[1][2] = nn.ReLU()


def swap_se_activation_for_one_not_fused(model: nn.Module) -> None:
    model.features[4].block[2].activation = nn.ELU()  # the block's layers then run


def drop_an_se(model: nn.Module) -> None:
    model.features[4].block[2] = nn.Identity()  # no longer a block the op runs: its layers run


def swap_a_block(model: nn.Module) -> None:
    other = copy.deepcopy(model.features[5])
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    model.features[5] = other


def change_the_head_activation(model: nn.Module) -> None:
    model.classifier[1] = nn.ReLU()


# The model's own children replaced (the key the forward builds; replayed_forward skips it).
def replace_the_classifier(model: nn.Module) -> None:
    other = copy.deepcopy(model.classifier)
    with torch.no_grad():
        other[3].bias.add_(1.0)
    model.classifier = other


def replace_the_features(model: nn.Module) -> None:
    other = copy.deepcopy(model.features)
    with torch.no_grad():
        other[-1][0].weight.mul_(0.5)
    model.features = other


def load_other_weights(model: nn.Module) -> None:
    model.load_state_dict(small_model().state_dict() | {"classifier.3.bias": torch.randn(10)})


def train_one_block(model: nn.Module) -> None:
    model.features[6].train()


def residual_off(model: nn.Module) -> None:
    model.features[5].use_res_connect = False


# A conv's settings changed in place (the plans had kept computing with the old ones).
def stride_an_expansion(model: nn.Module) -> None:
    model.features[4].block[0][0].stride = (2, 2)


def pad_a_projection(model: nn.Module) -> None:
    model.features[4].block[3][0].padding = (1, 1)


def reflect_a_depthwise_conv(model: nn.Module) -> None:
    model.features[4].block[1][0].padding_mode = "reflect"


def reflect_the_stem(model: nn.Module) -> None:
    model.features[0][0].padding_mode = "reflect"


def stride_the_last_conv(model: nn.Module) -> None:
    model.features[-1][0].stride = (2, 2)


CHANGES = [
    scale_block_weight, replace_bn_data, replace_classifier_parameter, scale_stem_weight, change_eps, change_depthwise_activation,
    change_se_gate, swap_depthwise_activation_module, swap_se_activation_for_one_not_fused, drop_an_se, swap_a_block, change_the_head_activation, replace_the_classifier, replace_the_features, load_other_weights, train_one_block, residual_off,
    stride_an_expansion, pad_a_projection, reflect_a_depthwise_conv, reflect_the_stem, stride_the_last_conv,
]  # fmt: skip


def without_plans(model: nn.Module) -> nn.Module:
    """A copy of the model without its memo and plans (freeze drops them; unfrozen, as built)."""
    return fastmb.freeze(copy.deepcopy(model), frozen=False)


@pytest.mark.parametrize("change", CHANGES)
def test_every_change_between_forwards_is_seen(change):
    """After the change the memo's forward gives, bit for bit, what a copy that never ran gives;
    without the change (a stale memo) it would give `before`. The changes move these random
    models' logits little (by 1e-8 to 1e-2): the bits tell them apart."""
    model, x = small_model(), image()
    with torch.no_grad():
        before = model(x)
        assert torch.equal(model(x), before)
        assert isinstance(memo_of(model), ir.ForwardMemo)
        change(model)
        fresh = without_plans(model)  # in training a block updates its statistics: each runs once
        after = model(x)
        expected = fresh(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, expected)


def test_an_edit_through_data_is_seen_after_freeze():
    """weight.data.mul_ moves neither the data pointer nor the version counter: the packed
    weights and the memo keep the old values until fastmb.freeze drops them (documented)."""
    model, x = small_model(), image()
    with torch.no_grad():
        before = model(x)
        model(x)
        model.features[4].block[0][0].weight.data.mul_(2.0)  # folded into a packed copy
        assert torch.equal(model(x), before)  # not seen, as documented
        fastmb.freeze(model, frozen=False)
        after = model(x)
        expected = without_plans(model)(x)
    assert not torch.equal(after, before) and torch.equal(after, expected)


@pytest.mark.parametrize("name", ["mobilenetv3_small_100", "efficientnet_b0"])
def test_converted_timm_models_keep_a_memo_and_see_changes(name):
    """timm's MobileNetV3 and EfficientNet classes, converted: the stem, blocks and head replayed,
    and a block's weight changed in place, its depthwise conv's padding mode, or the model's
    blocks reordered, seen."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = fastmb.convert(timm.create_model(name, pretrained=False, num_classes=10)).eval()
    randomize_batch_norm(model)
    x = image()
    with torch.no_grad():
        before = model(x)
        assert torch.equal(model(x), before) and isinstance(memo_of(model), ir.ForwardMemo)
        model.blocks[2][0].conv_pw.weight.mul_(1.5)
        after = model(x)
        assert not torch.equal(after, before) and torch.equal(after, without_plans(model)(x))
        model.blocks[2][0].conv_dw.padding_mode = "reflect"
        reflected = model(x)
        assert not torch.equal(reflected, after) and torch.equal(reflected, without_plans(model)(x))
        model.blocks[1], model.blocks[2] = model.blocks[2], model.blocks[1]  # no longer chains: stages run
        with pytest.raises(RuntimeError):
            model(x)


@pytest.mark.parametrize("where", ["block", "features", "global"])
def test_hooks_added_after_the_memo_run(where):
    model, x = small_model(), image()
    seen = []
    with torch.no_grad():
        model(x)
        model(x)
        hook = lambda module, args, out: seen.append(type(module).__name__)  # noqa: E731
        if where == "block":
            handle = model.features[7].register_forward_hook(hook)
        elif where == "features":
            handle = model.features.register_forward_hook(hook)
        else:
            handle = module_hooks.register_module_forward_hook(hook)
        try:
            model(x)
        finally:
            handle.remove()
        model(x)  # and, the hook removed, a memo again
        assert isinstance(memo_of(model), ir.ForwardMemo)
    assert seen and (where == "global" or len(seen) == 1)



@pytest.mark.parametrize("frozen", [False, True], ids=["live", "frozen"])
def test_a_model_built_under_inference_mode(frozen):
    """A model built under torch.inference_mode has inference tensors for parameters, which have
    no version counter: the packed paths step aside for them (the checks raised), and an
    in-place change made under inference_mode is seen, frozen or not."""
    with torch.inference_mode():
        model, x = fastmb.freeze(small_model(), frozen), image()
        torch.testing.assert_close(model(x), reference(model, x))
        model(x)
        model.features[2].block[0][0].weight.mul_(2)
        torch.testing.assert_close(model(x), reference(model, x))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(model, x))

@pytest.mark.parametrize("setting", ["grad", "reference_backend", "float64", "other_channels"])
def test_the_memo_steps_aside_where_the_op_does_not_apply(setting):
    model, x = small_model(), image()
    with torch.no_grad():
        model(x)
        memo = memo_of(model)
        assert memo is not None
    if setting == "grad":
        y = model(x)
        assert y.requires_grad
        return
    with torch.no_grad():
        if setting == "reference_backend":
            with fastmb.use_backend("reference"), dispatch.record_backends() as backends:
                model(x)
            assert "cpu" not in backends
        elif setting == "float64":
            assert memo(x.double(), memo.key) is None
        else:
            assert memo(torch.randn(1, 4, 64, 64), memo.key) is None


def test_a_model_with_its_memo_pickles_and_copies():
    model, x = small_model(), image()
    with torch.no_grad():
        expected = model(x)
        model(x)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        for other in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
            other.classifier[3].bias.add_(1.0)  # the copy's own weights, not the original's
            torch.testing.assert_close(other(x), expected + 1.0, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(other(x), expected + 1.0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def chain_arguments(name: str) -> list[tuple]:
    """The chain op calls' arguments of a model's memo: (tensors, settings, names, stem)."""
    model = small_model(name)
    with torch.no_grad():
        model(image())
    return [arguments for call, arguments in memo_of(model).steps if call is ir._call_chain]


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v2"])
def test_a_prepared_chain_computes_the_op_at_every_size_and_layout(name):
    # One prepared chain over inputs of other sizes and batches in turn, and over images of one
    # size in other layouts (its stem and blocks made again for each: the stem reads the image
    # through its strides), gives the op's output bit for bit.
    [arguments] = chain_arguments(name)
    tensors, settings, names, stem = arguments
    prepared = fastmb._C.prepare_chain(tensors, settings, names, stem)
    torch.manual_seed(2)
    with torch.no_grad():
        for shape in [(1, 3, 64, 64), (2, 3, 64, 64), (1, 3, 37, 50), (1, 3, 64, 64), (3, 3, 33, 33)]:
            x = torch.randn(shape)
            assert torch.equal(fastmb._C.run_chain(prepared, x), ir._call_chain(x, arguments))
        x = torch.randn(1, 3, 64, 64)
        for view in (x.contiguous(memory_format=torch.channels_last), x, torch.randn(1, 3, 64, 128)[..., ::2], x):
            assert torch.equal(fastmb._C.run_chain(prepared, view), ir._call_chain(view, arguments))


def test_a_prepared_chain_without_a_stem_takes_any_layout():
    [arguments] = chain_arguments("mobilenet_v3_small")
    tensors, settings, names, stem = arguments
    assert stem
    torch.manual_seed(3)
    with torch.no_grad():
        h = ir._call_chain(torch.randn(1, 3, 64, 64), (tensors[:11], settings[:9], names[:5], stem))  # the first block
        rest = (tensors[11:], settings[9:], names[5:], ())
        prepared = (fastmb._C.prepare_chain(*rest), False)
        for x in (h, h.contiguous()):
            assert torch.equal(ir._run_prepared_chain(x, prepared), ir._call_chain(h, rest))


def test_prepared_chain_bad_arguments_raise():
    [arguments] = chain_arguments("mobilenet_v3_small")
    tensors, settings, names, stem = arguments
    with pytest.raises(RuntimeError, match="values per block"):
        fastmb._C.prepare_chain(tensors, settings[:-1], names, stem)
    with pytest.raises(TypeError, match="must be a tensor"):
        fastmb._C.prepare_chain([1.0] + list(tensors[1:]), settings, names, stem)
    with pytest.raises(ValueError, match="seven stem"):
        fastmb._C.prepare_chain(tensors, settings, names, stem[:3])
    with pytest.raises(TypeError):
        fastmb._C.prepare_chain(tensors, ["a"] * len(settings), names, stem)
    prepared = fastmb._C.prepare_chain(tensors, settings, names, stem)
    with pytest.raises(RuntimeError, match="stem"):
        fastmb._C.run_chain(prepared, torch.randn(1, 5, 64, 64))  # the stem takes 3 channels
    fastmb._C.run_chain(prepared, torch.randn(1, 3, 64, 64))
    with pytest.raises(RuntimeError):  # the sizes and strides of the last good call, not its dtype
        fastmb._C.run_chain(prepared, torch.randn(1, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="must be a tensor"):
        fastmb._C.run_chain(prepared, "x")
    with pytest.raises(ValueError):
        fastmb._C.run_chain(object(), torch.randn(1, 3, 64, 64))  # not a prepared chain
    # A block's own checks run when an input of a new size comes: here a residual block is
    # given the wrong channel count.
    wrong = fastmb._C.prepare_chain(tensors[11:], settings[9:], names[5:], ())
    with pytest.raises(RuntimeError, match=r"block 0"):
        fastmb._C.run_chain(wrong, torch.randn(1, 7, 16, 16).contiguous(memory_format=torch.channels_last))


def test_replays_from_several_threads_agree():
    # The prepared chain releases the GIL while it runs and makes its blocks for a new size
    # under a lock: threads replaying one model at two sizes each get their own input's output.
    import threading

    model = small_model()
    torch.manual_seed(4)
    inputs = [torch.randn(1, 3, 64, 64), torch.randn(2, 3, 48, 48)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
        model(inputs[0])
    failures = []

    def replay(x, want):
        with torch.no_grad():
            for _ in range(20):
                if not torch.equal(model(x), want):
                    failures.append(x.shape)

    threads = [threading.Thread(target=replay, args=(x, want)) for x, want in zip(inputs * 2, expected * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_the_profiler_sees_a_replayed_chain():
    model, x = replayed()
    with torch.no_grad():
        assert memo_of(model)._replay is not None
        with torch.profiler.profile() as profile:
            model(x)
    names = {event.name for event in profile.events()}
    assert "fastmb::inverted_residual_chain" in names and "fastmb::classifier_head" in names


def test_the_profiler_sees_each_block_of_a_chain():
    model, x = small_model(), image()
    blocks = [m for m in model.features if type(m).__name__ == "InvertedResidual"]
    # Each block's input, from a reference run: the first block's is the stem's image (it runs inside it).
    inputs = []
    reference_model = copy.deepcopy(model)
    for block in (m for m in reference_model.features if type(m).__name__ == "InvertedResidual"):
        block.register_forward_pre_hook(lambda module, args: inputs.append(list(args[0].shape)))
    with torch.no_grad():
        reference(reference_model, x)
        model(x)
        model(x)
        with torch.profiler.profile(record_shapes=True) as profile:
            model(x)
    [chain] = [e for e in profile.events() if e.name == "fastmb::inverted_residual_chain"]
    block_events = sorted((e for e in profile.events() if e.name == "fastmb::inverted_residual_block"), key=lambda e: e.time_range.start)
    assert len(block_events) == len(blocks)
    assert all(chain.time_range.start <= e.time_range.start and e.time_range.end <= chain.time_range.end for e in block_events)
    assert [e.input_shapes[0] for e in block_events] == [list(x.shape)] + inputs[1:]


def replayed(name: str = "mobilenet_v3_small") -> tuple[nn.Module, torch.Tensor]:
    """A model and its image after two forwards: the first makes the memo, the second its
    native replay."""
    model, x = small_model(name), image()
    with torch.no_grad():
        model(x)
        model(x)
    return model, x


def native_replay(model: nn.Module) -> tuple:
    """fastmb._C.replay's first two arguments for the model's memo: its capsule and check."""
    memo = memo_of(model)
    assert memo is not None and memo._native is not None
    return memo._native


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v2", "mobilenet_v1"])
def test_the_native_replay_gives_the_python_replay(name):
    model, x = replayed(name)
    with torch.no_grad():
        y = fastmb._C.replay(*native_replay(model), x)
        expected = x
        for call, arguments in memo_of(model)._replay:
            expected = call(expected, arguments)
    assert y is not None and torch.equal(y, expected)


class LoggingMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class Tagged(torch.Tensor):
    """A tensor subclass that leaves every op to torch.Tensor."""


# Where the native replay must leave the forward to the Python path: each setting is a context
# and the input the forward then takes.
STEP_ASIDE = {
    "grad": lambda x: (contextlib.nullcontext(), x),
    "autocast": lambda x: (torch.autocast("cpu", dtype=torch.bfloat16), x),
    "reference_backend": lambda x: (fastmb.use_backend("reference"), x),
    "recording": lambda x: (dispatch.record_backends(), x),
    "dispatch_mode": lambda x: (LoggingMode(), x),
    "negative_view": lambda x: (torch.no_grad(), torch._neg_view(-x)),
    "subclass": lambda x: (torch.no_grad(), x.as_subclass(Tagged)),
    "float64": lambda x: (torch.no_grad(), x.double()),
    "other_channels": lambda x: (torch.no_grad(), torch.randn(1, 4, 64, 64)),
}


@pytest.mark.parametrize("setting", list(STEP_ASIDE))
def test_the_native_replay_steps_aside(setting):
    """Under each setting fastmb._C.replay answers None, and the model's forward gives what the
    Python path gives (the op through the dispatcher, or the modules); after it, the replay runs
    again."""
    model, x = replayed()
    with torch.no_grad():
        expected = model(x)
    context, y = STEP_ASIDE[setting](x)
    with torch.set_grad_enabled(setting == "grad"), context as entered:
        assert fastmb._C.replay(*native_replay(model), y) is None
        if setting not in ("float64", "other_channels"):  # those the modules reject, as in torchvision
            out = model(y)
    if setting == "dispatch_mode":
        assert any("fastmb.inverted_residual_chain" in op for op in entered.ops)
    if setting == "recording":
        assert entered == {"cpu"}
    if setting not in ("float64", "other_channels"):
        tolerance = 2e-2 if setting == "autocast" else 1e-5
        torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)
    with torch.no_grad():
        model(x)
        model(x)  # a forward the Python path ran may have made a new memo: its native replay from the second forward on
        assert torch.equal(fastmb._C.replay(*native_replay(model), x), expected)


def test_the_native_replay_steps_aside_for_forward_ad_and_tracing():
    import torch.autograd.forward_ad as forward_ad

    model, x = replayed()
    with torch.no_grad():
        expected = model(x)
    replay = native_replay(model)
    with torch.no_grad(), forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        assert fastmb._C.replay(*replay, dual) is None
        out, tangent = forward_ad.unpack_dual(model(dual))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert tangent is not None

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.seen = model, []

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            self.seen.append(fastmb._C.replay(*replay, image))
            return self.model(image)

    probe = Probe()
    with torch.no_grad():
        traced = torch.jit.trace(probe, x, check_trace=False)
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)
    assert probe.seen == [None]


def test_a_backend_chosen_in_a_thread_gates_its_replays_alone():
    # use_backend is per thread (as dispatch.current_backend): another thread's block leaves this
    # thread's replays running, its own replays step aside, and its choice is undone on exit.
    import threading

    model, x = replayed()
    answers = {}

    def other(backend):
        with torch.no_grad(), fastmb.use_backend(backend):
            answers[backend] = fastmb._C.replay(*native_replay(model), x)
            with fastmb.use_backend("auto"):  # nested: the inner choice, then the outer again
                answers[backend + " inner auto"] = fastmb._C.replay(*native_replay(model), x)
            answers[backend + " again"] = fastmb._C.replay(*native_replay(model), x)
        with torch.no_grad():
            answers[backend + " after"] = fastmb._C.replay(*native_replay(model), x)

    with torch.no_grad(), fastmb.use_backend("cpu"):
        thread = threading.Thread(target=other, args=("reference",))
        thread.start()
        thread.join()
        assert fastmb._C.replay(*native_replay(model), x) is not None
    assert answers["reference"] is None and answers["reference again"] is None
    assert answers["reference inner auto"] is not None and answers["reference after"] is not None
    fastmb.set_backend("reference")
    try:
        with torch.no_grad():
            assert fastmb._C.replay(*native_replay(model), x) is None
            with fastmb.use_backend("cpu"):
                assert fastmb._C.replay(*native_replay(model), x) is not None
    finally:
        fastmb.set_backend("auto")
    with torch.no_grad():
        assert fastmb._C.replay(*native_replay(model), x) is not None


def test_the_native_replay_follows_the_watch_taking_new_versions():
    """A watched dict changed elsewhere than its slots (an attribute no plan reads): the native
    check fails once, the Python check finds the slots unchanged, and the memo makes its native
    replay again from the dicts' new versions."""
    model, x = replayed()
    with torch.no_grad():
        first = native_replay(model)
        model.features[2].note = "unread"
        assert fastmb._C.replay(*first, x) is None
        y = model(x)
        second = native_replay(model)
        assert second is not first and torch.equal(fastmb._C.replay(*second, x), y)


def test_prepare_replay_and_replay_bad_arguments_raise():
    model, x = replayed()
    memo = memo_of(model)
    capsule, check = memo._native
    dicts, versions, tensors, stamps = check
    steps = [ir.NATIVE_STEPS[call](arguments) for call, arguments in memo._replay]
    head = next(step for step in steps if step[0] == "head")
    with pytest.raises(TypeError, match="capsule must be prepare_chain's"):
        fastmb._C.prepare_replay(3, [("chain", object(), True)])
    with pytest.raises(ValueError, match="a step is"):
        fastmb._C.prepare_replay(3, [("conv", object())])
    with pytest.raises(ValueError, match="7 arguments"):
        fastmb._C.prepare_replay(3, [("head", (1, 2))])
    with pytest.raises(TypeError, match="conv_activation must be a str"):
        fastmb._C.prepare_replay(3, [("head", (*head[1][:2], 5, *head[1][3:]))])
    with pytest.raises(TypeError, match="fc_weights must be a tensor"):
        fastmb._C.prepare_replay(3, [("head", (*head[1][:3], [None], *head[1][4:]))])
    with pytest.raises(ValueError):
        fastmb._C.replay(object(), check, x)  # not a prepared replay
    with torch.no_grad():
        with pytest.raises(ValueError, match="8 bytes a dict"):
            fastmb._C.replay(capsule, (dicts, versions[:-8], tensors, stamps), x)
        with pytest.raises(ValueError, match="16 a tensor"):
            fastmb._C.replay(capsule, (dicts, versions, tensors, stamps + b"x"), x)
        with pytest.raises(TypeError, match="dicts must be dicts"):
            fastmb._C.replay(capsule, ((1, *dicts[1:]), versions, tensors, stamps), x)
        with pytest.raises(TypeError, match="tensors must be tensors"):
            fastmb._C.replay(capsule, (dicts, versions, (None, *tensors[1:]), stamps), x)
        with pytest.raises(TypeError, match="4-tuple"):
            fastmb._C.replay(capsule, check[:3], x)
        assert fastmb._C.replay(capsule, check, "x") is None  # not a tensor: the Python path decides
        assert torch.equal(fastmb._C.replay(capsule, check, x), model(x))


def test_a_model_with_a_native_replay_is_freed():
    # The capsule holds no Python references the collector cannot see: the model's dicts hold
    # the memo, which holds the check.
    import gc
    import weakref

    model, _ = replayed()
    assert memo_of(model)._native is not None
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
