"""Operator schemas shared by every backend. csrc/fastmb.cpp defines the same ones for the
native ops (fastmb::<name>); the reference backend defines them as fastmb::<name>_reference.
tests/ops/test_schemas.py keeps the two in step."""

DWCONV_BN_ACT = (
    "(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor? running_mean, "
    "Tensor? running_var, int[2] stride, int[] padding, int[2] dilation, float eps, "
    "bool training, str activation) -> (Tensor, Tensor, Tensor)"
)
DWCONV_BN_ACT_BACKWARD = (
    "(Tensor grad_y, Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor mean, "
    "Tensor var, int[2] stride, int[] padding, int[2] dilation, float eps, bool training, "
    "str activation, bool[3] output_mask, Tensor? batch_sums=None, int batch_count=0) -> (Tensor, Tensor, Tensor, Tensor)"
)
SQUEEZE_EXCITATION = (
    "(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
    "str activation, str gate) -> (Tensor, Tensor)"
)
SQUEEZE_EXCITATION_BACKWARD = (
    "(Tensor grad_y, Tensor x, Tensor pooled, Tensor fc1_weight, Tensor? fc1_bias, "
    "Tensor fc2_weight, Tensor? fc2_bias, str activation, str gate) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
