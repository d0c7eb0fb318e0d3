"""bench/policy_bench.py keeps working (tiny sizes; timings are never asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent.parent / "bench" / "policy_bench.py"


def test_policy_bench_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("policy_bench", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--sizes", "20,40", "--layouts", "spread,one-namespace", "--decisions", "50"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["benchmark"] == "policy_decision_l4" and len(out["results"]) == 4
    for r in out["results"]:
        assert r["median_us"] > 0 and 0 <= r["allowed_fraction"] <= 1
    assert "median" in out["summary"]


def test_policy_bench_l7_mode(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("policy_bench", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--mode", "l7", "--sizes", "20", "--layouts", "spread", "--decisions", "200"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["benchmark"] == "policy_decision_l7" and out["results"][0]["mode"] == "l7"
    assert 0 < out["results"][0]["allowed_fraction"] < 1  # the requests exercise both outcomes
    assert "per L7 decision" in out["summary"]
