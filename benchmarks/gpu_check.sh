#!/usr/bin/env bash
# GPU checks and benchmarks for one H200 session (about 6 minutes). Installs nothing from the network.
#
# The device machine has torch, torchvision, numpy, pillow, requests, regex, timm, huggingface-hub, werkzeug,
# jinja2, click and opencv preinstalled (/work/.library/device/KINDS.md) but not open_clip, ftfy, flask or
# gunicorn, and it cannot reach a registry. So, in two steps:
#
#   1. here, once (downloads wheels into .whl/, which git must ignore):
#        echo /.whl/ >> .git/info/exclude
#        bash benchmarks/gpu_check.sh --prepare
#   2. on the device (tool `run`, carry [".whl"], timeout_s 480):
#        bash benchmarks/gpu_check.sh
#
# Step 2 runs: the engine's unit tests (tests/test_engine.py) under the device's torch; the bf16-vs-fp32
# correctness check and the segment-path benchmark (batch 1/16/64, bf16, 21 and 171 labels); the HTTP path
# (/predict through gunicorn, tiny model and ViT-B/16 on CUDA); a student training step. Results go to
# $OUT/BENCHMARKS-gpu.md (append its section to BENCHMARKS.md) and the log to $OUT/gpu_check.log. The brush RLE
# codec runs on the CPU: it is measured by the CPU run, not here.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 flask==3.1.3 blinker==1.9.0 itsdangerous==2.2.0
        gunicorn==27.0.1
        # label-studio-sdk's labeling-config parser (the HTTP path) and what it imports at run time
        label-studio-sdk==2.1.2 appdirs==1.4.4 faker==40.63.0 jsf==0.11.2 jsonschema==4.26.0
        jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 rstr==3.2.2 smart-open==9.0.2
        xmljson==0.2.1 pyjwt==2.13.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5)

# Checked here (2026-11-28): --prepare downloads 23 wheels (9 MB); with them and the packages the device
# lists (numpy, pillow, lxml, requests, attrs, wrapt, werkzeug, jinja2, click), Python 3.12 imports flask,
# gunicorn and label-studio-sdk's LabelInterface. The device part itself has not run yet.
if [[ "${1:-}" == "--prepare" ]]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
  exit $?
fi

OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
exec > >(tee "$LOG") 2>&1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "no wheels under .whl/: run 'bash benchmarks/gpu_check.sh --prepare' here first, carry .whl"; exit 2; }
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=python3
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
$PY -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'cuda', torch.cuda.is_available())"

status=0
step() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  echo; echo "=== $name (limit ${limit} s)"; local t0=$SECONDS
  timeout "$limit" "$@"; local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  [[ $rc -eq 0 ]] || status=1
}

step "engine unit tests" 60 $PY -m pytest -q -x tests/test_engine.py -p no:cacheprovider
step "bf16 check + segment path" 150 $PY benchmarks/run.py --device cuda --only bf16,segment --out "$OUT/BENCHMARKS-gpu.md"
step "HTTP path" 150 $PY benchmarks/run.py --device cuda --only http --out "$OUT/BENCHMARKS-gpu.md"
step "training step" 60 $PY benchmarks/run.py --device cuda --only train --out "$OUT/BENCHMARKS-gpu.md"

echo; echo "=== summary (status $status)"
grep -E '^\|' "$OUT/BENCHMARKS-gpu.md" 2>/dev/null | grep -v -- '---' || echo "no results"
exit $status
