"""Autograd beyond first-order backward: double backward (gradient penalties), torch.func's
grad, jacrev, jvp and vmap, and forward-mode AD. They run through the fused ops' composites (plain
differentiable PyTorch ops), and must equal eager PyTorch's modules, never a silent zero."""

import copy

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn

import fastmb
from oracle import EagerSqueezeExcitation, eager_dwconv_bn_act, randomize_batch_norm

CLOSE = {"atol": 1e-9, "rtol": 1e-7}


def module_pair(kind: str, training: bool) -> tuple[nn.Module, nn.Module]:
    """(fastmb module, eager module) with the same float64 parameters."""
    if kind == "dwconv":
        eager = eager_dwconv_bn_act(4, 3, stride=2, activation="hardswish")
        randomize_batch_norm(eager)
        fused = fastmb.nn.DWConvBNAct(4, 3, stride=2, activation="hardswish")
    else:
        eager, fused = EagerSqueezeExcitation(4, 2, "relu", "sigmoid"), fastmb.nn.SqueezeExcitation(4, 2, "relu", "sigmoid")
    fused.load_state_dict(eager.state_dict())
    return fused.double().train(training), eager.double().train(training)


@pytest.mark.parametrize("kind, training", [("dwconv", True), ("dwconv", False), ("se", False)], ids=["dwconv-train", "dwconv-eval", "se"])
def test_double_backward_matches_eager(backend, device, kind, training):
    """A gradient penalty: d/dtheta of |dL/dx|^2, through every parameter."""
    results = []
    for module in module_pair(kind, training):
        module = module.to(device)
        x = torch.randn(2, 4, 7, 7, dtype=torch.float64, device=device, generator=torch.Generator(device).manual_seed(0))
        x.requires_grad_()
        y = module(x)
        (grad_x,) = torch.autograd.grad((y * y.detach().sin()).sum(), x, create_graph=True)
        grad_x.pow(2).sum().backward()
        results.append([x.grad, *(p.grad for p in module.parameters())])
    for ours, theirs in zip(*results):
        assert theirs is not None and theirs.abs().max() > 0
        torch.testing.assert_close(ours, theirs, **CLOSE)


def functional_dwconv(x, weight, bn_weight, bn_bias, training=True):
    stats = (None, None) if training else (torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype))
    return fastmb.ops.dwconv_bn_act(x, weight, bn_weight, bn_bias, *stats, stride=2, training=training, activation="relu6")


def eager_dwconv(x, weight, bn_weight, bn_bias, training=True):
    stats = (None, None) if training else (torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype))
    z = nn.functional.conv2d(x, weight, None, 2, 1, 1, x.shape[1])
    return nn.functional.relu6(nn.functional.batch_norm(z, *stats, bn_weight, bn_bias, training))


def inputs():
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=generator),
        torch.randn(3, 1, 3, 3, dtype=torch.float64, generator=generator),
        torch.rand(3, dtype=torch.float64, generator=generator) + 0.5,
        torch.randn(3, dtype=torch.float64, generator=generator),
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_func_grad_and_jacrev(training):
    def loss(f):
        return lambda *args: f(*args, training=training).sin().sum()

    args = inputs()
    ours = torch.func.grad(loss(functional_dwconv), argnums=(0, 1, 2, 3))(*args)
    theirs = torch.func.grad(loss(eager_dwconv), argnums=(0, 1, 2, 3))(*args)
    for a, b in zip(ours, theirs):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, **CLOSE)
    jacobians = [torch.func.jacrev(lambda w, f=f: f(args[0], w, *args[2:], training=training))(args[1]) for f in (functional_dwconv, eager_dwconv)]
    torch.testing.assert_close(*jacobians, **CLOSE)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jvp_and_forward_mode_ad(training):
    args = inputs()
    tangents = tuple(torch.randn_like(a) for a in args)
    ours = torch.func.jvp(lambda *a: functional_dwconv(*a, training=training), args, tangents)[1]
    theirs = torch.func.jvp(lambda *a: eager_dwconv(*a, training=training), args, tangents)[1]
    assert theirs.abs().max() > 0
    torch.testing.assert_close(ours, theirs, **CLOSE)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(args[0], tangents[0])
        tangent = forward_ad.unpack_dual(functional_dwconv(dual, *args[1:], training=training)).tangent
    expected = torch.func.jvp(lambda x: eager_dwconv(x, *args[1:], training=training), (args[0],), (tangents[0],))[1]
    torch.testing.assert_close(tangent, expected, **CLOSE)


def test_vmap_over_images_and_se():
    """vmap over a batch of images, each a batch of one; eval, so statistics are fixed."""
    args = inputs()
    batched = args[0].unsqueeze(1)  # (2, 1, C, H, W): vmap runs two batches of one image
    ours = torch.func.vmap(lambda x: functional_dwconv(x, *args[1:], training=False))(batched)
    theirs = torch.func.vmap(lambda x: eager_dwconv(x, *args[1:], training=False))(batched)
    torch.testing.assert_close(ours, theirs, **CLOSE)
    fused, eager = module_pair("se", False)
    images = torch.randn(2, 1, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(fused)(images), torch.func.vmap(eager)(images), **CLOSE)


def test_pointwise_layers_under_transforms():
    """ConvBNAct: the eval fold under torch.func.grad and jvp, and the training BN + activation
    Function under double backward. (Training-mode batch norms update their running statistics
    in place, which torch.func refuses for eager ones too.)"""
    fused = fastmb.nn.ConvBNAct(3, 5, 1, activation="hardswish").double()
    randomize_batch_norm(fused)
    eager = copy.deepcopy(nn.Sequential(*fused.children()))
    x = inputs()[0]
    fused.eval(), eager.eval()
    grads = [torch.func.grad(lambda x, m=m: m(x).sin().sum())(x) for m in (fused, eager)]
    torch.testing.assert_close(*grads, **CLOSE)
    tangent = torch.randn_like(x)
    torch.testing.assert_close(*(torch.func.jvp(m, (x,), (tangent,))[1] for m in (fused, eager)), **CLOSE)
    fused.train(), eager.train()
    results = []
    for module in (fused, eager):
        xi = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(module(xi).sin().sum(), xi, create_graph=True)
        grad_x.pow(2).sum().backward()
        results.append([xi.grad, *(p.grad for p in module.parameters())])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, **CLOSE)
