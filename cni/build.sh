#!/usr/bin/env bash
# Build the `ztunnel-cni` plugin as one file to copy into a node's CNI bin dir (DESIGN §4.8).
#
#   cni/build.sh [OUT_DIR]          -> OUT_DIR/ztunnel-cni          (default OUT_DIR: dist/cni)
#
# Two outputs, best first:
#  * PyInstaller one-file executable (no Python needed on the node): built when PyInstaller is
#    importable by $PYTHON (`pip install pyinstaller` in a build stage of the image; it is not a
#    runtime dependency of the project). The plugin imports only the standard library plus three
#    small project modules, so the binary stays small and starts in a few tens of milliseconds.
#  * Otherwise a zipapp (`python3 -m zipapp`): one executable file with a `#!/usr/bin/env python3`
#    shebang; needs a python3 on the node, so it is for nodes/labs that have one.
# Both embed only ztunnel/__init__.py and ztunnel/cni/{__init__,plugin,installer}.py, so
# `ztunnel-cni install ...` works from the same file.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/dist/cni}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
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

if "$PYTHON" -c "import PyInstaller" 2>/dev/null; then
  "$PYTHON" -m PyInstaller --onefile --name ztunnel-cni --distpath "$OUT" --workpath "$STAGE/build" \
    --specpath "$STAGE" --paths "$STAGE/app" --exclude-module tkinter --log-level WARN "$STAGE/app/__main__.py"
  echo "built $OUT/ztunnel-cni (PyInstaller, self-contained)"
else
  "$PYTHON" -m zipapp "$STAGE/app" -o "$OUT/ztunnel-cni" -p "/usr/bin/env python3" -c
  chmod 755 "$OUT/ztunnel-cni"
  echo "built $OUT/ztunnel-cni (zipapp; needs python3 on the node — install PyInstaller for a self-contained binary)"
fi
# Smoke check: the built plugin answers VERSION.
echo '{"cniVersion":"1.0.0"}' | CNI_COMMAND=VERSION "$OUT/ztunnel-cni" >/dev/null
