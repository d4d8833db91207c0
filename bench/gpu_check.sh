#!/usr/bin/env bash
# The prepared GPU check for one NVIDIA GPU machine (no network; its own torch and Triton):
# build fastmb in place, run the test suite on CUDA tensors (every available backend),
# compute-sanitizer memcheck over each CUDA kernel variant, the GPU benchmarks (copy bandwidth,
# ops, model), and a short table last. One overall deadline (FASTMB_GPU_CHECK_SECONDS, default
# 480: the whole check, build included, fits the device budget); each step gets what is left of
# it up to its own cap, and writes its results to $OUT (default bench/results/latest) as it
# finishes, so a check cut short still brings back the steps it finished.
# Exits non-zero if the build, any test or the memcheck run fails, or a step ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/latest}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
deadline=$(( $(date +%s) + ${FASTMB_GPU_CHECK_SECONDS:-480} ))
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

if ! step build 300 build.log python setup.py build_ext --inplace; then
  tail -40 "$OUT/build.log"
  exit 2
fi
python -c "import fastmb; print('backends', fastmb.backends())" | tee "$OUT/backends.txt"

step tests 180 tests.log env FASTMB_TEST_DEVICE=cuda python -m pytest tests/ops tests/nn tests/test_compile.py -q \
  -p no:cacheprovider --junitxml="$OUT/tests.xml" || failed=1
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" 2>/dev/null | head -20
tail -1 "$OUT/tests.log" 2>/dev/null

sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null)
if [ -n "$sanitizer" ]; then
  step memcheck 90 memcheck.log "$sanitizer" --tool memcheck --error-exitcode 9 python bench/memcheck_cuda.py || failed=1
  echo "gpu_check: memcheck $(grep -c '^ok' "$OUT/memcheck.log") cases ok, $(grep -c '^FAIL' "$OUT/memcheck.log") failed"
  grep -E "^FAIL|ERROR SUMMARY" "$OUT/memcheck.log" | head -5
else
  echo "gpu_check: no compute-sanitizer on this machine; memcheck not run" | tee -a "$OUT/steps.txt"
fi

step benchmarks 180 bench.log env FASTMB_AUTO_ORDER_OUT="$OUT/auto_order.json" \
  python -m pytest bench/test_ops_gpu.py bench/test_models_gpu.py -q -p no:cacheprovider
sed -n '/^speedup over/,$p' "$OUT/bench.log" > "$OUT/speedups.txt" 2>/dev/null
grep -E "^speedup over|model |geometric|  (dwconv|se) .* over" "$OUT/speedups.txt"
exit $failed
