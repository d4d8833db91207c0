"""fastmb.freeze: inference with weights that no longer change."""

from torch import nn

from fastmb.nn import ConvBNAct


def freeze(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Lets `model`'s fused layers keep what they derive from their weights (the batch norms
    folded into the convs) from one eval call to the next, like torch.jit.freeze: faster where
    that work shows (batch 1), and blind to weights changed through ``.data`` afterwards
    (changes through the tensors themselves, load_state_dict and optimizers are still seen).
    Call it again after such changes, or with frozen=False to fold on every call again (the
    default: never stale). Returns `model`."""
    for module in model.modules():
        if isinstance(module, ConvBNAct):
            module.frozen = frozen
            module._folded = None
    return model
