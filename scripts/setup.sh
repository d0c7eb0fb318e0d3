#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine, and returns quickly when it is there.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again at any time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

# System tools: iptables for in-pod redirection, the CNI reference plugins for the lab, iproute2 for
# netns, tcpdump for capture checks, curl for demos. Only as root; tests needing them skip otherwise.
# python3-bpfcc + linux-headers-amd64: bcc compiles bpf/redirect.c for eBPF redirection (--redirect ebpf).
# prometheus: `ztunnel lab up --prometheus` scrapes the lab's proxies and waypoints with it (run by the lab, not systemd).
APT_PACKAGES=(iptables iproute2 containernetworking-plugins tcpdump curl openssl python3-bpfcc linux-headers-amd64 prometheus)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]} (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# bcc needs the running kernel's headers at /lib/modules/$(uname -r)/{build,source}. Kernels that ship BTF but
# no headers (6.18 here) compile against the installed Debian headers package, whatever its version: link it,
# only where nothing is there yet. And a bpffs at /sys/fs/bpf, where the node agent pins its maps.
if [ "$(id -u)" = 0 ]; then
  mods="/lib/modules/$(uname -r)"
  hdr="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)"
  if [ -n "$hdr" ] && [ -d "${hdr%-amd64}-common" ]; then
    mkdir -p "$mods"
    [ -e "$mods/build" ] || ln -s "$hdr" "$mods/build"
    [ -e "$mods/source" ] || ln -s "${hdr%-amd64}-common" "$mods/source"
  fi
  if [ -d /sys/fs/bpf ] && [ "$(stat -f -c %T /sys/fs/bpf)" != bpf_fs ]; then
    mount -t bpf bpf /sys/fs/bpf || true
  fi
fi

stamp="$VENV/.installed-$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: creating $VENV and installing the project (pip)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -c "import ztunnel, h2, cryptography, uvloop, grpc" \
    || { echo "setup: the venv at $VENV is incomplete; remove it and run again" >&2; exit 1; }
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

# python3-bpfcc is built for the system Python: make only its `bcc` package importable from the venv.
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ -d /usr/lib/python3/dist-packages/bcc ] && [ ! -e "$site/bcc" ]; then
  ln -s /usr/lib/python3/dist-packages/bcc "$site/bcc"
fi

# The waypoint's and HBONE's hot modules compiled with mypyc, into build/compiled/<digest>/ (ztunnel/compiled):
# ~40 s after a change of the sources it reads, ~0.3 s otherwise. Without it everything runs from source; with no
# mypyc or C compiler (exit 3) the build says so in its one line.
compiled_rc=0
bash "$ROOT/scripts/build-compiled.sh" >/dev/null || compiled_rc=$?
if [ "$compiled_rc" != 0 ] && [ "$compiled_rc" != 3 ]; then
  echo "setup: no compiled hot modules (scripts/build-compiled.sh exit $compiled_rc, see above): the waypoint and HBONE run as pure Python" >&2
fi
