"""setup.py's knobs and messages, without compiling the extension again: what setup.py would
build under each knob, how the built extension reports a skipped CUDA part, and the one-line
errors for a missing compiler or torch."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")


@pytest.fixture
def setup_module(monkeypatch):
    """setup.py imported as a module: its functions, without running setup()."""
    monkeypatch.chdir(ROOT)
    spec = importlib.util.spec_from_file_location("fastmb_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_skip_cuda_builds_the_cpp_part_alone(setup_module, monkeypatch):
    monkeypatch.setenv("FASTMB_SKIP_CUDA", "1")
    extension = setup_module.extension()
    assert not any(source.endswith(".cu") for source in extension.sources)
    assert any(source.startswith(os.path.join("csrc", "cpu", "dwconv")) for source in extension.sources)
    assert f"-DFASTMB_CUDA_STATUS={setup_module.CUDA_SKIPPED}" in extension.extra_compile_args["cxx"]


def test_ptx_only_asks_nvcc_for_ptx_of_each_architecture(setup_module, monkeypatch):
    monkeypatch.delenv("FASTMB_CUDA_PTX_ONLY", raising=False)
    assert setup_module.ptx_only_flags() == []
    monkeypatch.setenv("FASTMB_CUDA_PTX_ONLY", "1")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert setup_module.ptx_only_flags() == ["-gencode=arch=compute_80,code=compute_80", "-gencode=arch=compute_90,code=compute_90"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Hopper")
    with pytest.raises(SystemExit, match="TORCH_CUDA_ARCH_LIST"):
        setup_module.ptx_only_flags()


@pytest.mark.parametrize("status, reason", [(1, "FASTMB_SKIP_CUDA=1"), (2, "no CUDA toolkit"), (4, "no CUDA support"), (0, "built")])
def test_the_extension_says_why_its_cuda_part_was_skipped(tmp_path, status, reason):
    """csrc/build_info.cpp, which fastmb.backends() quotes, compiled alone for each status."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip("no C++ compiler")
    main = tmp_path / "main.cpp"
    main.write_text('#include <cstdio>\n#include "build_info.h"\nint main() { std::puts(fastmb::cuda_build_status()); }\n')
    binary = tmp_path / "build_info"
    sources = [str(ROOT / "csrc" / "build_info.cpp"), str(main)]
    if status == 0:  # the CUDA part defines cuda_archs()
        sources.append(str(tmp_path / "archs.cpp"))
        (tmp_path / "archs.cpp").write_text('namespace fastmb { const char* cuda_archs() { return "900"; } }\n')
    subprocess.run([compiler, f"-DFASTMB_CUDA_STATUS={status}", f"-I{ROOT / 'csrc'}", *sources, "-o", str(binary)], check=True, timeout=120)
    message = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    assert reason in message


def setup_py(tree: Path, *args: str, python: tuple[str, ...] = (sys.executable,), **env: str):
    return subprocess.run(
        [*python, "setup.py", *args], cwd=tree, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


def test_missing_compiler_is_one_clear_message():
    result = setup_py(ROOT, "build_ext", "--dry-run", CXX="/nonexistent/c++")
    assert result.returncode != 0
    assert "needs a C++ compiler" in result.stderr and "Traceback" not in result.stderr


def test_missing_torch_is_one_clear_message():
    # -S: no site-packages, so neither torch nor setuptools can be imported.
    result = setup_py(ROOT, "build_ext", "--dry-run", python=(sys.executable, "-S"))
    assert result.returncode != 0
    assert "torch must be installed first" in result.stderr and "Traceback" not in result.stderr
