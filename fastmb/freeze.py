"""fastmb.freeze: inference with weights that no longer change."""

from torch import nn

from fastmb.nn import ConvBNAct


def freeze(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Lets `model`'s fused layers keep what they derive from their weights (the batch norms
    folded into the convs) from one eval call to the next, like torch.jit.freeze: saves the
    fold's pass over the weights, and may miss weights changed through ``.data`` afterwards
    (changes through the tensors themselves, load_state_dict and optimizers are still seen;
    the CPU's batch-1 1x1 GEMM path folds nothing and sees every change).
    Call it again after such changes, or with frozen=False to fold on every call again (the
    default: never stale). Returns `model`."""
    for module in model.modules():
        if isinstance(module, ConvBNAct):
            module.frozen = frozen
            module._folded = None
    return model
