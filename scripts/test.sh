#!/usr/bin/env bash
# The project's test command (README and .ci/run call this). Extra arguments go to pytest.
# Needs a `redis-server` binary on PATH: the tests start their own servers on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
if ! command -v redis-server >/dev/null; then
  echo "scripts/test.sh: redis-server not found; install it (Debian/Ubuntu: apt-get install redis-server, macOS: brew install redis)" >&2
  exit 2
fi
exec "${STYLEQUEUE_VENV:-.venv}/bin/python" -m pytest "$@"
