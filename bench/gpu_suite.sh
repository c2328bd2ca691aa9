#!/usr/bin/env bash
# The one prepared GPU run of dps_fast: what a short GPU window must bring back, most important
# first, every result written to bench/results/<run>/ AND to $OUT (when set) after EVERY phase.
#
#   bash bench/gpu_suite.sh              # on a GPU machine; dps_fast need not be installed
#   DRY_RUN=1 bash bench/gpu_suite.sh    # on a CPU: the same plumbing, GPU parts skip (tested in CI
#                                        # by tests/test_gpu_suite.py)
#
# Phases, their limits (s) and the seconds expected on one H100/H200. The expectations are
# ESTIMATES from operation counts and usual compile times, not measurements: no GPU has run this
# suite yet. SUITE_S (default 420 = 7 min) caps the whole run: a phase gets at most what is left.
#
#   phase             limit  expected  how it was estimated
#   env                  -      5      python + torch import, CUDA context
#   build (background) 150    60-90    3 translation units for one arch, compiled in parallel
#                                      (binding.cpp with torch headers ~40 s, each .cu ~30-60 s);
#                                      runs while phases a and b use the GPU; nothing waits on it
#                                      before phase a'
#   a  smoke            60    25-40    ~34 Triton specializations (2 shapes x float32/bfloat16 x 7-8
#                                      kernels, + the tiny32 step's) at ~0.5-1 s each (compile + launcher),
#                                      CUDA init ~5 s, the step < 1 s
#   b  headline        210   140-200   ffhq256 init ~5 s; 8 eager / CUDA-graph cases x ~6 s (2 warm-ups
#                                      + 12 paired step/floor repetitions of 30-300 ms, memory probes,
#                                      capture); the original at batch 1 + its max-batch search (~10
#                                      float32 steps <= 1 s) ~20 s; compile+bf16+cl: one inductor
#                                      compile of forward + backward (dynamic batch, so one for batch 8
#                                      and 32), 60-120 s, the usual cold compile of a ~100M-parameter UNet
#   a' smoke (CUDA ext)  30     5-10    waits for the build (normally finished), 13 op checks
#   c  kernels          90    55-85    bench/test_kernels.py: ~45 cases x (pytest-benchmark <= 0.5 s +
#                                      CUDA-event timings) on 96 MiB states; ~12 new Triton specializations
#                                      (192 blocks per sample instead of the smoke's 1 and 7); then
#                                      bench/test_operators_cpu.py (same cases on the GPU): the four blur
#                                      boundaries' normal residual at [32, 3, 256, 256] (4 FFTs of 320^2
#                                      each, ~ms) and a user-operator step at [8, 3, 64, 64]: ~10-15 s
#   d  max batch        60    20-40    ours: doubling 8 .. ~1024 + 4 bisections, each one bf16 step of
#                                      <= 2 s; the original's maximum comes from phase b
#   e  reconstruct      60    30-45    warm-up + batches 32, 16, 8 x 2 runs (32 images x 8 bf16 steps,
#                                      128 PNGs) + auto (probe ~5 s)
#   f  GPU tests        70    40-60    pytest -m gpu tests: <= 40 Triton specializations (counted on the
#                                      CPU by tests/test_gpu_suite.py) + one inductor compile of a
#                                      two-layer net (~15-25 s)
#   total              420   320-485: SUITE_S caps it, so if the estimates run high the last phase
#                                      (f, the tests) is the one cut; every earlier result is kept
#
# Environment: SUITE_S, BUILD_S, SMOKE_S, HEADLINE_S, SMOKE_CUDA_S, KERNELS_S, MAXBATCH_S, RECON_S,
# TESTS_S (limits), BENCH_FILTER (pytest -k for the benchmark phases), PYTHON, MAX_JOBS (build jobs,
# default 3), RESULTS_DIR (default bench/results/run-<time>-<commit>), OUT (a copy of the results).
# Every `timeout` sends SIGINT first (pytest then stops, reports and writes its junit file) and
# SIGKILL 10 s later (-k). The extension build's outcome is final: later phases run with
# DPS_FAST_BUILD_CUDA=0, so a failed or missing build never turns into a JIT build inside a
# phase's limit.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
RES=${RESULTS_DIR:-bench/results/${DRY_RUN:+dryrun-}run-$STAMP-$COMMIT}
mkdir -p "$RES"
LOG=$RES/suite.log
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export DPS_BENCH_JSONL=$RES/bench.jsonl
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
if [ -n "${DRY_RUN:-}" ]; then
  # the plumbing, not the numbers: small cases, one thread (OpenMP threads spinning on a shared
  # 2-core machine made the CPU smoke step 15x slower)
  export DPS_BENCH_QUICK=1 DPS_SMOKE_QUICK=1 OMP_NUM_THREADS=1 DPS_BENCH_BLUR_BATCH=2
fi
SUITE_S=${SUITE_S:-420}
BUILD_S=${BUILD_S:-150}; SMOKE_S=${SMOKE_S:-60}; HEADLINE_S=${HEADLINE_S:-210}; SMOKE_CUDA_S=${SMOKE_CUDA_S:-30}
KERNELS_S=${KERNELS_S:-90}; MAXBATCH_S=${MAXBATCH_S:-60}; RECON_S=${RECON_S:-60}; TESTS_S=${TESTS_S:-70}
RESERVE_S=10  # kept back at every phase for the final report
OUT_FILES="report.md report.json bench.jsonl smoke.txt suite.log build.log tests.xml"  # $OUT takes 8 at most

note() { echo "$*" | tee -a "$LOG"; }
status() { echo "$1=$2" >> "$RES/status.txt"; note "== $1: $2"; }
sync_out() {  # rewrite the report from what exists now, and copy it all to $OUT
  "$PY" bench/report.py --results "$RES" --commit "$COMMIT" >> "$LOG" 2>&1 || note "report.py failed (see suite.log)"
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    for f in $OUT_FILES; do [ -f "$RES/$f" ] && cp -f "$RES/$f" "$OUT/"; done
  fi
  return 0
}
budget() {  # the limit a phase gets: its own, or what is left of SUITE_S
  local left=$((SUITE_S - SECONDS - RESERVE_S))
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
describe() {  # a phase's exit code in words
  case $1 in
    0) echo ok ;;
    124) echo "cut at its time limit (SIGINT; finished results kept)" ;;
    137) echo "killed 10 s after its time limit (finished results kept)" ;;
    5) echo "no test collected" ;;
    *) echo "failed (rc $1, see suite.log)" ;;
  esac
}
run_phase() {  # run_phase NAME LIMIT TEE(0|1) CMD...: time-limited, logged, status + report + $OUT after it
  local name=$1 lim t0 rc
  lim=$(budget "$2"); local show=$3; shift 3
  if [ "$lim" -lt 5 ]; then status "$name" "skipped: suite budget of ${SUITE_S}s spent"; sync_out; return 0; fi
  note "== $name (limit ${lim}s, DPS_FAST_BUILD_CUDA=${DPS_FAST_BUILD_CUDA:-unset})"
  t0=$SECONDS
  if [ "$show" = 1 ]; then
    timeout -s INT -k 10 "$lim" "$@" 2>&1 | tee -a "$LOG"; rc=${PIPESTATUS[0]}
  else
    timeout -s INT -k 10 "$lim" "$@" >> "$LOG" 2>&1; rc=$?
  fi
  status "$name" "$(describe "$rc") in $((SECONDS - t0)) s"
  sync_out
}
# pytest plugins nothing here uses: hypothesis' alone costs ~1.3 s of CPU at every pytest start
NOPLUGINS=(-p no:cacheprovider -p no:hypothesispytest -p no:anyio)
# one benchmark file per phase; its rows are streamed to bench.jsonl as they finish (bench/conftest.py)
BENCH=("$PY" -m pytest -q "${NOPLUGINS[@]}" --benchmark-only --benchmark-max-time=0.5 --benchmark-min-rounds=3)
if [ -n "${BENCH_FILTER:-}" ]; then BENCH+=(-k "$BENCH_FILTER"); fi

# ---- env ---------------------------------------------------------------------------------------
# one python start: writes env.json (bench/_util.py's gpu_info() plus what only the suite
# records) and prints 1 when CUDA is available
HAS_CUDA=$("$PY" - "$RES/env.json" 2>> "$LOG" <<'EOF'
import json, os, platform, subprocess, sys
env = {"python": platform.python_version(), "dry_run": bool(os.environ.get("DRY_RUN"))}
try:
    import torch
    env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
except Exception as exc:
    env["torch"] = f"unavailable: {exc}"
try:  # the device and versions as every benchmark row records them; a failure here costs no phase
    sys.path.insert(0, "bench")
    from _util import gpu_info
    env.update(gpu_info())
    if env.get("cuda_available"):
        env["cudnn"] = torch.backends.cudnn.version()
except Exception as exc:
    env["gpu_info_error"] = repr(exc)
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                        "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception:
    pass
with open(sys.argv[1], "w") as f:
    f.write(json.dumps(env) + "\n")
print(int(bool(env.get("cuda_available"))))
EOF
) || HAS_CUDA=0
HAS_CUDA=${HAS_CUDA##*$'\n'}  # its last line: anything an import printed before it is not the flag
note "== dps_fast GPU suite: commit $COMMIT, cuda=$HAS_CUDA, ${DRY_RUN:+DRY RUN, }results in $RES, budget ${SUITE_S}s"
note "$(cat "$RES/env.json")"
if [ "$HAS_CUDA" != 1 ] && [ -z "${DRY_RUN:-}" ]; then
  note "no CUDA device: nothing to measure (DRY_RUN=1 runs the plumbing on the CPU)"
  status env "no CUDA device"; sync_out; exit 1
fi
status env "ok"
sync_out

# ---- build (background) --------------------------------------------------------------------
# Only for this device's architecture (faster; the suite measures this device). setup.py never
# probes a GPU; the suite may. Phases a and b need no extension and forbid a JIT build meanwhile.
BUILD_PID=""
BUILD_T0=$SECONDS
if [ "$HAS_CUDA" = 1 ] && [ -z "${DRY_RUN:-}" ]; then
  ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
  note "== build (background, TORCH_CUDA_ARCH_LIST=$ARCH, limit ${BUILD_S}s)"
  ( TORCH_CUDA_ARCH_LIST=$ARCH DPS_FAST_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-3} \
      timeout -k 10 "$BUILD_S" "$PY" setup.py build_ext --inplace > "$RES/build.log" 2>&1 ) &
  BUILD_PID=$!
else
  echo "dry run: no CUDA build (treated as a failed build, to exercise that path)" > "$RES/build.log"
fi
export DPS_FAST_BUILD_CUDA=0

# ---- a. smoke: Triton kernels and one DPS step -------------------------------------------------
run_phase smoke "$SMOKE_S" 1 "$PY" bench/gpu_smoke.py --part triton,step --results "$RES"

# ---- b. headline ------------------------------------------------------------------------------
run_phase headline "$HEADLINE_S" 0 "${BENCH[@]}" bench/test_step.py

# ---- build result, a'. smoke of the CUDA extension ---------------------------------------------
if [ -n "$BUILD_PID" ]; then
  wait "$BUILD_PID"; brc=$?
  [ $brc = 0 ] && export DPS_SMOKE_EXPECT_EXTENSION=1
  status build "$([ $brc = 0 ] && echo ok || describe $brc) ($((SECONDS - BUILD_T0)) s incl. waiting; later phases: DPS_FAST_BUILD_CUDA=0)"
else
  status build "not built ($([ -n "${DRY_RUN:-}" ] && echo 'dry run' || echo 'no CUDA')); later phases: DPS_FAST_BUILD_CUDA=0"
fi
tail -n 3 "$RES/build.log" >> "$LOG"
sync_out
run_phase smoke_cuda "$SMOKE_CUDA_S" 1 "$PY" bench/gpu_smoke.py --part cuda --results "$RES"

# ---- c. kernel bandwidth, d. max batch, e. reconstruct -----------------------------------------
run_phase kernels "$KERNELS_S" 0 "${BENCH[@]}" bench/test_kernels.py bench/test_operators_cpu.py
run_phase max_batch "$MAXBATCH_S" 0 "${BENCH[@]}" bench/test_max_batch.py
run_phase reconstruct "$RECON_S" 0 "${BENCH[@]}" bench/test_reconstruct_throughput.py

# ---- f. the marked GPU tests (no -x: every failure is reported; junit always written) -----------
# The dry run runs the same subset on the CPU (Triton's interpreter) and counts the kernel
# specializations it would compile on a GPU (tests/_triton_count.py; capped by tests/test_gpu_suite.py).
COUNT=()
if [ -n "${DRY_RUN:-}" ]; then
  export DPS_GPU_SUBSET_ON_CPU=1 DPS_TRITON_COUNT_OUT=$RES/triton_specializations.json
  COUNT=(-p tests._triton_count)
fi
run_phase gpu_tests "$TESTS_S" 0 "$PY" -m pytest -q "${NOPLUGINS[@]}" "${COUNT[@]}" -m gpu tests -rfEs \
    --junitxml="$RES/tests.xml"
if [ ! -s "$RES/tests.xml" ]; then  # killed before pytest could write it: say so in junit form
  printf '%s\n' '<?xml version="1.0" encoding="utf-8"?>' \
    '<testsuites><testsuite name="gpu_tests" tests="1" errors="1" failures="0" skipped="0">' \
    '<testcase classname="bench.gpu_suite" name="gpu_tests"><error message="the GPU test phase ended before pytest wrote its junit file; see suite.log"/></testcase>' \
    '</testsuite></testsuites>' > "$RES/tests.xml"
fi

# ---- report -----------------------------------------------------------------------------------
status total "$SECONDS s of ${SUITE_S}s"
sync_out
note "== summary ($RES/report.md)"
sed -n '1,30p' "$RES/report.md"
if grep -q '^FAIL' "$RES/smoke.txt" 2>/dev/null; then
  grep '^FAIL' "$RES/smoke.txt"
  exit 1  # a kernel or the step computed the wrong thing: the numbers above are not to be trusted
fi
exit 0
