"""Global flags work before or after the subcommand, as kubectl's and istioctl's do."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztunnel.cli import hoist_global_flags, main


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["version"], ["version"]),
        (["--log-level", "debug", "version"], ["--log-level", "debug", "version"]),
        (["ca", "init", "--log-level", "debug", "--dir", "d"], ["--log-level", "debug", "ca", "init", "--dir", "d"]),
        (["ca", "init", "--log-format=json"], ["--log-format=json", "ca", "init"]),
        (["lab", "exec", "--", "sh", "--log-level", "x"], ["lab", "exec", "--", "sh", "--log-level", "x"]),
        (["version", "--log-level"], ["--log-level", "version"]),  # argparse then reports the missing value
    ],
)
def test_global_flags_move_to_the_front(argv: list[str], expected: list[str]) -> None:
    assert hoist_global_flags(argv) == expected


def test_a_global_flag_after_the_subcommand_takes_effect(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        assert main(["version", "--log-level", "error"]) == 0
        assert root.level == logging.ERROR
        assert capsys.readouterr().out.strip()  # the version was printed
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        yield
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        logging.captureWarnings(False)


def _json_lines(text: str) -> list[dict[str, object]]:
    lines = text.splitlines()
    assert lines, "nothing was written"
    return [json.loads(line) for line in lines]  # every line, or this raises


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--log-format", "json", "proxy", "--workers", "zz"], "invalid int value: 'zz'"),  # argparse's error
        (["proxy", "--log-format=json", "--node"], "expected one argument"),
        (["--log-format", "json", "no-such-command"], "invalid choice"),
    ],
)
def test_a_bad_command_line_is_one_json_event(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    (event,) = _json_lines(capsys.readouterr().err)
    assert event["level"] == "error" and words in str(event["msg"]) and "usage: ztunnel" in str(event["usage"])


def test_a_fatal_error_is_a_json_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    missing = tmp_path / "no-ca"
    argv = ["ca", "issue", "--dir", str(missing), "--id", "spiffe://cluster.local/ns/a/sa/b", "--log-format", "json"]
    assert main([*argv, "--cert-out", str(tmp_path / "c"), "--key-out", str(tmp_path / "k")]) == 2
    (event,) = _json_lines(capsys.readouterr().err)
    assert event["level"] == "error" and str(missing) in str(event["msg"]) and event["exit_code"] == 2


def test_text_format_keeps_argparse_and_error_lines(capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    with pytest.raises(SystemExit):
        main(["proxy", "--workers", "zz"])
    assert "ztunnel proxy: error: argument --workers" in capsys.readouterr().err
