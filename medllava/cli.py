"""The `medllava` command line: parse, then call one run() function.

`COMMANDS` below is the whole command line: each entry is a module that adds its command with
`register(subparsers)`, or a `Group` of such modules under one command (`medllava curate extract`).
Nothing imports this module back. Registration must stay cheap (no torch import: each module keeps
heavy imports inside its run function), so `medllava --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from types import ModuleType

from medllava import __version__
from medllava.commands import chat, check, convert, demo
from medllava.curation import align, classify, dedupe, extract, instruct, pipeline, split
from medllava.eval import judge, score
from medllava.eval import run as eval_run
from medllava.finetune import adapt, head_training


@dataclass(frozen=True)
class Group:
    """A command whose subcommands each come from one module's `register`."""

    name: str
    help: str
    description: str
    modules: tuple[ModuleType, ...]


# In `--help` order. Only commands that work are listed here.
COMMANDS: tuple[ModuleType | Group, ...] = (
    check,
    adapt,
    convert,
    head_training,
    chat,
    demo,
    Group("curate", "build alignment and instruction sets from PMC figure-caption data",
          "Curate PMC Open Access figure-caption pairs into training sets.",
          (extract, split, classify, dedupe, align, pipeline, instruct)),
    Group("eval", "evaluate models on medical VQA benchmarks",
          "Answer, score and judge medical VQA benchmarks.",
          (score, eval_run, judge)),
)


def _add_group(subparsers, group: Group) -> None:
    parser = subparsers.add_parser(group.name, help=group.help, description=group.description)
    subs = parser.add_subparsers(dest=f"{group.name}_command", metavar="SUBCOMMAND", required=True)
    for module in group.modules:
        module.register(subs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medllava",
        description="Adapt a general LLaVA vision-language model to biomedicine.",
    )
    parser.add_argument("--version", action="version", version=f"medllava {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The deepspeed launcher passes --local_rank to every process; the rank is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in COMMANDS:
        if isinstance(entry, Group):
            _add_group(subparsers, entry)
        else:
            entry.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, OSError) as e:
        # Input and environment problems get one clear line, not a traceback.
        if args.verbose:
            raise
        from medllava.io import describe_error

        # A full disk or a refused write names the path and what to do, not just the errno.
        print(f"medllava: error: {describe_error(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
