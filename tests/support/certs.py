"""Certificates for an in-process proxy or HBONE server/pool: the production path, `CertificateManager`.

The proxy's `--ca-dir` runs `CertificateManager.in_process`; tests use the same so they exercise what runs
in production (one signing request per identity shared by callers, rotation at half-life, the CRL poll).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ztunnel.identity.manager import CertificateManager


@contextlib.asynccontextmanager
async def in_process_certs(ca_dir: Path, **options: Any) -> AsyncIterator[CertificateManager]:
    """A started in-process CertificateManager on `ca_dir`, closed (its tasks awaited) on exit."""
    certs = CertificateManager.in_process(ca_dir, **options)
    await certs.start()
    try:
        yield certs
    finally:
        await certs.close()
