"""The CNI chain plugin (`ztunnel-cni`) and its installer.

The names both of them use live here, so the plugin may call the installer (`ztunnel-cni install`)
without the installer importing the plugin back. Standard library only: this package is shipped as a
self-contained executable (cni/build.sh).
"""

PLUGIN_TYPE = "ztunnel-cni"
DEFAULT_AGENT_SOCKET = "/var/run/ztunnel/cni.sock"
