#!/usr/bin/env bash
# The one prepared GPU run: build the CUDA extension, run the GPU tests, run the benchmark suite,
# and write results (device, versions, commit) as JSON + Markdown under bench/results/ (and $OUT).
# Budget: under 8 minutes on one H100/H200; every phase has its own time limit so the results of
# the phases that finished are always written.
#
#   bash bench/gpu_suite.sh            # on a GPU machine
#   DRY_RUN=1 bash bench/gpu_suite.sh  # on a CPU machine: same plumbing, GPU parts skip
#
# Environment: BUILD_S / TESTS_S / KERNELS_S / STEP_S / RECON_S (phase limits in seconds; their
# sum, 480 s, is the budget), BENCH_FILTER (pytest -k expression for the benchmarks), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
RES=bench/results/${DRY_RUN:+dryrun-}run-$STAMP-$COMMIT
mkdir -p "$RES"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
BUILD_S=${BUILD_S:-120}; TESTS_S=${TESTS_S:-100}
KERNELS_S=${KERNELS_S:-70}; STEP_S=${STEP_S:-150}; RECON_S=${RECON_S:-40}
HAS_CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
echo "== dps_fast GPU suite: commit $COMMIT, cuda=$HAS_CUDA, results in $RES"
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0]); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee "$RES/env.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$RES/env.txt" 2>/dev/null || true

status_build=skipped; status_tests=skipped; status_bench=skipped
# 1. Build the extension in place (only for this device's architecture: faster, and the suite
#    measures this device). setup.py itself never probes a GPU; the suite may.
if [ "$HAS_CUDA" = 1 ] && [ -z "${DRY_RUN:-}" ]; then
  ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
  echo "== build (TORCH_CUDA_ARCH_LIST=$ARCH, limit ${BUILD_S}s)"
  if TORCH_CUDA_ARCH_LIST=$ARCH DPS_FAST_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
      timeout "$BUILD_S" $PY setup.py build_ext --inplace > "$RES/build.log" 2>&1; then
    status_build=ok
  else
    status_build="failed (rc $?, see build.log; the CUDA backend falls back)"
  fi
  tail -n 3 "$RES/build.log"
fi

# 2. GPU tests (and the kernel tests compiled for the device), then 3. benchmarks.
if [ "$HAS_CUDA" = 1 ] || [ -n "${DRY_RUN:-}" ]; then
  echo "== GPU tests (limit ${TESTS_S}s)"
  timeout "$TESTS_S" $PY -m pytest -q -x -p no:cacheprovider tests/test_gpu.py tests/cuda/test_cuda_ops.py \
      tests/kernels/test_triton_ops.py tests/test_sampler.py --junitxml="$RES/tests.xml" > "$RES/tests.log" 2>&1
  rc=$?; status_tests=$([ $rc = 0 ] && echo ok || echo "failed (rc $rc, see tests.log)")
  tail -n 3 "$RES/tests.log"
  # One pytest per benchmark file, each with its own limit; every finished case is streamed to
  # bench.jsonl at once (bench/conftest.py), so a phase cut short still reports what it measured.
  export DPS_BENCH_JSONL=$RES/bench.jsonl
  status_bench=ok
  for spec in "test_kernels.py:$KERNELS_S" "test_step.py:$STEP_S" "test_sampler_cpu.py:30" \
              "test_reconstruct_throughput.py:$RECON_S"; do
    file=${spec%%:*}; lim=${spec##*:}
    echo "== bench/$file (limit ${lim}s)"
    timeout "$lim" $PY -m pytest -q -p no:cacheprovider "bench/$file" --benchmark-only \
        --benchmark-max-time=0.5 --benchmark-min-rounds=3 ${BENCH_FILTER:+-k "$BENCH_FILTER"} \
        >> "$RES/bench.log" 2>&1
    rc=$?
    [ $rc = 0 ] || status_bench="partial (bench/$file rc $rc; see bench.log)"
    tail -n 1 "$RES/bench.log"
  done
fi

# 4. Report: JSON + Markdown with device, versions, commit, phase status and every benchmark.
$PY bench/report.py --results "$RES" --status "build=$status_build" "tests=$status_tests" \
    "bench=$status_bench" --commit "$COMMIT"
if [ -n "${OUT:-}" ]; then cp "$RES"/report.md "$RES"/report.json "$RES"/*.log "$OUT"/ 2>/dev/null || true; fi
echo "== summary ($RES/report.md)"
sed -n '1,60p' "$RES/report.md"
