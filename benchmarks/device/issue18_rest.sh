#!/usr/bin/env bash
# Issue #18's second half in one device call (docs/benchmarks.md, "Rest of #18: one call"):
#   1. pytest -m gpu tests/integration/test_cuda_paths.py: compiled pretraining (learns,
#      checkpoints, resumes), compiled SFT and LoRA, compiled KV-cache generation vs eager, the
#      serve engine's continuous batching vs generate, bf16 autocast vs fp32, all on CUDA;
#   2. the quickstart recipe with train.device=auto, eager (the default);
#   3. the same with train.compile=true in the same run directory (tasks, data, tokenizer and
#      tokens are cached; every training stage and the evals rerun), for time and quality side
#      by side.
# Each step has its own time limit (240 + 120 + 180 s), so the call ends inside ~9 minutes and a
# step that runs over still leaves the others' results. Into $OUT (at most 8 files come back):
#   pytest_gpu.log, quickstart.log, quickstart_compile.log, summary.json (per run: each stage's
#   seconds and manifest metrics; step exit codes and seconds), eval.json and
#   eval_compile.json, report.md (of the eager run).
#
# Device: carry [".whl"] staged by `benchmarks/device/fetch_wheels.sh --quickstart`; the wheels
# are installed into /tmp/site here. LMFORGE_DEVICE_DRY=1 proves the plumbing on a CPU: the
# tests' cpu variants (-m "not gpu", slow ones included), a quickstart cut to a few steps, no
# wheels, 4x the time limits, OUT defaulting to /tmp/issue18_dry.
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY="${LMFORGE_DEVICE_DRY:-0}"
PY="${PYTHON:-python3}"
if [ "$DRY" = 1 ]; then
  OUT="${OUT:-/tmp/issue18_dry}"
  MARK="not gpu"
  SLOWER=4  # the cpu variants compile on a CPU: minutes, not seconds
  SHORT=(--set train.max_steps=4 --set train.warmup_steps=1 --set train.eval_every=2
    --set train.eval_steps=1 --set pretrain.train.ckpt_every=2
    --set eval.generation.max_new_tokens=4)
else
  : "${OUT:?set OUT to the output folder}"
  MARK="gpu"
  SLOWER=1
  SHORT=()
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RUNS="$(mktemp -d "${TMPDIR:-/tmp}/issue18.XXXXXX")"
mkdir -p "$OUT"
: >"$RUNS/steps.tsv"

step() {  # step NAME LIMIT_S LOG CMD...: runs CMD under LIMIT_S, logs to LOG, records rc and s
  local name=$1 limit=$((${2} * SLOWER)) log=$3 start end rc
  shift 3
  start=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  end=$(date +%s%N)
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(((end - start) / 1000000))" >>"$RUNS/steps.tsv"
  echo "$name: rc=$rc"
}

nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
step pytest 240 "$OUT/pytest_gpu.log" "$PY" -m pytest -q -rs -p no:cacheprovider -m "$MARK" \
  tests/integration/test_cuda_paths.py
step quickstart 120 "$OUT/quickstart.log" "$PY" -m lmforge.cli quickstart --out "$RUNS/qs" \
  --set train.device=auto "${SHORT[@]}"
"$PY" benchmarks/device/summarize_runs.py run "$RUNS/qs" >"$RUNS/eager.json"
[ -f "$RUNS/qs/eval/eval.json" ] && cp "$RUNS/qs/eval/eval.json" "$OUT/eval.json"
[ -f "$RUNS/qs/report.md" ] && cp "$RUNS/qs/report.md" "$OUT/report.md"
# the same directory: tasks, data, tokenizer and tokens are cached; training and evals rerun
step quickstart_compile 180 "$OUT/quickstart_compile.log" "$PY" -m lmforge.cli quickstart \
  --out "$RUNS/qs" --set train.device=auto --set train.compile=true "${SHORT[@]}"
"$PY" benchmarks/device/summarize_runs.py run "$RUNS/qs" >"$RUNS/compile.json"
[ -f "$RUNS/qs/eval/eval.json" ] && cp "$RUNS/qs/eval/eval.json" "$OUT/eval_compile.json"

"$PY" benchmarks/device/summarize_runs.py merge "$RUNS/steps.tsv" eager="$RUNS/eager.json" \
  compile="$RUNS/compile.json" >"$OUT/summary.json"
cat "$OUT/summary.json"
rm -rf "$RUNS"
