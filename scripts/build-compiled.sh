#!/usr/bin/env bash
# Build the waypoint's and HBONE's hot modules with mypyc into build/compiled/<digest>/, or reuse that build
# (ztunnel/compiled: the digest covers every source file the build reads, the mypy version and the interpreter).
# ~35 s on two cores the first time after a change of those files, ~0.3 s when the digest's build exists.
# Prints the build's directory; exit 3: no mypyc or C compiler here (the project then runs as pure Python).
#
#   scripts/build-compiled.sh [--force]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
cd "$ROOT"
exec "$PYTHON" -m ztunnel.compiled build "$@"
