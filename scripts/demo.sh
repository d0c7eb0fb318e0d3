#!/usr/bin/env bash
# The main job: a working two-node mesh on loopback with an embedded config, and traffic through it.
# Extra arguments go to `ztunnel demo` (e.g. --once, --workdir DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
exec "$VENV/bin/ztunnel" demo "$@"
