"""Where the paths run: `local` (loopback addresses in local mode, SOCKS5 entry) or `lab` (a two-node netns
lab built with `ztunnel lab up`, in-pod redirection). A topology starts the app and says where the pods are;
the paths (`bench.paths`) are built on top of it.
"""

# The mesh pods' namespace, in both topologies' cluster configs.
AMBIENT_NAMESPACE_YAML = """\
apiVersion: v1
kind: Namespace
metadata:
  name: bench
  labels:
    istio.io/dataplane-mode: ambient
"""
