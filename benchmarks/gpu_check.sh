#!/usr/bin/env bash
# Check and benchmark labelstudio-maskclip on a GPU host, offline (nothing is downloaded: weights are random,
# which does not change the speed; photos are the COCO128 / VOC ones under tests/data).
#
# Needs: an NVIDIA GPU with a CUDA build of torch, and this repository installed with its test extra
# (`pip install -e '.[test]'`; on a host without internet, `pip download -d wheels -e '.[test]'` on a connected
# machine of the same platform and Python, then `pip install --no-index --find-links wheels -e '.[test]'`).
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR] [BUDGET_S]   # default ./gpu-benchmark, 480 s; about 6-8 minutes
#
# Steps, most useful first; a step is skipped once the budget is spent, and each has its own time limit:
#   1. each preset on the GPU (bf16): ms per image, and the pixels labelled as fp32 on the CPU labels them;
#   2. bf16 vs fp32 on the same weights (relative error, pixels with the same label);
#   3. the segment path (`MaskCLIP.segment`, ViT-B/16 at short side 448), eager: images/s at batch 1, 16, 64,
#      21 and 171 labels, bf16 and fp32; and where a batch of 64 goes (preprocess, model, finalize);
#   4. /predict end to end through gunicorn (4 workers, photos from a loopback file host): single-task p50 and
#      tasks/s with concurrent clients, tiny model (the host's floor) and ViT-B/16;
#   5. a whole MaskCLIP+ training run (ViT-B/16 teacher, deeplabv3_resnet50 student, crop 512, batch 8) and the
#      promoted student's serving speed;
#   6. interactive prompts in process (first click, repeated click, box, new phrase);
#   7. the segment path with `torch.compile` (MASKCLIP_COMPILE=true) at batch 64;
#   8. each preset in fp32 on the GPU.
# Tables go to OUTPUT_DIR/BENCHMARKS-gpu.md (append it to BENCHMARKS.md by hand), the log to gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."

OUTDIR="${1:-gpu-benchmark}"
BUDGET="${2:-480}"
mkdir -p "$OUTDIR"
REPORT="$OUTDIR/BENCHMARKS-gpu.md"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee "$OUTDIR/gpu_check.log") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv || {
  echo "no NVIDIA GPU found"; exit 2; }
$PY -c "import torch, open_clip; assert torch.cuda.is_available(), 'torch has no CUDA here'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'open_clip', open_clip.__version__)" || exit 2
{ echo "## $(date -u '+%Y-%m-%d %H:%M') UTC: GPU check (\`bash benchmarks/gpu_check.sh\`)"; echo
  echo "- machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader), $(nproc) CPU cores, \
$($PY -c 'import platform, torch; print("Python", platform.python_version(), "torch", torch.__version__)')"; echo; } > "$REPORT"

status=0
step() {  # title, time limit (s), command...: its table rows (lines starting with '|') go to the report
  local title=$1 limit=$2; shift 2
  if (( SECONDS + 20 > BUDGET )); then echo "=== skipped (budget spent): $title"; \
    printf '### %s\n\nskipped: the budget (%s s) was spent\n\n' "$title" "$BUDGET" >> "$REPORT"; return; fi
  (( limit > BUDGET - SECONDS )) && limit=$((BUDGET - SECONDS))
  echo; echo "=== $title (limit ${limit} s)"; local t0=$SECONDS log; log=$(mktemp)
  timeout "$limit" "$@" 2>&1 | tee "$log"; local rc=${PIPESTATUS[0]}
  echo "=== $title: rc=$rc in $((SECONDS - t0)) s"
  { printf '### %s\n\n`%s` (%s s, exit %s)\n\n' "$title" "$*" "$((SECONDS - t0))" "$rc"; grep -E '^\|' "$log"; echo; } >> "$REPORT"
  [[ $rc -eq 0 ]] || status=1
}

step "Presets on the GPU, bf16 (ms per image; pixels as fp32 on the CPU)" 120 \
  $PY benchmarks/bench_presets.py --device cuda --precision bf16 --repeats 20 --agree
step "Engine bf16 vs fp32 (same weights, 8 photos at 448x448, TF32 off)" 90 \
  $PY benchmarks/run.py --only bf16
step "Segment path, eager" 150 $PY benchmarks/run.py --only segment,stages
step "Finalize: image by image or the batch at once" 60 $PY benchmarks/bench_finalize.py --device cuda
step "/predict through gunicorn" 200 $PY benchmarks/run.py --only http --workers 4
step "A whole training run and the student's serving" 180 \
  $PY benchmarks/bench_train_run.py --device cuda --steps 5 25 --batch 8 --crop 512
step "Interactive prompts in process" 90 $PY benchmarks/bench_interactive.py --device cuda --repeats 10
step "Segment path, torch.compile, batch 64" 200 \
  $PY benchmarks/run.py --only segment --no-eager --compile --compile-batches 64
step "Presets on the GPU, fp32" 60 $PY benchmarks/bench_presets.py --device cuda --precision fp32 --repeats 20

echo; echo "=== summary (status $status, ${SECONDS} s):"; cat "$REPORT"
exit $status
