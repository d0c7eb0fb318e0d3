"""The self-contained `ztunnel-cni` (PyInstaller) the CNI plugin tests run as well as the module (DESIGN §4.8).

`cni/build.sh --cached` builds it once per machine under build/cni/<key>/ (~20 s cold, ~0.2 s warm).
scripts/test.sh builds it before pytest and passes its path in ZTUNNEL_CNI_BINARY. Without that, a root run
builds it here and a failed build fails the tests with the build's output; a non-root run builds only with
ZTUNNEL_TEST_CNI_BINARY=1 (else skips, saying so), and a machine without the build tooling skips.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLING_MISSING = 3  # cni/build.sh --cached: no venv/ensurepip in the base Python, or no ldd


def cni_binary() -> Path:
    """The built binary's path; skips or fails the calling test when there is none (see the module doc)."""
    given = os.environ.get("ZTUNNEL_CNI_BINARY")
    if given:
        path = Path(given)
        if not (path.is_file() and os.access(path, os.X_OK)):
            pytest.fail(f"ZTUNNEL_CNI_BINARY={given} is not an executable file: unset it, or run cni/build.sh --cached")
        return path
    if os.geteuid() != 0 and os.environ.get("ZTUNNEL_TEST_CNI_BINARY") != "1":
        pytest.skip("not root: the ztunnel-cni binary is built as root (CI) or with ZTUNNEL_TEST_CNI_BINARY=1 (~20 s)")
    build = subprocess.run(
        ["bash", str(ROOT / "cni" / "build.sh"), "--cached"], capture_output=True, text=True, timeout=900
    )
    if build.returncode == TOOLING_MISSING:
        pytest.skip(build.stderr.strip())
    if build.returncode != 0:
        pytest.fail(f"cni/build.sh --cached exited {build.returncode}:\n{build.stderr}{build.stdout}", pytrace=False)
    return Path(build.stdout.strip().splitlines()[-1])
