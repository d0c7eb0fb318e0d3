"""A container runtime's side of CNI: run a conflist's plugins the way containerd's libcni does.

Each plugin gets the list's `name` and `cniVersion`, its own section of the list, and the previous plugin's
result as `prevResult`; the environment carries CNI_COMMAND, CNI_NETNS, CNI_CONTAINERID, CNI_IFNAME, CNI_PATH
and CNI_ARGS with the Kubernetes pod name, namespace and uid. ADD runs the plugins in order, DEL in reverse
with the cached ADD result. Plugins run inside the node's netns (`ip netns exec NODE PLUGIN`), as they would
on a node.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztunnel.errors import ZtunnelError
from ztunnel.lab.netns import exec_prefix, run

CNI_VERSION = "1.0.0"
SYSTEM_CNI_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
BRIDGE_NAME = "cni0"
TRY_AGAIN_LATER = 11  # CNI error code: a plugin asks the runtime to retry


class CniInvocationError(ZtunnelError):
    """A plugin the lab ran, as the runtime, failed; carries the CNI error code so the runtime can decide to retry.

    The runtime's side of a failed call: the plugin's own error (what it prints) is `ztunnel.cni.plugin.CniError`.
    """

    def __init__(self, plugin: str, command: str, code: int, msg: str, details: str = "") -> None:
        self.plugin = plugin
        self.command = command
        self.code = code
        self.msg = msg
        self.details = details
        text = f"CNI {command} failed in plugin {plugin} (code {code}): {msg}"
        super().__init__(f"{text}: {details}" if details else text)


@dataclass(frozen=True)
class PodRef:
    """What the runtime knows about the sandbox it is wiring."""

    namespace: str
    name: str
    uid: str
    container_id: str
    netns_path: str
    ifname: str = "eth0"

    def cni_args(self) -> str:
        return (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE={self.namespace};K8S_POD_NAME={self.name};"
            f"K8S_POD_INFRA_CONTAINER_ID={self.container_id};K8S_POD_UID={self.uid}"
        )


def plugin_dirs(extra: Sequence[str] = ()) -> list[str]:
    return [*extra, *(d for d in SYSTEM_CNI_DIRS if Path(d).is_dir())]


def find_plugin(plugin_type: str, dirs: Sequence[str]) -> str:
    for d in dirs:
        p = Path(d) / plugin_type
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    raise CniInvocationError(
        plugin_type,
        "lookup",
        0,
        f"plugin {plugin_type!r} not found in CNI_PATH {':'.join(dirs)}",
        "install containernetworking-plugins (scripts/setup.sh)",
    )


def node_conflist(
    network: str, pod_cidr: str, ipam_dir: str, chained: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """The node's conflist: bridge + host-local (per-node dataDir) as the primary, then chained plugins."""
    return {
        "cniVersion": CNI_VERSION,
        "name": network,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE_NAME,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir,
                },
            },
            *[dict(p) for p in chained],
        ],
    }


CONF_SUFFIXES = (".conf", ".conflist", ".json")


def load_network_config(conf_dir: Path) -> dict[str, Any]:
    """The network a runtime uses: the lexically first config file in CONF_DIR, a single `.conf` as a list of one."""
    try:
        names = sorted(n for n in os.listdir(conf_dir) if n.endswith(CONF_SUFFIXES) and not n.startswith("."))
    except FileNotFoundError:
        names = []
    if not names:
        raise CniInvocationError(
            "config", "load", 0, f"no CNI network config in {conf_dir}", "the node's network is not set up"
        )
    path = conf_dir / names[0]
    try:
        conf = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CniInvocationError("config", "load", 0, f"{path}: not a readable CNI config ({e})") from e
    if not isinstance(conf, dict):
        raise CniInvocationError("config", "load", 0, f"{path}: a CNI config must be a JSON object")
    if not isinstance(conf.get("plugins"), list):  # a single-plugin .conf
        single = {k: v for k, v in conf.items() if k not in ("cniVersion", "name")}
        conf = {
            "cniVersion": conf.get("cniVersion", CNI_VERSION),
            "name": conf.get("name", path.stem),
            "plugins": [single],
        }
    conf.setdefault("cniVersion", CNI_VERSION)
    conf.setdefault("name", path.stem)
    return conf


LOOPBACK_CONF: dict[str, Any] = {"cniVersion": CNI_VERSION, "name": "cni-loopback", "type": "loopback"}


class Runtime:
    """Invokes plugins for one node. `dirs` is CNI_PATH; `node_netns` is where plugins run."""

    def __init__(self, node_netns: str, dirs: Sequence[str], timeout: float = 60.0) -> None:
        self.node_netns = node_netns
        self.dirs = list(dirs)
        self.timeout = timeout

    def _invoke(self, command: str, conf: Mapping[str, Any], pod: PodRef) -> dict[str, Any]:
        plugin_type = str(conf.get("type", ""))
        binary = find_plugin(plugin_type, self.dirs)
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod.container_id,
            "CNI_NETNS": pod.netns_path,
            "CNI_IFNAME": pod.ifname,
            "CNI_ARGS": pod.cni_args(),
            "CNI_PATH": ":".join(self.dirs),
        }
        proc = run(
            [*exec_prefix(self.node_netns), binary], input=json.dumps(conf), env=env, check=False, timeout=self.timeout
        )
        out = proc.stdout.strip()
        if proc.returncode != 0:
            try:
                err = json.loads(out)
                raise CniInvocationError(
                    plugin_type, command, int(err.get("code", 0)), str(err.get("msg", "")), str(err.get("details", ""))
                )
            except (ValueError, AttributeError):
                raise CniInvocationError(
                    plugin_type, command, 0, f"exit {proc.returncode}", (proc.stderr or out).strip()[:500]
                ) from None
        if not out:
            return {}
        try:
            result = json.loads(out)
        except ValueError:
            raise CniInvocationError(plugin_type, command, 0, "printed something that is not JSON", out[:500]) from None
        if not isinstance(result, dict):
            raise CniInvocationError(plugin_type, command, 0, "printed JSON that is not an object", out[:500])
        return result

    @staticmethod
    def _plugin_conf(
        conflist: Mapping[str, Any], plugin: Mapping[str, Any], prev: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        conf = dict(plugin)
        conf["name"] = conflist["name"]
        conf["cniVersion"] = conflist["cniVersion"]
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def add(self, conflist: Mapping[str, Any], pod: PodRef) -> dict[str, Any]:
        """ADD through the chain; on failure the runtime tears the chain down (DEL) before reporting."""
        prev: dict[str, Any] | None = None
        try:
            for plugin in conflist["plugins"]:
                prev = self._invoke("ADD", self._plugin_conf(conflist, plugin, prev), pod)
        except CniInvocationError:
            self.delete(conflist, pod, prev, best_effort=True)
            raise
        return prev or {}

    def delete(
        self, conflist: Mapping[str, Any], pod: PodRef, cached: Mapping[str, Any] | None, best_effort: bool = False
    ) -> None:
        errors: list[CniInvocationError] = []
        for plugin in reversed(conflist["plugins"]):
            try:
                self._invoke("DEL", self._plugin_conf(conflist, plugin, cached or None), pod)
            except CniInvocationError as e:
                errors.append(e)
        if errors and not best_effort:
            raise errors[0]

    def check(self, conflist: Mapping[str, Any], pod: PodRef, cached: Mapping[str, Any]) -> None:
        for plugin in conflist["plugins"]:
            self._invoke("CHECK", self._plugin_conf(conflist, plugin, cached), pod)

    def loopback(self, pod: PodRef, command: str = "ADD") -> None:
        """containerd brings up the sandbox's lo with the loopback plugin, outside the pod network's conflist."""
        self._invoke(
            command, LOOPBACK_CONF, PodRef(pod.namespace, pod.name, pod.uid, pod.container_id, pod.netns_path, "lo")
        )
