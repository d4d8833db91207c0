#!/usr/bin/env bash
# The prepared GPU check for one NVIDIA GPU machine (no network; its own torch and Triton):
# build fastmb in place, run the test suite on CUDA tensors (every available backend), run
# the GPU benchmarks (copy bandwidth, ops, model), print a short table last. Full results go
# to $OUT (default bench/results/latest), with auto_order.json (fastmb/auto_order.json's table).
# Exits non-zero if the build, any test or the memcheck run fails.
# Budget: under 9 minutes on an H200 (each step has its own timeout).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/latest}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

start=$(date +%s)
if ! timeout 300 python setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "gpu_check: build failed"
  exit 2
fi
ln -sfn ../kernels fastmb/kernels  # fastmb.kernels in the in-place tree (installs map it)
echo "gpu_check: build $(( $(date +%s) - start )) s"
python -c "import fastmb; print('backends', fastmb.backends())" | tee "$OUT/backends.txt"

start=$(date +%s)
FASTMB_TEST_DEVICE=cuda timeout 240 python -m pytest tests/ops tests/nn tests/test_compile.py -q -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
tests=$?
echo "gpu_check: tests $(( $(date +%s) - start )) s, exit $tests"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
tail -1 "$OUT/tests.log"

# compute-sanitizer memcheck on one small forward + backward of each CUDA kernel variant.
memcheck=0
sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null)
if [ -n "$sanitizer" ]; then
  timeout 150 "$sanitizer" --tool memcheck --error-exitcode 9 python bench/memcheck_cuda.py > "$OUT/memcheck.log" 2>&1
  memcheck=$?
  echo "gpu_check: memcheck exit $memcheck ($(grep -c '^ok' "$OUT/memcheck.log") cases ok, $(grep -c '^FAIL' "$OUT/memcheck.log") failed)"
  grep -E "^FAIL|ERROR SUMMARY" "$OUT/memcheck.log" | head -5
else
  echo "gpu_check: no compute-sanitizer on this machine; memcheck not run"
fi

start=$(date +%s)
FASTMB_AUTO_ORDER_OUT="$OUT/auto_order.json" timeout 240 python -m pytest bench/test_ops_gpu.py bench/test_models_gpu.py -q \
  -p no:cacheprovider > "$OUT/bench.log" 2>&1
bench=$?
echo "gpu_check: benchmarks $(( $(date +%s) - start )) s, exit $bench"
sed -n '/^speedup over/,$p' "$OUT/bench.log" > "$OUT/speedups.txt"
grep -E "^speedup over|model |geometric|  (dwconv|se) .* over" "$OUT/speedups.txt"
exit $(( tests != 0 || memcheck != 0 ))
