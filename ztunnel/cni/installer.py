"""`ztunnel-cni install`: put the plugin into the node's CNI config, and keep it there.

The runtime uses the lexically first config file in the conf dir, so that is where the plugin is
appended (a single-plugin `.conf` is converted to a `.conflist`). Every write is atomic (temp file
+ rename in the same dir), and the original bytes are kept next to it as `<file>.ztunnel-backup`
(an extension runtimes ignore) so `--uninstall` restores exactly what was there. With `--watch`
it polls and re-adds the plugin when another component rewrites the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztunnel.cni import DEFAULT_AGENT_SOCKET, PLUGIN_TYPE

log = logging.getLogger("ztunnel.cni")

CONF_SUFFIXES = (".conf", ".conflist", ".json")
BACKUP_SUFFIX = ".ztunnel-backup"


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
    return p


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
    except (OSError, InstallError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
