"""`ztunnel-cni install`: put the plugin into the node's CNI config, and keep it there.

The runtime uses the lexically first config file in the conf dir, so that is where the plugin is
appended (a single-plugin `.conf` is converted to a `.conflist`). Every write is atomic (temp file
+ rename in the same dir), and the original bytes are kept next to it as `<file>.ztunnel-backup`
(an extension runtimes ignore) so `--uninstall` restores exactly what was there. With `--watch`
it polls and re-adds the plugin when another component rewrites the file; `--uninstall-on-exit`
says what happens when it stops (SIGTERM): `auto` asks the API server whether its DaemonSet is being
deleted (an uninstall: remove the plugin) or not (a rolling update or a restart: keep it, so pods that
start meanwhile wait for the next agent instead of running unmeshed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztunnel.cni import DEFAULT_AGENT_SOCKET, PLUGIN_TYPE

log = logging.getLogger("ztunnel.cni")

CONF_SUFFIXES = (".conf", ".conflist", ".json")
BACKUP_SUFFIX = ".ztunnel-backup"
UNINSTALL_MODES = ("never", "always", "auto")
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class InstallError(Exception):
    pass


# ---- pure core -----------------------------------------------------------------------------------


def primary_conf(names: Sequence[str]) -> str | None:
    """The file the runtime will use: lexically first with a CNI config extension."""
    candidates = sorted(n for n in names if n.endswith(CONF_SUFFIXES) and not n.startswith("."))
    return candidates[0] if candidates else None


def is_conflist(name: str, conf: Mapping[str, Any]) -> bool:
    return name.endswith(".conflist") or isinstance(conf.get("plugins"), list)


def has_plugin(conf: Mapping[str, Any]) -> bool:
    plugins = conf.get("plugins")
    return isinstance(plugins, list) and any(isinstance(p, dict) and p.get("type") == PLUGIN_TYPE for p in plugins)


def plugin_entry(agent_socket: str) -> dict[str, Any]:
    return {"type": PLUGIN_TYPE, "agent_socket": agent_socket}


def with_plugin(name: str, conf: Mapping[str, Any], entry: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(file name, conflist) with our plugin appended last (converting a single .conf)."""
    if is_conflist(name, conf):
        out = dict(conf)
        plugins = [p for p in conf.get("plugins", []) if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
        out["plugins"] = [*plugins, dict(entry)]
        return name, out
    single = {k: v for k, v in conf.items() if k not in ("cniVersion", "name")}
    new_name = Path(name).stem + ".conflist"
    out = {"cniVersion": conf.get("cniVersion", "1.0.0"), "name": conf.get("name", Path(name).stem)}
    out["plugins"] = [single, dict(entry)]
    return new_name, out


def without_plugin(conf: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(conf)
    out["plugins"] = [p for p in conf.get("plugins", []) if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
    return out


def render(conf: Mapping[str, Any]) -> str:
    return json.dumps(conf, indent=2) + "\n"


# ---- file edge -----------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _load(path: Path) -> dict[str, Any]:
    try:
        conf = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise InstallError(f"{path}: cannot read CNI config ({e}); fix or remove the file") from e
    if not isinstance(conf, dict):
        raise InstallError(f"{path}: a CNI config must be a JSON object")
    return conf


@dataclass
class Installer:
    conf_dir: Path
    bin_dir: Path
    agent_socket: str = DEFAULT_AGENT_SOCKET
    plugin_binary: Path | None = None  # copied to bin_dir/ztunnel-cni when set

    def install(self) -> bool:
        """Make sure the plugin is in the primary config; True when a file was written."""
        changed = self._install_binary()
        names = os.listdir(self.conf_dir) if self.conf_dir.is_dir() else []
        name = primary_conf(names)
        if name is None:
            log.info("no CNI config in %s yet; waiting for the primary plugin to write one", self.conf_dir)
            return changed
        path = self.conf_dir / name
        original = path.read_bytes()
        conf = _load(path)
        if has_plugin(conf) and conf["plugins"][-1].get("type") == PLUGIN_TYPE:
            return changed
        new_name, new_conf = with_plugin(name, conf, plugin_entry(self.agent_socket))
        new_path = self.conf_dir / new_name
        backup = self.conf_dir / (name + BACKUP_SUFFIX)
        atomic_write(backup, original)
        atomic_write(new_path, render(new_conf).encode())
        if new_path != path:
            path.unlink()
        log.info("added %s to %s", PLUGIN_TYPE, new_path, extra={"file": str(new_path)})
        return True

    def uninstall(self) -> None:
        """Undo exactly what install did: restore backed-up originals, drop our entry, remove the binary."""
        if self.conf_dir.is_dir():
            for backup in sorted(self.conf_dir.glob("*" + BACKUP_SUFFIX)):
                original_name = backup.name[: -len(BACKUP_SUFFIX)]
                original = self.conf_dir / original_name
                converted = self.conf_dir / (Path(original_name).stem + ".conflist")
                current = converted if not original.exists() and converted.exists() else original
                self._restore(backup, original, current)
            for name in os.listdir(self.conf_dir):  # entries added without a backup (should not happen)
                path = self.conf_dir / name
                if name.endswith(CONF_SUFFIXES) and not name.startswith("."):
                    try:
                        conf = _load(path)
                    except InstallError:
                        continue
                    if has_plugin(conf):
                        atomic_write(path, render(without_plugin(conf)).encode())
        target = self.bin_dir / PLUGIN_TYPE
        if self.plugin_binary is not None and target.exists() and not self._is_source(target):
            target.unlink()

    def _restore(self, backup: Path, original: Path, current: Path) -> None:
        saved = backup.read_bytes()
        if current.exists():
            try:
                now = without_plugin(_load(current))
                expected = without_plugin(with_plugin(original.name, json.loads(saved), plugin_entry(""))[1])
            except (InstallError, ValueError):
                now, expected = {}, {"unreadable": True}
            if now != expected:
                # Someone changed the file since: keep their change, only take our entry out.
                if current == original and isinstance(now.get("plugins"), list):
                    atomic_write(current, render(now).encode())
                backup.unlink()
                return
        atomic_write(original, saved)
        if current != original and current.exists():
            current.unlink()
        backup.unlink()

    def _install_binary(self) -> bool:
        if self.plugin_binary is None:
            return False
        target = self.bin_dir / PLUGIN_TYPE
        if self._is_source(target):
            return False  # the bin dir is where the plugin already lives
        src = self.plugin_binary.read_bytes()
        if target.exists() and target.read_bytes() == src:
            return False
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(target, src, mode=0o755)
        return True

    def _is_source(self, target: Path) -> bool:
        try:
            return self.plugin_binary is not None and target.samefile(self.plugin_binary)
        except OSError:
            return False

    def watch(self, stop: threading.Event, interval: float = 1.0) -> None:
        """Re-install whenever the primary config loses the plugin, until `stop` is set."""
        while not stop.is_set():
            try:
                if self.install():
                    log.info("re-added %s to the CNI config", PLUGIN_TYPE)
            except (OSError, InstallError) as e:
                log.warning("CNI config check failed: %s", e)
            stop.wait(interval)


# ---- at exit: uninstall or keep ------------------------------------------------------------------


def uninstall_at_exit(mode: str, daemonset_state: str | None) -> bool:
    """Whether to take the plugin out when the installer stops.

    `auto` removes it only when the API server says the DaemonSet is gone or being deleted; when it is
    there (an update, a restart) or the answer is unknown, the plugin stays: pods then fail their CNI ADD
    with "try again" until an agent runs, which is safe, where a missing plugin lets them start unmeshed.
    """
    if mode == "always":
        return True
    if mode == "never":
        return False
    return daemonset_state in ("gone", "deleting")


@dataclass(frozen=True)
class KubeAPI:
    """Just enough of the API server for one GET: base URL, bearer token file, CA bundle."""

    base_url: str
    token_file: Path | None = None
    ca_file: Path | None = None

    @classmethod
    def in_cluster(cls, env: Mapping[str, str] = os.environ, sa_dir: Path = SA_DIR) -> KubeAPI | None:
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            return None
        host = f"[{host}]" if ":" in host else host
        token, ca = sa_dir / "token", sa_dir / "ca.crt"
        return cls(f"https://{host}:{port}", token if token.exists() else None, ca if ca.exists() else None)

    def get_json(self, path: str, timeout: float) -> tuple[int, Any]:
        """(HTTP status, decoded body or None); OSError/ValueError when there is no usable answer."""
        headers = {"Accept": "application/json"}
        if self.token_file is not None:
            headers["Authorization"] = "Bearer " + self.token_file.read_text().strip()
        req = urllib.request.Request(self.base_url.rstrip("/") + path, headers=headers)
        ctx = None
        if self.base_url.startswith("https:"):
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            e.close()
            return e.code, None


def daemonset_state(api: KubeAPI, namespace: str, name: str, timeout: float = 5.0) -> str:
    """'present', 'deleting' (deletionTimestamp set), 'gone' (404) or 'unknown' (no clear answer)."""
    path = f"/apis/apps/v1/namespaces/{urllib.parse.quote(namespace)}/daemonsets/{urllib.parse.quote(name)}"
    try:
        status, body = api.get_json(path, timeout)
    except (OSError, ValueError) as e:
        log.warning("cannot ask the API server about DaemonSet %s/%s: %s", namespace, name, e)
        return "unknown"
    if status == 404:
        return "gone"
    if status != 200 or not isinstance(body, dict):
        log.warning("API server answered %s for DaemonSet %s/%s", status, namespace, name)
        return "unknown"
    return "deleting" if (body.get("metadata") or {}).get("deletionTimestamp") else "present"


def settle_daemonset_state(
    api: KubeAPI, namespace: str, name: str, *, attempts: int = 3, pause: float = 1.0, timeout: float = 3.0
) -> str:
    """daemonset_state, asked again a few times while the answer is 'unknown' (a blip of the API server
    must not decide an uninstall either way); bounded so it fits in the pod's grace period."""
    state = "unknown"
    for i in range(attempts):
        state = daemonset_state(api, namespace, name, timeout)
        if state != "unknown":
            break
        if i + 1 < attempts:
            time.sleep(pause)
    return state


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PLUGIN_TYPE} install", description=__doc__.splitlines()[0])
    p.add_argument("--cni-conf-dir", required=True, type=Path, help="e.g. /etc/cni/net.d")
    p.add_argument("--cni-bin-dir", required=True, type=Path, help="e.g. /opt/cni/bin")
    p.add_argument("--agent-socket", default=DEFAULT_AGENT_SOCKET, help="node agent CNI socket the plugin calls")
    p.add_argument(
        "--plugin-binary",
        type=Path,
        default=None,
        help="executable to copy to <bin dir>/ztunnel-cni (default: this program; 'none' to skip)",
    )
    p.add_argument("--uninstall", action="store_true", help="remove exactly what install added")
    p.add_argument("--watch", action="store_true", help="keep the plugin in the config until SIGTERM")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between checks with --watch")
    p.add_argument(
        "--uninstall-on-exit",
        choices=UNINSTALL_MODES,
        default="never",
        help="with --watch, at SIGTERM: remove the plugin always, never, or (auto) only if --daemonset is "
        "gone or being deleted, as on an uninstall; a rolling update keeps it (default never)",
    )
    p.add_argument("--daemonset", default=None, help="the DaemonSet this installer runs in (--uninstall-on-exit auto)")
    p.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE"),
        help="namespace of --daemonset (default: $POD_NAMESPACE)",
    )
    p.add_argument(
        "--kube-api",
        default=None,
        help="API server URL (default: in-cluster, from KUBERNETES_SERVICE_HOST/PORT and the pod's "
        "service-account token and CA)",
    )
    p.add_argument("--kube-token-file", type=Path, default=None, help="bearer token file for --kube-api")
    return p


def _kube_api(args: argparse.Namespace) -> KubeAPI | None:
    if args.kube_api:
        return KubeAPI(args.kube_api, args.kube_token_file)
    return KubeAPI.in_cluster()


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    binary: Path | None
    if str(args.plugin_binary) == "none":
        binary = None
    elif args.plugin_binary is not None:
        binary = args.plugin_binary
    else:
        found = shutil.which(sys.argv[0]) or sys.argv[0]
        binary = Path(found).resolve() if Path(found).exists() else None
    if args.uninstall_on_exit == "auto" and not (args.daemonset and args.namespace):
        print("error: --uninstall-on-exit auto needs --daemonset and --namespace (or $POD_NAMESPACE)", file=sys.stderr)
        return 2
    installer = Installer(args.cni_conf_dir, args.cni_bin_dir, args.agent_socket, binary)
    try:
        if args.uninstall:
            installer.uninstall()
            return 0
        installer.install()
        if args.watch:
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            installer.watch(stop, args.interval)
            _at_exit(installer, args)
    except (OSError, InstallError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _at_exit(installer: Installer, args: argparse.Namespace) -> None:
    state: str | None = None
    if args.uninstall_on_exit == "auto":
        api = _kube_api(args)
        state = "unknown" if api is None else settle_daemonset_state(api, args.namespace, args.daemonset)
    where = f"DaemonSet {args.namespace}/{args.daemonset}"
    if uninstall_at_exit(args.uninstall_on_exit, state):
        installer.uninstall()
        log.info("removed %s from the CNI config (%s)", PLUGIN_TYPE, f"{where} {state}" if state else "always")
    elif state == "unknown":
        log.warning(
            "kept %s in the CNI config: could not tell whether %s is being deleted; if this is an uninstall, "
            "run `%s install --uninstall --cni-conf-dir %s --cni-bin-dir %s` on this node",
            PLUGIN_TYPE,
            where,
            PLUGIN_TYPE,
            installer.conf_dir,
            installer.bin_dir,
        )
    else:
        log.info("kept %s in the CNI config (%s)", PLUGIN_TYPE, f"{where} {state}" if state else "never")
