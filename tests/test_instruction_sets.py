"""The CPU kernels' lower instruction-set tables (AVX2, baseline), which a CPU with a higher one
never picks on its own: FASTMB_ISA caps the choice, and the depthwise, batch-norm, stem,
inverted-residual and classifier-head tests run again under each cap in a fresh process (the
choice is made once per process)."""

import platform
from pathlib import Path

import pytest

import fastmb
from fastmb import _extension
from oracle import run_python

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the per-ISA tables are x86-64's")
@pytest.mark.skipif(fastmb.backends()["cpu"] != "available", reason="no CPU kernels")
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_lower_instruction_set_kernels_pass_the_same_tests(isa):
    order = ["baseline", "avx2", "avx512"]
    if order.index(isa) >= order.index(_extension.C.cpu_isa):
        # the host's own table (or one it cannot run): the whole suite ran it already
        pytest.skip(f"this CPU's kernels run the {_extension.C.cpu_isa} table: {isa} is not a lower one")
    names = ("ops/test_dwconv_bn_act.py", "ops/test_batch_norm_act.py", "ops/test_stem_conv_bn_act.py", "ops/test_conv_weight_grad.py",
             "nn/test_inverted_residual.py", "nn/test_classifier_head.py")
    tests = [str(HERE / name) for name in names]
    # the stem's and the weight gradient's files: all of them; the chain op's runs of blocks and a
    # stem alone; not opcheck (the ops' registrations, the same under every cap: 3 s a run); the
    # head at every batch size
    selection = ("(cpu or matches_its_layers or match_their_layers or float32_by_the_rule or stem_conv_bn_act or conv_weight_grad or full_conv or chain or alone"
                 " or head_matches_its_modules) and not opcheck")
    result = run_python(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests, "-k", selection], env={"FASTMB_ISA": isa})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
