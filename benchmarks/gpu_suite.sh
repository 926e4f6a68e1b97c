#!/usr/bin/env bash
# The GPU suite, in one call on the lent GPU machine (see ../shared/GPU-RUNBOOK.md):
#   bash benchmarks/gpu_suite.sh OUTDIR [--quick] [--tests-only] [--sanitize] [--ops a,b]
#   bash benchmarks/gpu_suite.sh OUTDIR --e2e     (second call: end-to-end training only)
# builds the extension for the GPU (incremental on a warm machine), runs the
# whole test suite on CUDA, runs the op benchmarks, and writes into OUTDIR (at
# most 8 files, as the device tool returns): env.txt build.log tests.log
# [sanitizer.log] bench-*.{csv,json,md}. The last thing printed is the summary
# table. The end-to-end benchmark compiles whole models and needs most of a
# 10-minute call by itself, hence its own mode.
set -uo pipefail
OUT=${1:?usage: gpu_suite.sh OUTDIR [--quick] [--tests-only] [--sanitize]}
shift
QUICK=""; TESTS_ONLY=0; SANITIZE=0; E2E=0; OPS=""
while [ $# -gt 0 ]; do
  a=$1; shift
  case $a in
    --ops) OPS=$1; shift ;;
    --quick) QUICK="--quick" ;;
    --tests-only) TESTS_ONLY=1 ;;
    --sanitize) SANITIZE=1 ;;
    --e2e) E2E=1 ;;
    *) echo "unknown option $a"; exit 2 ;;
  esac
done
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

{ nvidia-smi; python -V; nvcc --version | tail -1
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20; } > "$OUT/env.txt" 2>&1
stamp "env written"

# sm_90a for the H100/H200 (wgmma); sm_80 keeps the build honest for A100.
export MAX_JOBS=${MAX_JOBS:-16} FASTDL_CUDA_ARCHS=${FASTDL_CUDA_ARCHS:-"8.0;9.0a"}
if ! pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; stamp "BUILD FAILED"; exit 1
fi
stamp "built"
python -m fastdl.info >> "$OUT/env.txt" 2>&1

if [ "$E2E" = 1 ]; then
  python -m benchmarks.bench_e2e --quick --out "$OUT" 2>&1 | tail -60
  exit "${PIPESTATUS[0]}"
fi

python -m pytest -q -ra tests > "$OUT/tests.log" 2>&1
test_rc=$?
test_summary=$(tail -1 "$OUT/tests.log")
stamp "tests rc=$test_rc: $test_summary"

if [ "$SANITIZE" = 1 ]; then
  # memcheck on the CUDA cases of every op (slow: one small case per test).
  compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q -x -k "cuda-cuda" tests \
    > "$OUT/sanitizer.log" 2>&1
  stamp "memcheck rc=$?"
fi

if [ "$TESTS_ONLY" = 0 ]; then
  ops=${OPS:-$(ls benchmarks/bench_*.py | sed 's#benchmarks/bench_##; s#\.py##' | grep -v '^e2e$' | paste -sd, -)}
  # Stop short of the device tool's 10-minute limit so the summary still prints;
  # results are written after every op, so a cut-off run keeps what it measured.
  left=$(( ${SUITE_BUDGET_S:-560} - ($(date +%s) - t0) ))
  timeout "$left" python -m benchmarks $QUICK --ops "$ops" --out "$OUT" > "$OUT/bench-stdout.txt" 2>&1
  bench_rc=$?
  stamp "benchmarks rc=$bench_rc"
  # keep the file count within what comes back: fold stdout into tests.log
  { echo; echo "==== python -m benchmarks stdout ===="; cat "$OUT/bench-stdout.txt"; } >> "$OUT/tests.log"
  rm -f "$OUT/bench-stdout.txt"
fi

echo "==== failures ===="
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
echo "==== summary ===="
echo "tests: $test_summary"
md=$(ls "$OUT"/bench-*.md 2>/dev/null | tail -1)
[ -n "$md" ] && sed -n '/```/,/```/p' "$md" | head -150
exit $test_rc
