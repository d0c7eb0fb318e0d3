"""Programs that lab pods run (`[sys.executable, path, args...]`): standalone scripts on the stdlib and the venv's
packages, each logging one JSON line per request to stdout (the pod's log, which the lab tests read)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTAPP = HERE / "testapp.py"
JWKS_SERVER = HERE / "jwks_server.py"
EXTAUTHZ_SERVER = HERE / "extauthz_server.py"
