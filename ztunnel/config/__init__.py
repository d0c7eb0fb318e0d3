"""Kubernetes objects -> the mesh model (workloads, services, policies) every consumer shares."""

from ztunnel.config.loader import ConfigError, load_documents, load_files, read_config
from ztunnel.config.model import (
    ClusterConfig,
    KubeObject,
    Namespace,
    Node,
    Service,
    ServicePort,
    Workload,
)

__all__ = [
    "ClusterConfig",
    "ConfigError",
    "KubeObject",
    "Namespace",
    "Node",
    "Service",
    "ServicePort",
    "Workload",
    "load_documents",
    "load_files",
    "read_config",
]
