#!/usr/bin/env bash
# Install Label Studio (for the end-to-end tests) into its own virtualenv, once.
# Usage: scripts/install-label-studio.sh   (LABEL_STUDIO_VENV overrides the place, default .ls-venv,
# relative paths from the repository root). Idempotent: does nothing when the version is already there.
# The version is read from the package metadata: `label-studio --version` would also start a server.
set -euo pipefail

VERSION=1.23.2
cd "$(dirname "$0")/.."
VENV="${LABEL_STUDIO_VENV:-.ls-venv}"

installed() {
  "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("label-studio"))' 2>/dev/null || true
}

if [ -x "$VENV/bin/label-studio" ] && [ "$(installed)" = "$VERSION" ]; then
  echo "label-studio $VERSION already in $VENV"
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "label-studio==$VERSION"
echo "label-studio $(installed) installed in $VENV"
