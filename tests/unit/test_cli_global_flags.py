"""Global flags work before or after the subcommand, as kubectl's and istioctl's do."""

from __future__ import annotations

import logging

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
