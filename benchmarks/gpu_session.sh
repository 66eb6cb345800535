#!/usr/bin/env bash
# Every GPU figure issue 13 still needs, in one run of under ~8 minutes on one H100/H200, written to $OUT.
#
#   PYTHONPATH=src OUT=/tmp/gpu-results bash benchmarks/gpu_session.sh            # on the GPU machine
#   bash benchmarks/gpu_session.sh --dry-run                                     # print the commands only
#   bash benchmarks/gpu_session.sh --cpu-smoke                                   # tiny CPU run of every step
#
# Each step under its own time limit and all under one overall deadline (BUDGET_S, default 470 s), so a slow
# step leaves the others their figures; ONLY=name,name runs a subset (e.g. ONLY=scratch_gpu_recipe in a second run):
#   1. optimizer_step.py --device cuda: Ranger foreach / per tensor / compiled vs RAdam foreach (and fused);
#   2. train_throughput.py on the real slices: (a) reference loop, (b) `braintumor train` with its first-epoch
#      time, (c) ceiling, (d) every step variant with its compile/warm-up time and the break-even steps
#      that set train_step.AUTO_COMPILE_MIN_STEPS;
#   3. issue 9's scratch-gpu recipe (time_to_accuracy.py, one seed, ~5 min), when the recipe exists and at least
#      300 s of the budget are left; otherwise the summary names the command for a second run.
# DATA defaults to the shared Brain Tumor MRI Training folder where there is one, else generated phantoms.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --cpu-smoke) MODE=smoke ;;
  "") ;;
  *) echo "usage: $0 [--dry-run|--cpu-smoke]" >&2; exit 2 ;;
esac
OUT=${OUT:-$(mktemp -d)}
BUDGET_S=${BUDGET_S:-470}
ONLY=${ONLY:-}
PYTHON=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-src}
mkdir -p "$OUT"
if [ -z "${DATA:-}" ]; then
  for candidate in shared/data/brain-tumor-mri/Training /work/shared/data/brain-tumor-mri/Training; do
    if [ -d "$candidate" ]; then DATA=$candidate; break; fi
  done
fi
DATA_FLAG=()
[ -n "${DATA:-}" ] && [ "$MODE" != smoke ] && DATA_FLAG=(--data "$DATA")

if [ "$MODE" = smoke ]; then
  THROUGHPUT=(--device cpu --image-size 32 --batch-size 8 --epochs 1 --ref-steps 2 --ceiling-steps 2 --workers 0
              --variants eager,eager-2x-batch)
  OPTIMIZER=(--device cpu --arch resnet18 --repeats 1)
else
  THROUGHPUT=(--epochs 3 --ref-steps 40 --ceiling-steps 20 --variant-steps 20)
  OPTIMIZER=(--device cuda --arch resnet152 --repeats 5)
fi

# step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, what is left of the budget), output to $OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    return 0
  fi
  local left=$((BUDGET_S - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$MODE" = dry ]; then
    echo "[$name, <= ${limit} s] $*"
    return 0
  fi
  if [ "$limit" -le 10 ]; then
    echo "$name: skipped (no time left)" | tee -a "$OUT/summary.txt"
    return 0
  fi
  echo "== $name (limit ${limit} s)" >&2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  tail -n 40 "$OUT/$name.log" >&2
}

if [ "$MODE" != dry ]; then
  { date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU";
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)";
    git rev-parse --short HEAD 2>/dev/null; echo "data: ${DATA:-generated phantoms}"; } >"$OUT/env.txt" 2>&1
fi

step optimizer_step 90 "$PYTHON" benchmarks/optimizer_step.py "${OPTIMIZER[@]}"
step train_throughput 330 "$PYTHON" benchmarks/train_throughput.py "${DATA_FLAG[@]}" "${THROUGHPUT[@]}" \
  --json "$OUT/train_throughput.json"
RECIPE=(benchmarks/time_to_accuracy.py "${DATA_FLAG[@]}" --recipe scratch-gpu --seeds 0 --out "$OUT/scratch-gpu"
        --json "$OUT/scratch_gpu.json")
if [ ! -f src/braintumor/recipes/scratch-gpu.yaml ]; then
  echo "scratch_gpu_recipe: skipped (this checkout has no scratch-gpu recipe)" | tee -a "$OUT/summary.txt"
elif [ "$MODE" = smoke ]; then
  echo "scratch_gpu_recipe: not run in the CPU smoke mode" | tee -a "$OUT/summary.txt"
elif [ "$MODE" != dry ] && [ -z "$ONLY" ] && [ $((BUDGET_S - SECONDS)) -lt 300 ]; then
  echo "scratch_gpu_recipe: skipped (under 300 s left); run it alone: ONLY=scratch_gpu_recipe BUDGET_S=400" \
       "bash $0" | tee -a "$OUT/summary.txt"
else
  step scratch_gpu_recipe 390 "$PYTHON" "${RECIPE[@]}"
fi
[ "$MODE" = dry ] || echo "results in $OUT (summary.txt, *.log, train_throughput.json); ${SECONDS} s in all"
