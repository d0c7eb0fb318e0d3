#!/usr/bin/env bash
# Run tests/e2e_k8s against the VM's kind cluster (as the vagrant user): a venv with the project's test
# extras, KUBECONFIG set, the images the suite uses named. Extra arguments go to pytest.
set -euo pipefail
SRC=/ztunnel-py
VENV="$HOME/e2e-venv"
if [ ! -x "$VENV/bin/pytest" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e "$SRC[test]"
fi
export KUBECONFIG="${KUBECONFIG:-$HOME/.kube/config}"
if [ "${REDIRECT:-iptables}" = ebpf ]; then
  VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$SRC/pyproject.toml" | head -n1)"
  export E2E_IMAGE="${E2E_IMAGE:-ztunnel-py:$VERSION-bpf}" E2E_PULL_POLICY="${E2E_PULL_POLICY:-IfNotPresent}"
else
  export E2E_IMAGE="${E2E_IMAGE:-ztunnel-py:dev}" E2E_PULL_POLICY="${E2E_PULL_POLICY:-Never}"
fi
cd "$SRC"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -v -rs tests/e2e_k8s "$@"
