"""Options every command shares, declared once, and the one map from API parameters to flags.

An option's ``dest`` is the name of the API parameter it sets, so an API error that names a parameter
(:class:`~ciml.errors.ParameterError`) is shown under the flag the user typed: ``patch_size`` is
reported as ``--patch``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator

from ciml.data.layouts import FROM_DATASET, LAYOUTS, ChannelMappingError
from ciml.devices import MEMORY_FORMATS
from ciml.errors import CimlError

FLAGS_KEY = "flags"
TASK_HELP = (
    "task preset (e.g. brats2020, brats2023, brats2024, msd_braintumour, autopet, hecktor2022; `ciml tasks` "
    f"lists them) or a task spec YAML file. Leave it out (or pass {FROM_DATASET}) for an nnU-Net dataset: "
    "the spec is then built from its dataset.json (channel_names as modalities, labels and region lists as "
    "regions, regions_class_order as the painting order; every modality owns every region)"
)
CHANNELS_HELP = (
    "which channel id of an nnU-Net or MSD dataset is which modality of the task, e.g. ct=0,pet=1. Needed "
    "only when dataset.json's channel names do not say it (nnU-Net's autoPET conversion names both channels "
    "CT); channels are never matched by position"
)


def add_task(parser: argparse.ArgumentParser, required: bool = False, **kwargs) -> None:
    """``--task``: a preset name or a task spec YAML file (optional where a dataset.json can say it)."""
    kwargs.setdefault("help", TASK_HELP)
    kwargs.setdefault("default", None)
    parser.add_argument("--task", required=required, **kwargs)


def add_dataset_arguments(
    parser: argparse.ArgumentParser, *, task: bool = True, what: str = "the dataset"
) -> None:
    """``--task`` (optional), ``--layout`` and ``--channels``: how a dataset is read."""
    if task:
        add_task(parser)
    parser.add_argument(
        "--layout",
        default="auto",
        choices=("auto", *LAYOUTS),
        help=f"layout of {what}; default: auto (detected from the file names; see README 'Your data')",
    )
    parser.add_argument(
        "--channels", type=parse_channels, default=None, metavar="MODALITY=ID,...", help=CHANNELS_HELP
    )


def parse_channels(text: str) -> dict[str, int]:
    """``ct=0,pet=1`` -> {"ct": 0, "pet": 1}."""
    out: dict[str, int] = {}
    for item in text.split(","):
        modality, sep, channel = item.strip().partition("=")
        if not sep or not modality or not channel.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected MODALITY=ID[,MODALITY=ID...], got {item.strip()!r}")
        if modality in out:
            raise argparse.ArgumentTypeError(f"modality {modality!r} given twice")
        out[modality] = int(channel)
    return out


@contextlib.contextmanager
def channel_flags() -> Iterator[None]:
    """Say ``--channels`` where the library says ``channels=``."""
    try:
        yield
    except ChannelMappingError as exc:
        reason = exc.reason.split("; say which channel id", 1)[0]
        form = ",".join(f"{m}=ID" for m in exc.modalities)
        raise CimlError(
            f"{exc.path}: {reason}; say which channel id is which modality: --channels {form}"
        ) from None


def add_device(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--device``: where networks run."""
    parser.add_argument(
        "--device",
        default=default,
        help=f"where to run: auto (CUDA with bf16 autocast when available, else CPU), cpu, cuda or cuda:N "
        f"(default: {default})",
    )


def add_memory_format(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--memory-format``: the tensor layout networks run in."""
    parser.add_argument(
        "--memory-format",
        choices=MEMORY_FORMATS,
        default=default,
        help="tensor layout of the networks: auto is channels_last for 3D networks on a CPU (grouped 3D "
        "convolutions run several times faster in it) and contiguous on a GPU; only float rounding changes",
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


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None (the help then says what happens without the option)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


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
