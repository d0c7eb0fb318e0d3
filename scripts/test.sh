#!/usr/bin/env bash
# The whole test suite: lint and types, then unit, integration (local mode) and netns lab tests (as root).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
echo "== ruff" >&2
"$VENV/bin/ruff" check ztunnel tests bench
echo "== mypy" >&2
"$VENV/bin/mypy"  # strict, as configured in pyproject.toml
echo "== pytest" >&2
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exit 5 means no test ran: that is a failure for this project.
[ "$rc" = 5 ] && { echo "test: pytest collected no tests" >&2; exit 1; }
exit "$rc"
