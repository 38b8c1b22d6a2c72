#!/usr/bin/env bash
# Install the PostgreSQL server the store tests run against (tests/postgres.py starts a throwaway one on a
# unix socket and a loopback port): Debian's postgresql package. Idempotent: does nothing when initdb is
# already on PATH or under /usr/lib/postgresql/<version>/bin. Needs root (or sudo) only to install.
set -euo pipefail
find_bin() {
  if command -v initdb >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
    return 0
  fi
  local dir
  for dir in /usr/lib/postgresql/*/bin; do  # none installed: the pattern stays as it is and fails the test
    if [ -x "$dir/initdb" ]; then echo "$dir"; fi
  done | sort -V | tail -n 1
}
BIN="$(find_bin)"
if [ -n "$BIN" ]; then
  echo "PostgreSQL already installed: $("$BIN/postgres" --version 2>/dev/null || echo "$BIN")"
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql
BIN="$(find_bin)"
if [ -z "$BIN" ]; then
  echo "postgresql was installed but no initdb was found under /usr/lib/postgresql/*/bin" >&2
  exit 1
fi
echo "PostgreSQL installed: $("$BIN/postgres" --version)"
