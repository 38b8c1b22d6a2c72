#!/usr/bin/env bash
# Start Label Studio for a backend on the same machine: http://127.0.0.1:$LABEL_STUDIO_PORT (default 8080),
# its address checks on, its built-in list of blocked ranges less loopback (so Connect Model accepts
# http://127.0.0.1:9090 and the backend's webhook is created). Usage: make label-studio
# (LABEL_STUDIO_VENV: where Label Studio is installed, default .ls-venv; VENV: this package's, default .venv).
# --print-env prints the settings instead of starting Label Studio.
set -euo pipefail
cd "$(dirname "$0")/.."
LS_VENV="${LABEL_STUDIO_VENV:-.ls-venv}"
PKG_VENV="${VENV:-.venv}"
PORT="${LABEL_STUDIO_PORT:-8080}"

settings="$("$PKG_VENV/bin/python" -c '
import shlex
from labelstudio_maskclip.commands.network import LABEL_STUDIO_SETTINGS
for key, value in LABEL_STUDIO_SETTINGS["same machine"].items():
    print(f"export {key}={shlex.quote(value)}")
')"
if [ "${1:-}" = "--print-env" ]; then
  echo "$settings"
  exit 0
fi
eval "$settings"
echo "Label Studio at http://127.0.0.1:$PORT (connect the backend as http://127.0.0.1:9090)"
exec "$LS_VENV/bin/label-studio" start --no-browser --internal-host 127.0.0.1 --port "$PORT"
