#!/usr/bin/env bash
# The one-command GPU check, for a machine with a GPU and no network, using its own torch:
#   build (--no-build-isolation) → all tests (CUDA included) → compute-sanitizer (memcheck, racecheck,
#   synccheck) on a small case of each CUDA path → benchmark against cuDNN (float32 with TF32 off,
#   and bfloat16) → a report.
# Usage: bash bench/gpu_check.sh [report-folder]   (default: $OUT if set, else bench/out/gpu-check)
# The report folder gets at most 8 files: summary.md, logs.txt, and results .json/.md/.png per dtype.
# Copy it under bench/results/ to commit it.
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:-${OUT:-bench/out/gpu-check}}
mkdir -p "$REPORT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
LOG="$REPORT/logs.txt"
: > "$LOG"
declare -A STATUS
stage() {  # stage NAME COMMAND...: run, log, record pass/fail
  local name=$1; shift
  echo "== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  if "$@" >> "$LOG" 2>&1; then STATUS[$name]="pass"; else STATUS[$name]="FAIL (rc=$?)"; fi
  echo "== $name: ${STATUS[$name]} in $((SECONDS - t0)) s" | tee -a "$LOG"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvcc --version | tail -n 2 || true
  $PY -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} > "$REPORT/env.txt" 2>&1
cat "$REPORT/env.txt" >> "$LOG"

stage build "$PY" -m pip install --no-build-isolation --no-deps -v -e .
stage tests "$PY" -m pytest -q -p no:cacheprovider tests
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
PATHS="persistent per_step per_step_cublas"
STAGES="build tests"
for tool in memcheck racecheck synccheck; do
  for path in $PATHS; do
    STAGES="$STAGES sanitizer-$tool-$path"
    stage "sanitizer-$tool-$path" "$SAN" --tool "$tool" --error-exitcode 3 "$PY" bench/sanitize_case.py --path "$path"
  done
done
TMP=$(mktemp -d)
for dtype in float32 bfloat16; do
  STAGES="$STAGES bench-$dtype"
  stage "bench-$dtype" "$PY" -m bench.run --device cuda --dtype "$dtype" --layers 1 --bidirectional no --out "$TMP/$dtype"
  for f in results.json results.md speedup.png; do
    [ -f "$TMP/$dtype/$f" ] && cp "$TMP/$dtype/$f" "$REPORT/$dtype-$f"
  done
done

{
  echo "# fused_rnn GPU check"
  echo
  echo '```'
  cat "$REPORT/env.txt"
  echo '```'
  echo
  echo "| stage | result |"
  echo "|---|---|"
  for k in $STAGES; do
    echo "| $k | ${STATUS[$k]:-not run} |"
  done
  for dtype in float32 bfloat16; do
    if [ -f "$REPORT/$dtype-results.md" ]; then echo; cat "$REPORT/$dtype-results.md"; fi
  done
} > "$REPORT/summary.md"
rm -f "$REPORT/env.txt"
cat "$REPORT/summary.md"
for k in "${!STATUS[@]}"; do [[ ${STATUS[$k]} == pass ]] || exit 1; done
