#!/usr/bin/env bash
# Build the `ztunnel-cni` plugin as one self-contained executable for a node's CNI bin dir (DESIGN §4.8: it
# must run on a node that has no Python). See cni/README.md.
#
#   cni/build.sh [OUT_DIR]            -> OUT_DIR/ztunnel-cni   PyInstaller one-file binary (default OUT_DIR: dist/cni)
#   cni/build.sh --zipapp [OUT_DIR]   -> OUT_DIR/ztunnel-cni   zipapp; needs python3 on the node (labs, dev boxes)
#   cni/build.sh --cached             -> build/cni/<key>/ztunnel-cni, built only when its key is new; prints the path
#
# --cached keys the binary by a hash of what goes into it (ztunnel/__init__.py, ztunnel/cni/*.py, this script,
# the PyInstaller version, the base interpreter's version, the machine): the test suite builds once per machine
# and reuses it. Exit 3 means the build tooling is missing here (no venv/ensurepip in the base Python, no ldd).
#
# PyInstaller is a build tool, not a dependency of the project: it is installed into its own build venv
# ($CNI_BUILD_VENV, default build/cni-build-venv, pinned to $PYINSTALLER_VERSION), never into .venv.
# If it cannot be installed the build fails; it never falls back to the zipapp silently.
# Both outputs embed only ztunnel/__init__.py and ztunnel/cni/{__init__,plugin,installer}.py (standard
# library only), so `ztunnel-cni install ...` works from the same file.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIND=pyinstaller
case "${1:-}" in
  --zipapp) KIND=zipapp; shift ;;
  --cached) KIND=cached; shift ;;
esac
OUT="${1:-$ROOT/dist/cni}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
BUILD_VENV="${CNI_BUILD_VENV:-$ROOT/build/cni-build-venv}"
PYINSTALLER_VERSION="${PYINSTALLER_VERSION:-6.22.3}"
export PYINSTALLER_VERSION

if [ "$KIND" = cached ]; then
  BASE="$("$PYTHON" -c 'import sys; print(sys._base_executable)')"
  if ! "$BASE" -c 'import venv, ensurepip' 2>/dev/null || ! command -v ldd >/dev/null; then
    echo "error: cannot build ztunnel-cni here: $BASE lacks venv/ensurepip (apt-get install python3-venv)" \
      "or ldd is missing" >&2
    exit 3
  fi
  KEY="$(cd "$ROOT" && for f in ztunnel/__init__.py ztunnel/cni/*.py cni/build.sh; do echo "$f"; cat "$f"; done \
    | { cat; echo "pyinstaller $PYINSTALLER_VERSION"; "$BASE" -VV; uname -m; } | sha256sum | cut -c1-16)"
  CACHE="$ROOT/build/cni/$KEY"
  if [ ! -x "$CACHE/ztunnel-cni" ]; then
    mkdir -p "$ROOT/build/cni"
    TMP_OUT="$(mktemp -d "$ROOT/build/cni/.build.XXXXXX")"
    chmod 755 "$TMP_OUT"
    trap 'rm -rf "$TMP_OUT"' EXIT
    bash "$ROOT/cni/build.sh" "$TMP_OUT" >&2
    # a concurrent build of the same key may have won: keep the first, drop this one
    mv -T "$TMP_OUT" "$CACHE" 2>/dev/null || rm -rf "$TMP_OUT"
  fi
  echo "$CACHE/ztunnel-cni"
  exit 0
fi
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT

mkdir -p "$STAGE/app/ztunnel/cni" "$OUT"
cp "$ROOT/ztunnel/__init__.py" "$STAGE/app/ztunnel/"
cp "$ROOT/ztunnel/cni/__init__.py" "$ROOT/ztunnel/cni/plugin.py" "$ROOT/ztunnel/cni/installer.py" "$STAGE/app/ztunnel/cni/"
cat > "$STAGE/app/__main__.py" <<'PY'
import sys

from ztunnel.cni.plugin import main

sys.exit(main())
PY

if [ "$KIND" = zipapp ]; then
  "$PYTHON" -m zipapp "$STAGE/app" -o "$OUT/ztunnel-cni" -p "/usr/bin/env python3" -c
  chmod 755 "$OUT/ztunnel-cni"
  echo "built $OUT/ztunnel-cni (zipapp: needs python3 on the node)"
else
  # The build venv: created once, reused; the base interpreter (not .venv's packages) is what gets bundled.
  BASE="$("$PYTHON" -c 'import sys; print(sys._base_executable)')"
  if ! "$BUILD_VENV/bin/python" -c "import PyInstaller, sys; sys.exit(PyInstaller.__version__ != '$PYINSTALLER_VERSION')" \
      2>/dev/null; then
    echo "installing PyInstaller $PYINSTALLER_VERSION into the build venv $BUILD_VENV" >&2
    rm -rf "$BUILD_VENV"
    "$BASE" -m venv "$BUILD_VENV"
    if ! "$BUILD_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "pyinstaller==$PYINSTALLER_VERSION"; then
      echo "error: could not install PyInstaller $PYINSTALLER_VERSION from PyPI into $BUILD_VENV;" \
        "fix that, or build a zipapp (needs python3 on the node) with: cni/build.sh --zipapp" >&2
      exit 1
    fi
  fi
  "$BUILD_VENV/bin/python" -m PyInstaller --onefile --noconfirm --clean --name ztunnel-cni --distpath "$OUT" \
    --workpath "$STAGE/build" --specpath "$STAGE" --paths "$STAGE/app" --exclude-module tkinter \
    --log-level WARN "$STAGE/app/__main__.py"
  echo "built $OUT/ztunnel-cni (PyInstaller one-file executable: no Python needed on the node)"
fi
# Smoke check: the built plugin answers VERSION with an empty environment (no PATH, no PYTHON*).
echo '{"cniVersion":"1.0.0"}' | env -i CNI_COMMAND=VERSION "$OUT/ztunnel-cni" >/dev/null
