#!/usr/bin/env bash
# The GPU check, for a machine with a GPU and no network, using its own torch. Stages, in the
# default order (what matters most first: a device lent for minutes may cut the call short):
#   build       pip install --no-build-isolation -e ., CUDA required, for sm_90 only (H100/H200;
#               TORCH_CUDA_ARCH_LIST overrides) to halve the compile; warnings (ptxas spills, local
#               memory) listed in the summary rather than failing the check. Where it fails, the
#               call's other stages are not run.
#   smoke       every CUDA path on a small packed/padded, tanh/relu, 2-layer bidirectional case,
#               forward + backward against float64 nn.RNN (bench/sanitize_case.py): runs, ends, agrees
#   bench-float32  against cuDNN, TF32 off on both sides: B ∈ {1, 8, 64, 256} × H ∈ {256, 512,
#               1024, 2048}, T = 512, one layer (the README's GPU table)
#   tests-cuda  the CUDA tests (pytest -k cuda, less the CPU-only test_cuda_plan/_emulated),
#               test_cuda.py first and the full-grid parity last, 200 s at most
#   sanitizer-memcheck  compute-sanitizer memcheck over the smoke case (all paths; every kernel:
#               cuBLAS's reads of our buffers too), 90 s at most; "not available" where the device
#               refuses the tool (gVisor machines do)
#   bench-bfloat16  as bench-float32, in bfloat16
#   sanitizer-racecheck, sanitizer-synccheck  the same case, our kernels only, 90 s each
#   paths       each CUDA path forced in turn against cuDNN on a B × H grid (bench/paths.py): the
#               numbers that tune the path heuristic, and where its choice is not the fastest
#   tests       the rest of the test suite (CPU tests, under this machine's torch; not the slow ones)
#   cpu-bench   the CPU benchmark, quick grid, on all of this machine's cores (16 on the lent H200
#               machines), 150 s at most: our CPU kernels were tuned and measured on 2 cores only
#               ($GPU_CHECK_CPU_BENCH_ARGS replaces "--grid quick": tests run it on one shape)
# "sanitizer" and "bench" name their three tools and two dtypes.
#
# Usage: bash bench/gpu_check.sh [--stages a,b,...] [--deadline SECONDS] [report-folder]
#   --stages    which stages to run, in the order given (default: all, in the order above)
#   --deadline  stop starting stages, and cut the running one, this many seconds after the start
#               (default 420: a device is lent for 15 minutes in all, its start included, so a first
#               call of 7 leaves time for a second). A stage cut short is reported as such, and the
#               summary is still written.
#   report-folder  default: $OUT if set, else bench/out/gpu-check.
# State (each stage's last result, the logs, the bench reports) is kept in $GPU_CHECK_STATE (default
# bench/out/gpu-check-state) across calls while the machine stays up, so that a second call at once
# (before the machine goes back) can run what the first did not reach, its build quick:
#   GPU_CHECK_COMMIT=<sha> bash bench/gpu_check.sh
#   GPU_CHECK_COMMIT=<sha> bash bench/gpu_check.sh --stages build,<stages not yet run>
# Every call's report folder gets the summary of all stages run so far: summary.md (with the
# tables), logs.txt and results.tar.gz (each dtype's results .json/.md and speedup .png, paths
# .json/.md): three files, for devices that return few. Unpack it under bench/results/ to commit.
# The bench and paths reports are written after every shape, so a stage cut at the deadline keeps
# what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
# The stages, in order; "sanitizer" and "bench" stand for their tools and dtypes.
ROWS="build smoke bench-float32 tests-cuda sanitizer-memcheck bench-bfloat16 sanitizer-racecheck sanitizer-synccheck paths tests cpu-bench"
ALL_STAGES="$ROWS sanitizer bench"
STAGES_ARG=all
DEADLINE=420
REPORT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --stages) STAGES_ARG=${2:?--stages needs a list}; shift 2 ;;
    --deadline) DEADLINE=${2:?--deadline needs seconds}; shift 2 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
    *) REPORT=$1; shift ;;
  esac
done
if [ "$STAGES_ARG" = all ]; then ASKED=$ROWS; else ASKED=${STAGES_ARG//,/ }; fi
RUN_STAGES=""
for s in $ASKED; do
  case $s in
    sanitizer) RUN_STAGES="$RUN_STAGES sanitizer-memcheck sanitizer-racecheck sanitizer-synccheck" ;;
    bench) RUN_STAGES="$RUN_STAGES bench-float32 bench-bfloat16" ;;
    *)
      case " $ROWS " in *" $s "*) RUN_STAGES="$RUN_STAGES $s" ;;
        *) echo "gpu_check: unknown stage '$s' (stages: $ALL_STAGES)" >&2; exit 2 ;; esac ;;
  esac
done
REPORT=${REPORT:-${OUT:-bench/out/gpu-check}}
STATE=${GPU_CHECK_STATE:-bench/out/gpu-check-state}
mkdir -p "$REPORT" "$STATE"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
LOG="$STATE/logs.txt"
STATUS="$STATE/status.tsv"  # stage <tab> result <tab> seconds <tab> date, one line per run
touch "$STATUS"

remaining() { echo $((DEADLINE - SECONDS)); }
BUILD_FAILED=0  # set by a failed build stage: the call's later stages would test nothing of ours

# stage NAME COMMAND...: run under the deadline (and $STAGE_CAP s), log, record the result. Where
# the command fails and its output has a line matching $UNAVAILABLE (a tool the device refuses),
# the result is "not available here", which fails nothing.
stage() {
  local name=$1; shift
  local left; left=$(remaining)
  local capped=""
  if [ -n "${STAGE_CAP:-}" ] && [ "$STAGE_CAP" -lt "$left" ]; then left=$STAGE_CAP; capped=1; fi
  local result t0=$SECONDS mark
  echo "== $name: $*" | tee -a "$LOG"
  mark=$(wc -l < "$LOG")
  if [ "$BUILD_FAILED" = 1 ]; then
    result="not run (build failed)"
  elif [ "$left" -lt 20 ]; then
    result="not run (deadline)"
  else
    timeout --kill-after=10 "$left" "$@" >> "$LOG" 2>&1
    local rc=$? why
    if [ -n "$capped" ]; then why="its cap"; else why="the deadline"; fi
    if [ $rc -eq 0 ]; then result=pass
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then result="FAIL (cut at $why after $((SECONDS - t0)) s)"
    else result="FAIL (rc=$rc)"; fi
    local refusal=""
    if [ $rc -ne 0 ] && [ -n "${UNAVAILABLE:-}" ]; then
      refusal=$(tail -n +"$((mark + 1))" "$LOG" | grep -m 1 -E "$UNAVAILABLE" | tr -d '\r' | cut -c 1-120)
    fi
    if [ -n "$refusal" ]; then result="not available here ($refusal)"; fi
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$result" "$((SECONDS - t0))" "$(date -u +%H:%M:%SZ)" >> "$STATUS"
  echo "== $name: $result in $((SECONDS - t0)) s" | tee -a "$LOG"
  case $result in pass|"not available here"*) return 0 ;; *) return 1 ;; esac
}

# pytest with a per-test limit where pytest-timeout is installed: a hung kernel ends the run with a
# stack dump instead of eating the deadline.
# (pytest loads the plugin itself, as "timeout": naming it again with -p stops pytest at start.)
PYTEST_TIMEOUT=()
if $PY -c "import pytest_timeout" 2>/dev/null; then
  PYTEST_TIMEOUT=(--timeout=120 --timeout-method=thread)
fi
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)

# The test files with CUDA tests, in the order tests-cuda runs them (every tests/test_*.py but the
# CPU-only two, which CI runs): test_cuda.py first, test_ecosystem.py (the cold compile) last.
cuda_test_files() {
  local first=tests/test_cuda.py late="tests/test_parity.py tests/test_ecosystem.py" f
  echo "$first"
  for f in tests/test_*.py; do
    case " $first $late tests/test_cuda_plan.py tests/test_cuda_emulated.py " in
      *" $f "*) ;; *) echo "$f" ;; esac
  done
  echo "$late"
}

{
  echo "== call at $(date -u +%Y-%m-%dT%H:%M:%SZ): stages $RUN_STAGES"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  echo "kernel $(uname -r)"  # 4.4.0: a gVisor sandbox, where compute-sanitizer may be refused
  nvcc --version | tail -n 2 || true
  $PY -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  # A device may get a copy of the working tree without .git: then say GPU_CHECK_COMMIT=<sha>.
  echo "commit $("$PY" -m bench.source)"  # as the benchmark reports name it
} > "$STATE/env.txt" 2>&1
cat "$STATE/env.txt" >> "$LOG"

write_summary() {
  {
    echo "# fused_rnn GPU check"
    echo
    echo '```'
    cat "$STATE/env.txt"
    echo '```'
    echo
    echo "Each stage's latest result on this machine (all calls):"
    echo
    echo "| stage | result | seconds | finished (UTC) |"
    echo "|---|---|---|---|"
    for k in $ROWS; do
      local line; line=$(awk -F'\t' -v k="$k" '$1 == k {l = $0} END {print l}' "$STATUS")
      if [ -n "$line" ]; then
        echo "$line" | awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}'
      else
        echo "| $k | not run | | |"
      fi
    done
    if [ -s "$STATE/build-warnings.txt" ]; then
      echo; echo "ptxas warnings of the latest build (errors in CI):"; echo; echo '```'
      cat "$STATE/build-warnings.txt"; echo '```'
    fi
    for dtype in float32 bfloat16 cpu; do
      if [ -f "$STATE/$dtype-results.md" ]; then echo; cat "$STATE/$dtype-results.md"; fi
    done
    if [ -f "$STATE/paths/paths.md" ]; then echo; cat "$STATE/paths/paths.md"; fi
  } > "$STATE/summary.md"
  local results
  results=$(cd "$STATE" && ls -d ./*-results.* ./*-speedup.png paths/paths.json paths/paths.md \
    2>/dev/null)
  if [ -n "$results" ]; then (cd "$STATE" && tar -czf results.tar.gz $results); fi
  if [ "$(cd "$REPORT" && pwd)" != "$(cd "$STATE" && pwd)" ]; then
    cp "$STATE/summary.md" "$LOG" "$REPORT/"
    if [ -f "$STATE/results.tar.gz" ]; then cp "$STATE/results.tar.gz" "$REPORT/"; fi
  fi
}

# Moves a report folder's files into the state once its stage has run (cut short too: the reports
# are written after every shape), replacing the previous ones: publish FROM PREFIX FILE...
publish() {
  local from=$1 prefix=$2; shift 2
  [ -f "$from/$1" ] || return 0
  for f in "$@"; do rm -f "$STATE/$prefix$f"; [ -f "$from/$f" ] && cp "$from/$f" "$STATE/$prefix$f"; done
  return 0
}

FAILED=0
for s in $RUN_STAGES; do
  case $s in
    build)
      # Warnings do not stop the check: the device's nvcc may allocate registers differently from
      # CI's (where -Werror holds, spills and local memory included). Its ptxas warnings go to the
      # summary instead.
      mark=$(wc -l < "$LOG")
      stage build env FUSED_RNN_WERROR=0 FUSED_RNN_CUDA=1 \
        TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
        "$PY" -m pip install --no-build-isolation --no-deps -v -e .
      rc=$?
      tail -n +"$((mark + 1))" "$LOG" | grep -E "ptxas (warning|error)" > "$STATE/build-warnings.txt"
      [ $rc -eq 0 ] || BUILD_FAILED=1
      [ $rc -eq 0 ] ;;
    # A hang (say, a grid barrier that never opens) must not eat the call: smoke normally takes
    # seconds.
    smoke) STAGE_CAP=150 stage smoke "$PY" bench/sanitize_case.py --path all ;;
    # -v: the log names the test that was running if the stage is cut. The two CPU-only modules
    # named for CUDA (the planner on made-up devices, the kernels on the CPU emulator) run in CI,
    # not on the device's time. Files in the order given: the kernels' own tests first, the
    # full-grid parity (auto path, small shapes) and the cold torch.compile last.
    tests-cuda) STAGE_CAP=200 stage tests-cuda env FUSED_RNN_REQUIRE_CUDA=1 "$PY" -m pytest -v \
      -p no:cacheprovider -rfEs --durations=15 "${PYTEST_TIMEOUT[@]}" -k cuda \
      $(cuda_test_files) ;;
    sanitizer-*)
      # Without torch's caching allocator, so that every tensor is its own allocation and an access
      # past one is not hidden inside a cached segment; no cuDNN beside our kernels (--run-only).
      # memcheck watches every kernel (cuBLAS reading our buffers by our leading dimensions too);
      # racecheck and synccheck only ours, where a hazard would be ours to fix.
      tool=${s#sanitizer-}
      only_ours=()
      if [ "$tool" != memcheck ]; then
        only_ours=(--kernel-name kns=recurrence_kernel --kernel-name kns=step_epilogue_kernel)
      fi
      UNAVAILABLE="Device not supported|is not supported on this|Could not find a supported device" \
      STAGE_CAP=90 stage "$s" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" \
        "${only_ours[@]}" --error-exitcode 3 "$PY" bench/sanitize_case.py --path all --run-only ;;
    cpu-bench)
      rm -rf "$STATE/run-cpu"
      # Unquoted on purpose: the variable holds several arguments.
      STAGE_CAP=150 stage cpu-bench "$PY" -m bench.run --device cpu \
        ${GPU_CHECK_CPU_BENCH_ARGS:---grid quick} --out "$STATE/run-cpu"
      rc=$?
      publish "$STATE/run-cpu" "cpu-" results.json results.md speedup.png
      [ $rc -eq 0 ] ;;
    bench-*)
      dtype=${s#bench-}
      rm -rf "$STATE/run-$dtype"
      stage "$s" "$PY" -m bench.run --device cuda --dtype "$dtype" --layers 1 --bidirectional no \
        --out "$STATE/run-$dtype"
      rc=$?
      publish "$STATE/run-$dtype" "$dtype-" results.json results.md speedup.png
      [ $rc -eq 0 ] ;;
    paths)
      rm -rf "$STATE/run-paths"
      stage paths "$PY" -m bench.paths --out "$STATE/run-paths"
      rc=$?
      mkdir -p "$STATE/paths"
      publish "$STATE/run-paths" "paths/" paths.json paths.md
      [ $rc -eq 0 ] ;;
    tests) stage tests env FUSED_RNN_REQUIRE_CUDA=1 "$PY" -m pytest -q -p no:cacheprovider -rfEs \
      "${PYTEST_TIMEOUT[@]}" -m "not slow" -k "not cuda" tests ;;
  esac
  [ $? -eq 0 ] || FAILED=1
  write_summary
done
write_summary
cat "$STATE/summary.md"
exit $FAILED
