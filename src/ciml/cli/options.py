"""Options every command shares, declared once, and the one map from API parameters to flags.

An option's ``dest`` is the name of the API parameter it sets, so an API error that names a parameter
(:class:`~ciml.errors.ParameterError`) is shown under the flag the user typed: ``patch_size`` is
reported as ``--patch``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

FLAGS_KEY = "flags"


def add_task(parser: argparse.ArgumentParser, required: bool = True, **kwargs) -> None:
    """``--task``: a preset name or a task spec YAML file."""
    kwargs.setdefault("help", "task preset name (see `ciml tasks`, e.g. brats2020) or task spec YAML file")
    parser.add_argument("--task", required=required, **kwargs)


def add_device(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--device``: where networks run."""
    parser.add_argument(
        "--device",
        default=default,
        help=f"where to run: auto (CUDA with bf16 autocast when available, else CPU), cpu, cuda or cuda:N "
        f"(default: {default})",
    )


def add_overwrite(
    parser: argparse.ArgumentParser, what: str = "existing outputs", help: str | None = None
) -> None:
    """``--overwrite``: replace results instead of refusing before any work."""
    parser.add_argument("--overwrite", action="store_true", help=help or f"replace {what} (default: refuse)")


def add_progress(parser: argparse.ArgumentParser, *aliases: str) -> None:
    """``--no-progress``: hide progress bars and per-item times (logs stay quiet in batch jobs)."""
    parser.add_argument(
        "--no-progress",
        *aliases,
        dest="progress",
        action="store_false",
        help="hide progress bars and per-item times",
    )


def add_common(
    parser: argparse.ArgumentParser,
    *,
    device: str | None = None,
    overwrite: str | None = None,
) -> None:
    """``--no-progress`` for every command, ``--device`` and ``--overwrite`` where they apply."""
    if device is not None:
        add_device(parser, device)
    if overwrite is not None:
        add_overwrite(parser, overwrite)
    add_progress(parser)


def finish(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int]) -> None:
    """Attach the command's function and its parameter -> flag map (read by :func:`ciml.cli.main`)."""
    flags = {
        action.dest: next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        for action in parser._actions
        if action.option_strings and action.dest != "help"
    }
    parser.set_defaults(func=run, **{FLAGS_KEY: flags})


def optional_tuple(values: list | None) -> tuple | None:
    """argparse's ``nargs`` list as the tuple settings take (None stays None)."""
    return None if values is None else tuple(values)
