"""The Kubernetes end-to-end suite runs against the cluster of KUBECONFIG, with deploy/ installed there
(vagrant/provision.sh does both); without one every test is skipped with the reason, so the main suite's
collection passes over it cleanly."""

from __future__ import annotations

import pytest

from tests.e2e_k8s.kube import skip_reason

_REASON: list[str | None] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [i for i in items if "e2e_k8s" in i.nodeid.split("::")[0]]
    if not mine:
        return
    if not _REASON:
        _REASON.append(skip_reason())
    if _REASON[0]:
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=_REASON[0]))
