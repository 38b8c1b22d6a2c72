#!/usr/bin/env bash
# Benchmark labelstudio-maskclip on a GPU host, offline (nothing is downloaded: weights are random, which
# does not change the speed; photos are the COCO128 ones under tests/data).
#
# Needs: an NVIDIA GPU with a CUDA build of torch, and this repository installed with its test extra
# (`pip install -e '.[test]'`; on a host without internet, `pip download -d wheels -e '.[test]'` on a connected
# machine of the same platform and Python, then `pip install --no-index --find-links wheels -e '.[test]'`).
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]      # default: ./gpu-benchmark; about 10-15 minutes
#
# It measures, and appends as one section to BENCHMARKS.md (and OUTPUT_DIR/BENCHMARKS-gpu.md):
#   1. bf16 vs fp32 on the same weights (relative error, pixels with the same label);
#   2. the segment path (`MaskCLIP.segment`, ViT-B/16 at short side 448): images/s at batch 1, 16 and 64 with
#      21 and 171 labels, eager and compiled (`torch.compile`, as MASKCLIP_COMPILE=true serves it);
#   3. /predict end to end through gunicorn (ViT-B/16, 4 workers, photos from a loopback file host):
#      single-task p50 and tasks/s with concurrent clients;
#   4. the host side per image per core (model replaced by a stand-in), to see whether the CPUs keep up.
# Targets: segment path >= 1,500 images/s (bf16, batch 64, 21 labels), end to end >= 800 tasks/s,
# single task p50 < 30 ms. The log goes to OUTPUT_DIR/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."

OUTDIR="${1:-gpu-benchmark}"
mkdir -p "$OUTDIR"
REPORT="$OUTDIR/BENCHMARKS-gpu.md"
: > "$REPORT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUTDIR/gpu_check.log") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || { echo "no NVIDIA GPU found"; exit 2; }
$PY -c "import torch, open_clip; assert torch.cuda.is_available(), 'torch has no CUDA here'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'open_clip', open_clip.__version__)" || exit 2

status=0
step() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  echo; echo "=== $name (limit ${limit} s)"; local t0=$SECONDS
  timeout "$limit" "$@"; local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  [[ $rc -eq 0 ]] || status=1
}

step "bf16 check + segment path, eager and compiled" 900 \
  $PY benchmarks/run.py --only bf16,segment --compile --out "$REPORT"
step "/predict through gunicorn" 900 $PY benchmarks/run.py --only http --workers 4 --out "$REPORT"
{ echo; echo "## $(date -u '+%Y-%m-%d %H:%M') UTC: host side on the GPU host"; } >> "$REPORT"
step "host side per image per core" 300 $PY benchmarks/bench_host.py --images 40 --repeats 3 \
  --note "GPU host; other load: $(cut -d' ' -f1-3 /proc/loadavg) (load average)" --out "$REPORT"

cat "$REPORT" >> BENCHMARKS.md
echo; echo "=== summary (status $status); appended to BENCHMARKS.md:"
grep -E '^\|' "$REPORT" | grep -v -- '---' || echo "no results"
exit $status
