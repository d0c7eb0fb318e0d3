"""bench/config_load.py keeps working (a tiny file; timings are never asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent.parent / "bench" / "config_load.py"


def test_config_bench_prints_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("config_load", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--sizes", "0.05", "--yaml", "libyaml,pure", "--output", str(tmp_path / "out.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads((tmp_path / "out.json").read_text())
    assert out["benchmark"] == "config_load" and [r["yaml"] for r in out["results"]] == ["libyaml", "pure"]
    for r in out["results"]:
        assert r["workloads"] == r["pods"] > 0 and r["peak_rss_mb"] > 0 and r["load_s"] >= r["parse_s"]
