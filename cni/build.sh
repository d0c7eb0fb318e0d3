#!/usr/bin/env bash
# Build the `ztunnel-cni` plugin as one self-contained executable for a node's CNI bin dir (DESIGN §4.8: it
# must run on a node that has no Python). See cni/README.md.
#
#   cni/build.sh [OUT_DIR]            -> OUT_DIR/ztunnel-cni   PyInstaller one-file binary (default OUT_DIR: dist/cni)
#   cni/build.sh --zipapp [OUT_DIR]   -> OUT_DIR/ztunnel-cni   zipapp; needs python3 on the node (labs, dev boxes)
#
# PyInstaller is a build tool, not a dependency of the project: it is installed into its own build venv
# ($CNI_BUILD_VENV, default build/cni-build-venv, pinned to $PYINSTALLER_VERSION), never into .venv.
# If it cannot be installed the build fails; it never falls back to the zipapp silently.
# Both outputs embed only ztunnel/__init__.py and ztunnel/cni/{__init__,plugin,installer}.py (standard
# library only), so `ztunnel-cni install ...` works from the same file.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIND=pyinstaller
if [ "${1:-}" = "--zipapp" ]; then
  KIND=zipapp
  shift
fi
OUT="${1:-$ROOT/dist/cni}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
BUILD_VENV="${CNI_BUILD_VENV:-$ROOT/build/cni-build-venv}"
PYINSTALLER_VERSION="${PYINSTALLER_VERSION:-6.22.3}"
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
