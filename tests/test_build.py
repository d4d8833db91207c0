"""setup.py's knobs and messages, on a copy of the source tree (compiles the C++ part once)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def source_copy(destination: Path) -> Path:
    for name in ("setup.py", "pyproject.toml", "build_backend.py", "README.md"):
        shutil.copy(ROOT / name, destination / name)
    for name in ("csrc", "fastmb", "kernels"):
        shutil.copytree(ROOT / name, destination / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return destination


def setup_py(tree: Path, *args: str, python: tuple[str, ...] = (sys.executable,), **env: str):
    return subprocess.run(
        [*python, "setup.py", *args], cwd=tree, env={**os.environ, **env}, capture_output=True, text=True, timeout=900
    )


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_skip_cuda_builds_and_backends_say_why(tmp_path):
    tree = source_copy(tmp_path)
    build = setup_py(tree, "build_ext", "--inplace", FASTMB_SKIP_CUDA="1")
    assert build.returncode == 0, build.stderr[-3000:]
    probe = subprocess.run(
        [sys.executable, "-c", "import fastmb; print(fastmb.backends()['cuda'])"],
        cwd=tree, capture_output=True, text=True, timeout=300,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert "FASTMB_SKIP_CUDA=1" in probe.stdout


def test_missing_compiler_is_one_clear_message(tmp_path):
    result = setup_py(source_copy(tmp_path), "build_ext", CXX="/nonexistent/c++")
    assert result.returncode != 0
    assert "needs a C++ compiler" in result.stderr and "Traceback" not in result.stderr


def test_missing_torch_is_one_clear_message(tmp_path):
    # -S: no site-packages, so neither torch nor setuptools can be imported.
    result = setup_py(source_copy(tmp_path), "build_ext", python=(sys.executable, "-S"))
    assert result.returncode != 0
    assert "torch must be installed first" in result.stderr and "Traceback" not in result.stderr
