#!/usr/bin/env bash
# The whole test suite: lint and types, then unit, integration (local mode) and netns lab tests (as root).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
echo "== ruff" >&2
"$VENV/bin/ruff" check ztunnel tests bench deploy
echo "== mypy" >&2
"$VENV/bin/mypy"  # strict, as configured in pyproject.toml
# The CNI plugin tests also run the self-contained binary (no Python on the node): built once per machine.
echo "== ztunnel-cni binary (cni/build.sh --cached: ~20 s the first time, then reused)" >&2
cni_log="$(mktemp)"
set +e
ZTUNNEL_CNI_BINARY="$(bash "$ROOT/cni/build.sh" --cached 2>"$cni_log")"
cni_rc=$?
set -e
if [ "$cni_rc" = 0 ]; then
  export ZTUNNEL_CNI_BINARY
elif [ "$cni_rc" = 3 ] || [ "$(id -u)" != 0 ]; then
  echo "test: ztunnel-cni binary not built (its tests skip): $(tail -n 3 "$cni_log")" >&2
  unset ZTUNNEL_CNI_BINARY
else
  cat "$cni_log" >&2
  rm -f "$cni_log"
  echo "test: cni/build.sh --cached failed (exit $cni_rc)" >&2
  exit 1
fi
rm -f "$cni_log"
echo "== pytest" >&2
set +e
"$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider "$@"  # -rs: every skip says why
rc=$?
set -e
# pytest exit 5 means no test ran: that is a failure for this project.
[ "$rc" = 5 ] && { echo "test: pytest collected no tests" >&2; exit 1; }
exit "$rc"
