#!/usr/bin/env bash
# Install the headless browser the UI test drives (tests/test_e2e_browser.py): Debian's chromium and
# chromium-driver, at /usr/bin/chromium. Idempotent: does nothing when it is there. Needs root (or sudo).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver
