"""Every command's --help: each option explained, no meaningless "(default: None)"."""

from __future__ import annotations

import argparse

import pytest

from ciml.cli import SUBCOMMANDS, build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", [c.replace("_", "-") for c in SUBCOMMANDS])
def test_help_explains_every_option_without_none_defaults(command) -> None:
    parser = _subparsers()[command]
    text = parser.format_help()
    assert "(default: None)" not in text
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS:
            assert action.help, f"{command} {action.option_strings[0]} has no help"
