"""`ciml tasks`: list the shipped task specs or show/validate one (preset name or YAML file)."""

from __future__ import annotations

import argparse

import yaml

from ciml.tasks import load_task, preset_names


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tasks",
        help="list task presets, or validate and show one",
        description=(
            "Without TASK, list the presets that ship with ciml. With TASK (a preset name or a path to "
            "your own YAML spec), validate it and print it with the owners of every region."
        ),
    )
    parser.add_argument("task", nargs="?", help="preset name or YAML file to validate and show")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.task:
        for name in preset_names():
            spec = load_task(name)
            print(f"{name:20s} modalities: {', '.join(spec.modalities)}; regions: {', '.join(spec.regions)}")
        return 0
    spec = load_task(args.task)
    print(yaml.safe_dump(spec.to_dict(), sort_keys=False).rstrip())
    print("# owners (as comments, so that `ciml tasks NAME > my.yaml` is a spec to edit):")
    for region in spec.regions:
        print(f"#   {region}: {', '.join(spec.owners(region))}")
    return 0
