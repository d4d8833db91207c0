"""fastmb.freeze: inference with weights that no longer change."""

from torch import nn

from fastmb.nn import ConvBNAct

# Where the whole-block eval ops keep their plans (packed weights) and a model its ForwardMemo.
_CACHES = ("_fastmb_fused", "_fastmb_stem", "_fastmb_head", "_fastmb_forward")


def freeze(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Lets `model`'s fused layers keep what they derive from their weights (the batch norms
    folded into the convs) from one eval call to the next, like torch.jit.freeze: saves the
    fold's pass over the weights, and may miss weights changed through ``.data`` afterwards
    (changes through the tensors themselves, load_state_dict and optimizers are still seen;
    the CPU's batch-1 1x1 GEMM path folds nothing and sees every change).
    Call it again after such changes, or with frozen=False to fold on every call again (the
    default). Either way it also drops the whole-block ops' packed weights (the CPU's eval path
    for whole blocks, stems and heads), which are kept whether frozen or not and made again
    when a tensor's data pointer or version counter changes: an in-place edit through
    ``.data`` (``weight.data.mul_(2)``) changes neither, so after one call freeze. Returns
    `model`."""
    for module in model.modules():
        if isinstance(module, ConvBNAct):
            module.frozen = frozen
            module._folded = None
        for name in _CACHES:
            module.__dict__.pop(name, None)
    return model
