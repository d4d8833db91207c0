"""fastmb.nn modules as drop-ins for torchvision's: state_dicts load both ways, and outputs,
gradients and running statistics match in train and eval."""

import copy

import pytest
import torch
from torch import nn
from torchvision.ops import SqueezeExcitation as TorchvisionSE
from torchvision.ops.misc import Conv2dNormActivation

import fastmb
from fastmb.ops.activations import ACTIVATIONS
from oracle import assert_close_to_oracle, clone_as, randomize_batch_norm, run, under_interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def torchvision_dwconv(channels, kernel, stride, activation, momentum=0.1):
    return Conv2dNormActivation(
        channels, channels, kernel, stride, groups=channels,
        norm_layer=lambda c: nn.BatchNorm2d(c, momentum=momentum),
        activation_layer=None if activation == "identity" else lambda inplace=None: ACTIVATIONS[activation].make_module(inplace=False),
    )


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_dwconv_state_dict_round_trip(activation):
    theirs = torchvision_dwconv(16, 5, 2, activation)
    randomize_batch_norm(theirs)
    ours = fastmb.nn.DWConvBNAct(16, 5, stride=2, activation=activation)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = torchvision_dwconv(16, 5, 2, activation)
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)
    assert isinstance(ours[0], nn.Conv2d) and isinstance(ours[1], nn.BatchNorm2d)


def test_se_state_dict_round_trip():
    theirs = TorchvisionSE(24, 8, scale_activation=nn.Hardsigmoid)
    ours = fastmb.nn.SqueezeExcitation(24, 8)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    TorchvisionSE(24, 8).load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_dwconv_matches_torchvision_over_steps(backend, device, dtype, memory_format, momentum):
    """Three training steps then eval: outputs, gradients, running statistics and
    num_batches_tracked agree with torchvision's module by DESIGN.md's rule."""
    if under_interpreter(backend, device) and dtype == torch.float16 and memory_format == torch.contiguous_format:
        pytest.skip("float16 NCHW under the Triton interpreter: the op runs NHWC, covered by float16 NHWC")
    theirs = torchvision_dwconv(8, 3, 1, "hardswish", momentum)
    randomize_batch_norm(theirs)
    ours = fastmb.nn.DWConvBNAct(8, 3, momentum=momentum)
    ours.load_state_dict(theirs.state_dict())
    oracle_module = clone_as(theirs, torch.float64)
    eager_module = clone_as(theirs, dtype, memory_format).to(device)
    fused_module = clone_as(ours, dtype, memory_format).to(device)
    for step in range(4):
        training = step < 3
        for module in (oracle_module, eager_module, fused_module):
            module.train(training)
        x = torch.randn(3, 8, 9, 9) + step
        grad = torch.randn(3, 8, 9, 9)
        inputs = (x.to(device, dtype, memory_format=memory_format), grad.to(device))
        oracle = run(oracle_module, x.double(), grad.double())
        assert_close_to_oracle(run(fused_module, *inputs), run(eager_module, *inputs), oracle, dtype)
        assert fused_module[1].num_batches_tracked.item() == eager_module[1].num_batches_tracked.item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_se_matches_torchvision(backend, device, dtype):
    theirs = TorchvisionSE(16, 8, scale_activation=nn.Hardsigmoid)
    ours = fastmb.nn.SqueezeExcitation(16, 8)
    ours.load_state_dict(theirs.state_dict())
    x, grad = torch.randn(2, 16, 7, 7), torch.randn(2, 16, 7, 7)
    oracle = run(clone_as(theirs, torch.float64), x.double(), grad.double())
    inputs = (x.to(device, dtype, memory_format=torch.channels_last), grad.to(device))
    actual = run(clone_as(ours, dtype).to(device), *inputs)
    assert actual["y"].is_contiguous(memory_format=torch.channels_last)
    assert_close_to_oracle(actual, run(clone_as(theirs, dtype).to(device), *inputs), oracle, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pytorch_first", [False, True], ids=["table", "pytorch-first"])
def test_modules_under_auto_match_torchvision(device, dtype, pytorch_first, monkeypatch):
    """What users run: backend "auto", which on a GPU follows the measured table
    (fastmb/auto_order.json: PyTorch's own kernels for an op where they measured faster); and
    that PyTorch path itself, on any device, as if the table ranked it first."""
    if pytorch_first:
        monkeypatch.setattr(fastmb.dispatch, "runs_pytorch", lambda *args: True)
    theirs = nn.Sequential(torchvision_dwconv(8, 3, 1, "hardswish"), TorchvisionSE(8, 4, scale_activation=nn.Hardsigmoid))
    randomize_batch_norm(theirs)
    ours = nn.Sequential(fastmb.nn.DWConvBNAct(8, 3), fastmb.nn.SqueezeExcitation(8, 4))
    ours.load_state_dict(theirs.state_dict())
    oracle_module = clone_as(theirs, torch.float64)
    eager_module = clone_as(theirs, dtype, torch.channels_last).to(device)
    fused_module = clone_as(ours, dtype, torch.channels_last).to(device)
    for training in (True, True, False):
        for module in (oracle_module, eager_module, fused_module):
            module.train(training)
        x, grad = torch.randn(3, 8, 9, 9), torch.randn(3, 8, 9, 9)
        inputs = (x.to(device, dtype, memory_format=torch.channels_last), grad.to(device))
        oracle = run(oracle_module, x.double(), grad.double())
        assert_close_to_oracle(run(fused_module, *inputs), run(eager_module, *inputs), oracle, dtype)


def test_modules_under_autocast(backend, device):
    stack = nn.Sequential(torchvision_dwconv(8, 3, 1, "hardswish"), TorchvisionSE(8, 4, scale_activation=nn.Hardsigmoid))
    randomize_batch_norm(stack)
    ours = nn.Sequential(fastmb.nn.DWConvBNAct(8, 3), fastmb.nn.SqueezeExcitation(8, 4))
    ours.load_state_dict(stack.state_dict())
    stack, ours = stack.to(device).train(), ours.to(device).train()
    x = torch.randn(2, 8, 10, 10, device=device)
    lower = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=lower):
        expected, actual = stack(x), ours(x)
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), atol=6e-2, rtol=6e-2)
    actual.float().sum().backward()
    assert ours[0][0].weight.grad.dtype == torch.float32


def test_children_and_repr_are_torchvisions():
    """The same children as torchvision's modules (the activation as child "2", the SE's pool,
    activation and gate), so code that indexes, hooks or swaps them finds them."""
    ours, theirs = fastmb.nn.DWConvBNAct(4, 3, activation="relu6"), torchvision_dwconv(4, 3, 1, "relu6")
    theirs[2] = nn.ReLU6(inplace=True)  # torchvision's builders make activations in place
    assert repr(ours).split("\n")[1:] == repr(theirs).split("\n")[1:]
    assert len(fastmb.nn.DWConvBNAct(4, 3, activation="identity")) == 2  # as Conv2dNormActivation without one
    ours, theirs = fastmb.nn.SqueezeExcitation(8, 4), TorchvisionSE(8, 4, scale_activation=nn.Hardsigmoid)
    assert repr(ours).split("\n")[1:] == repr(theirs).split("\n")[1:]


def test_bad_activation_and_gate_names():
    with pytest.raises(ValueError, match="activation must be one of"):
        fastmb.nn.DWConvBNAct(4, 3, activation="mish")
    with pytest.raises(ValueError, match="activation must be one of"):
        fastmb.nn.DWConvBNAct(4, 3).activation = "mish"
    with pytest.raises(ValueError, match="gate must be one of"):
        fastmb.nn.SqueezeExcitation(4, 2, gate="tanh")
    with pytest.raises(ValueError, match="gate must be one of"):
        fastmb.nn.SqueezeExcitation(4, 2).gate = "tanh"
    with pytest.raises(ValueError, match="activation must be one fastmb fuses"):
        fastmb.nn.DWConvBNAct.from_modules(nn.Conv2d(4, 4, 3, groups=4, bias=False), nn.BatchNorm2d(4), nn.Mish())


def test_setting_names_replaces_the_children():
    module = fastmb.nn.DWConvBNAct(4, 3, activation="hardswish")
    module.activation = "relu"
    assert type(module[2]) is nn.ReLU and module.activation == "relu"
    module.activation = "identity"
    assert len(module) == 2 and module.activation == "identity"
    module.append(nn.Mish())
    assert module.activation is None  # a child fastmb does not fuse: called as it is
    se = fastmb.nn.SqueezeExcitation(4, 2)
    se.gate = "sigmoid"
    assert type(se.scale_activation) is nn.Sigmoid and se.gate == "sigmoid"


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("replacement", [nn.ReLU, nn.SiLU, nn.ELU], ids=["relu", "silu", "elu-not-fused"])
def test_swapped_activation_children_compute_as_torchvisions(training, replacement):
    """An activation or gate child replaced by another module: fastmb's modules give what
    torchvision's give with the same replacement, fused where fastmb has the activation (ELU it
    has not: the modules run)."""
    theirs = nn.Sequential(torchvision_dwconv(8, 3, 1, "hardswish"), TorchvisionSE(8, 4, scale_activation=nn.Hardsigmoid))
    randomize_batch_norm(theirs)
    ours = nn.Sequential(fastmb.nn.DWConvBNAct(8, 3), fastmb.nn.SqueezeExcitation(8, 4))
    ours.load_state_dict(theirs.state_dict())
    for model in (ours, theirs):
        model[0][2], model[1].activation, model[1].scale_activation = replacement(), replacement(), nn.Sigmoid()
        model.train(training)
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 8, 9, 9)
    actual, expected = run(ours, x, grad), run(theirs, x, grad)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_pickles_from_before_the_activation_children_load():
    """A DWConvBNAct or SqueezeExcitation pickled when it kept its activation and gate as names
    (no such children) unpickles with the children those names stand for."""
    dw, se = fastmb.nn.DWConvBNAct(4, 3, activation="relu6"), fastmb.nn.SqueezeExcitation(4, 2, gate="sigmoid")
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        expected = se(dw.eval()(x))
    old_dw = dw.__dict__ | {"_modules": {k: v for k, v in dw._modules.items() if k != "2"}, "activation": "relu6"}
    se_children = {k: v for k, v in se._modules.items() if k in ("fc1", "fc2")}
    old_se = se.__dict__ | {"_modules": se_children, "activation": "relu", "gate": "sigmoid"}
    dw2, se2 = fastmb.nn.DWConvBNAct.__new__(fastmb.nn.DWConvBNAct), fastmb.nn.SqueezeExcitation.__new__(fastmb.nn.SqueezeExcitation)
    dw2.__setstate__(dict(old_dw))
    se2.__setstate__(dict(old_se))
    assert dw2.activation == "relu6" and type(dw2[2]) is nn.ReLU6
    assert type(se2.activation) is nn.ReLU and se2.gate == "sigmoid" and isinstance(se2.avgpool, nn.AdaptiveAvgPool2d)
    with torch.no_grad():
        torch.testing.assert_close(se2(dw2(x)), expected)


def test_deepcopy_and_eval_without_grad(backend, device):
    module = fastmb.nn.DWConvBNAct(4, 3).to(device).eval()
    copy.deepcopy(module)
    with torch.inference_mode():
        y = module(torch.randn(1, 4, 5, 5, device=device))
    assert y.shape == (1, 4, 5, 5) and not y.requires_grad


def test_eval_conv_bn_off_the_cpu_folds_only_when_frozen(monkeypatch):
    """On a GPU (here the meta device) an unfrozen eval ConvBNAct runs its modules as eager does:
    a fold on every call is six small kernels there. fastmb.freeze folds once."""
    from fastmb.nn import conv_bn_act

    folds = []
    fold = conv_bn_act.fold_conv_bn
    monkeypatch.setattr(conv_bn_act, "fold_conv_bn", lambda *args: folds.append(1) or fold(*args))
    layer = fastmb.nn.ConvBNAct(4, 8, 1, activation="relu").eval().to("meta")
    x = torch.empty(1, 4, 5, 5, device="meta")
    with torch.no_grad():
        assert layer(x).shape == (1, 8, 5, 5) and folds == []
        fastmb.freeze(layer)
        layer(x), layer(x)
    assert folds == [1]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_dwconv_with_swapped_children_runs_them(training):
    """Children that are no longer what the fused op computes run as modules: the batch norm
    folded into the conv by hand (torch.nn.utils.fusion) and replaced by Identity, or a norm of
    another kind (they raised AttributeError on the batch norm's momentum)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    module = fastmb.nn.DWConvBNAct(8, 3, activation="hardswish")
    randomize_batch_norm(module)
    module.train(training)
    x = torch.randn(2, 8, 9, 9)
    if training:
        module[1] = nn.GroupNorm(2, 8)
    else:
        module[0], module[1] = fuse_conv_bn_eval(module[0].eval(), module[1].eval()), nn.Identity()
    with torch.set_grad_enabled(training):
        torch.testing.assert_close(module(x), nn.functional.hardswish(module[1](module[0](x))))


def test_se_with_a_changed_conv_computes_as_its_modules():
    """An FC layer whose settings were changed (padding) is run as the conv it now is: the
    module raises as torchvision's does (the fused op had ignored the padding)."""
    ours = fastmb.nn.SqueezeExcitation(8, 4)
    theirs = TorchvisionSE(8, 4, scale_activation=nn.Hardsigmoid)
    theirs.load_state_dict(ours.state_dict())
    for module in (ours, theirs):
        module.fc1.padding = (1, 1)
    x = torch.randn(2, 8, 5, 5)
    for module in (ours, theirs):
        with pytest.raises(RuntimeError, match="size of tensor"):
            module(x)
