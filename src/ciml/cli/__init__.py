"""The ``ciml`` command: a thin layer over the Python API, one module per subcommand.

Each subcommand module exposes ``register(subparsers)``; it adds its parser and sets ``func`` to a
callable taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ciml import __version__
from ciml.cli.options import FLAGS_KEY
from ciml.errors import CimlError, ParameterError
from ciml.threads import SEVERAL_JOBS_HELP, configure_threads

# Subcommand modules under ciml.cli, in the order `ciml --help` lists them.
SUBCOMMANDS = (
    "demo",
    "shapes",
    "phantom",
    "check_data",
    "train",
    "predict",
    "evaluate",
    "robustness",
    "explain",
    "report",
    "tasks",
)

#: Set to show the traceback of an unexpected error instead of the one-line "internal error".
DEBUG_VARIABLE = "CIML_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ciml",
        description=(
            "CIML: multimodal segmentation with one segmentor per modality exchanging gated, "
            "information-bottlenecked messages. Run `ciml COMMAND --help` for each command."
        ),
        epilog=SEVERAL_JOBS_HELP,
    )
    parser.add_argument("--version", action="version", version=f"ciml {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"ciml.cli.{name}").register(subparsers)
    return parser


def error_message(exc: CimlError, flags: dict[str, str]) -> str:
    """The error in the command's terms: a parameter the command sets is named by its flag."""
    if isinstance(exc, ParameterError):
        spell = lambda name: flags.get(name, name)  # noqa: E731
        return f"{spell(exc.parameter)}: {exc.render(spell)}"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        configure_threads()  # before any torch work: the CPUs this process may use, or OMP_NUM_THREADS
        return int(args.func(args) or 0)
    except CimlError as exc:
        print(
            f"ciml {args.command}: error: {error_message(exc, getattr(args, FLAGS_KEY, {}))}", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        print(f"ciml {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last line of defence: a bug, not the user's input; one line, exit 2
        if os.environ.get(DEBUG_VARIABLE):
            raise
        detail = " ".join(str(exc).split())[:300]
        print(
            f"ciml {args.command}: internal error: {type(exc).__name__}: {detail} "
            f"(run with {DEBUG_VARIABLE}=1 for the traceback)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
