"""The fused head (fastmb::classifier_head, eval on the CPU): the last 1x1 ConvBNAct, global
average pooling and the classifier's linear layers against the modules, for V2's and V3's
layouts, batch sizes in each of the linear layers' three paths (matrix-vector rows, fastmb's GEMM
with the roles swapped, ATen's GEMM), one and two threads, and one image's first layer run
under the conv; weights changed between calls; the cases where it must step aside."""

import contextlib

import pytest
import torch
from torch import nn

import fastmb
from fastmb.nn import ConvBNAct
from fastmb.ops.classifier_head import NATIVE, FusedHead, forward_with_fused_head
from oracle import FLOOR, randomize_batch_norm, threads

pytestmark = pytest.mark.skipif(not NATIVE, reason="fastmb._C has no CPU classifier_head kernel")


class Head(nn.Module):
    """features (a stand-in layer, then the last 1x1 ConvBNAct), avgpool, classifier."""

    def __init__(self, v3: bool, channels: int = 24, hidden: int = 40, classes: int = 10, width: int = 56) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Identity(), ConvBNAct(channels, width, 1, activation="hardswish" if v3 else "relu6"))
        self.avgpool = nn.AdaptiveAvgPool2d(1) if v3 else None
        if v3:
            self.classifier = nn.Sequential(nn.Linear(width, hidden), nn.Hardswish(inplace=True), nn.Dropout(0.2), nn.Linear(hidden, classes))
        else:
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(width, classes))
        randomize_batch_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_with_fused_head(self, x, self.features, self.avgpool, self.classifier)

    def unfused(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x) if self.avgpool is not None else nn.functional.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


def check(head: Head, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    ran = []
    original = FusedHead.__call__
    monkeypatch.setattr(FusedHead, "__call__", lambda self, x, program=None: ran.append(1) or original(self, x, program))
    with torch.no_grad():
        fused = head(x)
        with fastmb.use_backend("reference"):
            eager = head.unfused(x)
            oracle = head.double().unfused(x.double())
        head.float()
    assert ran, "the fused head did not run"
    fused_error = (fused.double() - oracle).abs().max().item()
    eager_error = (eager.double() - oracle).abs().max().item()
    assert fused_error <= 2 * eager_error + FLOOR[torch.float32] * max(oracle.abs().max().item(), 1.0), (fused_error, eager_error)
    return fused


@pytest.mark.parametrize("thread_count", [1, 2, 3])  # 3 images on 2 threads, 1 or 6 on 3: each image's panels split
@pytest.mark.parametrize("batch", [1, 3, 6, 21, 70])  # 1, 3: rows; 6, 21: swapped GEMM (a partial panel); 70: ATen
@pytest.mark.parametrize("v3", [True, False], ids=["v3", "v2"])
def test_head_matches_its_modules(v3, batch, thread_count, monkeypatch):
    torch.manual_seed(0)
    head = Head(v3).eval()
    x = torch.randn(batch, 24, 7, 5).contiguous(memory_format=torch.channels_last)
    with threads(thread_count):
        check(head, x, monkeypatch)


@pytest.mark.parametrize("thread_count", [1, 2, 3, 4])  # 2, 4: the groups share out; 3: they do not
@pytest.mark.parametrize("width", [128, 256])  # 2 and 4 groups of 64 of the first layer's inputs
@pytest.mark.parametrize("v3", [True, False], ids=["v3", "v2"])
def test_first_layer_under_the_conv_matches_its_modules(v3, width, thread_count, monkeypatch):
    """One image, with the first linear layer by groups of inputs (conv_pool_linear where they
    share out over the threads), partial panels of outputs (40 hidden values, 10 classes)."""
    torch.manual_seed(0)
    head = Head(v3, width=width).eval()
    x = torch.randn(1, 24, 7, 5).contiguous(memory_format=torch.channels_last)
    with threads(thread_count):
        before = check(head, x, monkeypatch)
        with torch.no_grad():  # the packed copy is made again from the changed weight
            head.classifier[0 if v3 else 1].weight.mul_(-2.0)
        after = check(head, x, monkeypatch)
    assert head.__dict__["_fastmb_head"][-1].arguments()[-1] is not None
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("batch", [1, 2])
def test_first_layer_by_groups_is_read_only_where_it_runs_under_the_conv(batch):
    """fc1_by_groups is what the op reads at batch 1 on two threads, and nowhere else: a zeroed
    copy changes those logits only."""
    torch.manual_seed(0)
    head = Head(True, width=128).eval()
    x = torch.randn(batch, 24, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        head(x)
    weight, bias, act, fc_weights, fc_biases, fc_acts, by_groups = head.__dict__["_fastmb_head"][-1].arguments()
    op = torch.ops.fastmb.classifier_head
    with threads(2):
        plain = op(x, weight, bias, act, fc_weights, fc_biases, fc_acts)
        grouped = op(x, weight, bias, act, fc_weights, fc_biases, fc_acts, by_groups)
        zeroed = op(x, weight, bias, act, fc_weights, fc_biases, fc_acts, torch.zeros_like(by_groups))
    torch.testing.assert_close(grouped, plain)
    assert torch.equal(zeroed, plain) == (batch != 1)


def test_weight_changes_between_calls_are_picked_up(monkeypatch):
    torch.manual_seed(0)
    head = Head(True).eval()
    x = torch.randn(2, 24, 7, 7)
    before = check(head, x, monkeypatch)
    with torch.no_grad():
        head.classifier[3].bias.add_(1.0)
    after = check(head, x, monkeypatch)
    head.features[1][1].running_mean = torch.rand(56)
    check(head, x, monkeypatch)
    head.classifier[0] = nn.Linear(56, 40)  # a new module: a new plan
    check(head, x, monkeypatch)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("setting", ["train", "dropout_train", "grad", "float64", "reference_backend", "unknown_layer"])
def test_steps_aside_where_it_does_not_apply(setting, monkeypatch):
    torch.manual_seed(0)
    head = Head(True).eval()
    x = torch.randn(2, 24, 7, 7)
    context = contextlib.nullcontext()
    if setting == "train":
        head.train()
    elif setting == "dropout_train":
        head.classifier[2].train()
    elif setting == "grad":
        context = torch.enable_grad()
    elif setting == "float64":
        head, x = head.double(), x.double()
    elif setting == "reference_backend":
        context = fastmb.use_backend("reference")
    else:
        head.classifier.append(nn.Softmax(dim=1))
    ran = []
    original = FusedHead.__call__
    monkeypatch.setattr(FusedHead, "__call__", lambda self, x, program=None: ran.append(original(self, x, program) is not None))
    with torch.no_grad(), context:
        y = head(x)
    assert not any(ran)
    if setting not in ("train", "dropout_train"):  # dropout draws at random in training
        with torch.no_grad():
            torch.testing.assert_close(y, head.unfused(x))


def test_op_rejects_bad_arguments_by_name():
    torch.manual_seed(0)
    head = Head(True).eval()
    x = torch.randn(1, 24, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        head(x)
    weight, bias, act, fc_weights, fc_biases, fc_acts, _ = head.__dict__["_fastmb_head"][-1].arguments()
    op = torch.ops.fastmb.classifier_head
    with pytest.raises(RuntimeError, match="conv_weight"):
        op(x[:, :20].contiguous(memory_format=torch.channels_last), weight, bias, act, fc_weights, fc_biases, fc_acts)
    with pytest.raises(RuntimeError, match=r"fc_weights\[i\]"):
        op(x, weight, bias, act, fc_weights[::-1], fc_biases, fc_acts)
    with pytest.raises(RuntimeError, match="as many"):
        op(x, weight, bias, act, fc_weights, fc_biases[:1], fc_acts)
    with pytest.raises(RuntimeError, match="no pixels"):
        op(x[:, :, :0].contiguous(memory_format=torch.channels_last), weight, bias, act, fc_weights, fc_biases, fc_acts)
    with pytest.raises(RuntimeError, match="groups of 64"):  # 56 conv channels
        op(x, weight, bias, act, fc_weights, fc_biases, fc_acts, torch.zeros(1, 3, 64, 16))
    wide = Head(True, width=128).eval()
    with torch.no_grad():
        wide(x)
    weight, bias, act, fc_weights, fc_biases, fc_acts, by_groups = wide.__dict__["_fastmb_head"][-1].arguments()
    for bad in (by_groups[:1], by_groups.transpose(2, 3), by_groups.double()):
        with pytest.raises(RuntimeError, match="fc1_by_groups"):
            op(x, weight, bias, act, fc_weights, fc_biases, fc_acts, bad)


def test_activation_names_outlive_boxed_calls():
    """Under the profiler (record_shapes: the op called boxed), the list of activation names was
    unpacked into views of strings the boxed call freed; with a large batch the head's own
    allocations reused that memory and the op read garbage names. A whole model at batch 16,
    whose head allocates enough, repeats its output each call."""
    model = fastmb.mobilenet_v3_small().eval().to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        for _ in range(3):
            with torch.profiler.profile(record_shapes=True):
                y = model(x)
            torch.testing.assert_close(y, expected, rtol=0, atol=0)
