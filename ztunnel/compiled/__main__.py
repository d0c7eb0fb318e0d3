"""`python -m ztunnel.compiled build [--force]` builds the compiled hot modules (cached by digest);
`python -m ztunnel.compiled status` says whether this interpreter would run them. Exit 3: no mypyc or C compiler."""

from __future__ import annotations

import argparse
import sys

from ztunnel.compiled import status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ztunnel.compiled")
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="build the current digest's mypyc build unless it exists; print its path")
    build_cmd.add_argument("--force", action="store_true", help="build even when the digest's build exists")
    sub.add_parser("status", help="print whether the compiled modules would be used, and why not")
    args = parser.parse_args(argv)
    if args.command == "status":
        print(status())
        return 0
    from ztunnel.compiled.build import BuildUnavailable, build

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        path = build(log, force=args.force)
    except BuildUnavailable as e:
        log(f"compiled: cannot build here ({e}); the project runs as pure Python")
        return 3
    except RuntimeError as e:
        log(f"compiled: {e}")
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
