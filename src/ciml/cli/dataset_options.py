"""Options of every command that reads a dataset: which task spec, layout, and channel is which."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from ciml.data.layouts import FROM_DATASET, LAYOUTS, ChannelMappingError
from ciml.errors import CimlError

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


def add_dataset_arguments(parser: argparse.ArgumentParser, *, task: bool = True) -> None:
    """``--task`` (optional), ``--layout`` and ``--channels``."""
    if task:
        parser.add_argument("--task", default=None, help=TASK_HELP)
    parser.add_argument(
        "--layout",
        default="auto",
        choices=("auto", *LAYOUTS),
        help="dataset layout; default: auto (detected from the file names; see README 'Your data')",
    )
    parser.add_argument("--channels", default=None, metavar="MODALITY=ID,...", help=CHANNELS_HELP)


def parse_channels(text: str | None) -> dict[str, int] | None:
    """``ct=0,pet=1`` -> {"ct": 0, "pet": 1}."""
    if text is None:
        return None
    out: dict[str, int] = {}
    for item in text.split(","):
        modality, sep, channel = item.strip().partition("=")
        if not sep or not modality or not channel.strip().isdigit():
            raise CimlError(f"--channels: expected MODALITY=ID[,MODALITY=ID...], got {item.strip()!r}")
        if modality in out:
            raise CimlError(f"--channels: modality {modality!r} given twice")
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
