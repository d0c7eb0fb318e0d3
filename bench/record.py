"""Where a run's result goes: `<date>.json` (every sample, the summary, ratios, target checks, tool versions)
and `<date>.md` (the table, also copied to `latest.md` or `latest-quick.md`)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from bench import report
from bench.scaling import render_worker_scaling


def render(result: dict[str, Any]) -> str:
    """The Markdown of a result: the main table, then the worker scaling figure if measured."""
    return report.render_markdown(result) + render_worker_scaling(result)


def write_results(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d-%H%M%S")
    suffix = "-quick" if result["meta"]["quick"] else ""
    json_path = out_dir / f"{stamp}{suffix}.json"
    md_path = out_dir / f"{stamp}{suffix}.md"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    table = render(result)
    md_path.write_text(table)
    (out_dir / ("latest-quick.md" if suffix else "latest.md")).write_text(table)
    return json_path, md_path
