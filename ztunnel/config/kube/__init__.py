"""The Kubernetes API as a config source: a thin list+watch client (`client`, `wire`), one reflector per
resource (`reflector`), and the source that builds the same `ClusterConfig` as the file source (`source`)."""

from ztunnel.config.kube.client import (
    KubeApiError,
    KubeClient,
    KubeConfigError,
    KubeEndpoint,
    from_kubeconfig,
    in_cluster,
)
from ztunnel.config.kube.source import KubeConfigSource, add_source_arguments, make_source, open_source

__all__ = [
    "KubeApiError",
    "KubeClient",
    "KubeConfigError",
    "KubeConfigSource",
    "KubeEndpoint",
    "add_source_arguments",
    "from_kubeconfig",
    "in_cluster",
    "make_source",
    "open_source",
]
