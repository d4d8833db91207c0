#!/usr/bin/env bash
# The prepared GPU check for one NVIDIA GPU machine (no network; its own torch and Triton). In
# order of what a short lease most needs: build fastmb in place; compute-sanitizer memcheck over
# each CUDA kernel variant; the GPU benchmarks of eager PyTorch, fastmb's "auto" and its CUDA
# kernels (copy bandwidth, ops, model; bf16 ops only); the CUDA time of each kernel at a few
# shapes (bench/gpu_kernel_profile.py); the test suite on CUDA tensors (every backend but
# Triton and reference, 16 workers); the Triton tests (one config each) and the reference
# backend's; the Triton kernels' benchmarks (their autotuning compiles too); last torch.compile
# against eager (its compiles take minutes). One overall deadline (FASTMB_GPU_CHECK_SECONDS,
# default 450: the whole check, build included, fits the device budget); each step gets what is
# left of it up to its own cap and writes its log to $OUT (default bench/results/latest) as it
# finishes, so a check cut short still brings back the steps it finished, each benchmark's
# "timed:" line and each finished test's line.
# Exits non-zero if the build, any test or the memcheck run fails, or a step ran out of time.
# Through the device tool, whose $OUT brings back 8 files at most:
#   R=$OUT; OUT=/tmp/gc bash bench/gpu_check.sh; rc=$?; tar czf $R/gpu_check.tgz -C /tmp gc; exit $rc
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/latest}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1 FASTMB_CUDA_PTX_ONLY=0  # SASS: the kernels run here
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
deadline=$(( $(date +%s) + ${FASTMB_GPU_CHECK_SECONDS:-450} ))
failed=0

# step NAME CAP LOG COMMAND...: COMMAND under `timeout` for CAP seconds or what is left of the
# deadline, output to $OUT/LOG; a line per step in $OUT/steps.txt. Returns COMMAND's status.
step() {
  local name=$1 cap=$2 log=$3 left start status
  shift 3
  left=$(( deadline - $(date +%s) ))
  if (( left < 10 )); then
    echo "gpu_check: $name not run: no time left" | tee -a "$OUT/steps.txt"
    failed=1
    return 124
  fi
  start=$(date +%s)
  timeout $(( left < cap ? left : cap )) "$@" > "$OUT/$log" 2>&1
  status=$?
  echo "gpu_check: $name $(( $(date +%s) - start )) s, exit $status" | tee -a "$OUT/steps.txt"
  (( status == 124 )) && failed=1
  return $status
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if ! step build 240 build.log python setup.py build_ext --inplace; then
  tail -40 "$OUT/build.log"
  exit 2
fi
python -c "import fastmb; print('backends', fastmb.backends())" | tee "$OUT/backends.txt"

sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null)
if [ -n "$sanitizer" ]; then
  step memcheck 60 memcheck.log "$sanitizer" --tool memcheck --error-exitcode 9 python bench/memcheck_cuda.py || failed=1
  echo "gpu_check: memcheck $(grep -c '^ok' "$OUT/memcheck.log") cases ok, $(grep -c '^FAIL' "$OUT/memcheck.log") failed"
  grep -E "^FAIL|ERROR SUMMARY" "$OUT/memcheck.log" | head -5
else
  echo "gpu_check: no compute-sanitizer on this machine; memcheck not run" | tee -a "$OUT/steps.txt"
fi

bench_step() {  # NAME CAP PYTEST-ARGS...: one benchmark process, its summary table printed
  local name=$1 cap=$2
  shift 2
  step "$name" "$cap" "$name.log" python -m pytest -s -q -p no:cacheprovider "$@"
  sed -n '/^speedup over/,$p' "$OUT/$name.log" | grep -E "^speedup over|model |geometric|  (dwconv|se) .* over"
}
# eager_cl is each benchmark process's baseline; fp16 ops run the same kernels as bf16.
models_and_ops=(bench/test_models_gpu.py bench/test_ops_gpu.py)
# It writes auto_order.json from eager and cuda; bench_triton's, if it gets to run, replaces it.
FASTMB_AUTO_ORDER_OUT="$OUT/auto_order.json" bench_step bench_fastmb 100 "${models_and_ops[@]}" \
  -k "not compile and not triton and not torch.float16"

# Per-kernel CUDA times at a few shapes (which pass of a slow op to work on); one Triton config.
step kernel_profile 60 kernel_profile.log env FASTMB_TRITON_AUTOTUNE=0 python bench/gpu_kernel_profile.py

# The tests in two steps, the CUDA kernels' first (and the modules' tests under "auto", the
# native ops' hostile inputs: that machine's compiler once gave them a crashing C++ runtime), then
# the Triton and reference backends': a step cut short still validates the CUDA kernels. One
# CPU thread per worker: 16 workers of 16 OpenMP threads each ran 313 tests in 120 s, one thread
# each 981 in 50 s (2026-12-04). Each test's time, and a failure's traceback, go to
# $OUT/test_times.txt as it finishes; a crashed worker's Python stack to test_times.txt.crash-gwN.
test_step() {  # NAME CAP PYTEST-K
  step "$1" "$2" "$1.log" env FASTMB_TEST_DEVICE=cuda FASTMB_TRITON_AUTOTUNE=0 OMP_NUM_THREADS=1 \
    FASTMB_TEST_TIMES="$OUT/test_times.txt" python -m pytest tests/ops tests/nn \
    tests/test_compile.py tests/test_backends.py tests/test_bad_inputs.py tests/test_extension.py \
    -k "$3" -v -n 16 --durations=15 -p no:cacheprovider \
    --junitxml="$OUT/$1.xml" || failed=1
  grep -E "^(FAILED|ERROR)" "$OUT/$1.log" 2>/dev/null | head -20
  echo "gpu_check: $1 $(grep -c ' PASSED ' "$OUT/$1.log") passed, $(grep -c ' FAILED ' "$OUT/$1.log") failed"
  tail -1 "$OUT/$1.log" 2>/dev/null
}
test_step tests_cuda 120 "not triton and not reference"
test_step tests_triton_reference 150 "triton or reference"
# The Triton and CUDA kernels in one process, for fastmb/auto_order.json's table (before
# torch.compile, whose training-step compile outlasted its step on 2026-12-04).
FASTMB_AUTO_ORDER_OUT="$OUT/auto_order.json" bench_step bench_triton 120 bench/test_ops_gpu.py -k "not compile and not torch.float16"
bench_step bench_compile 120 "${models_and_ops[@]}" -k "(eager_cl or compile) and not torch.float16"
exit $failed
