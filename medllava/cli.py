"""The `medllava` command line: parse, then call one run() function.

Each command group lives beside the code it drives and exposes `register(subparsers)`;
registration must stay cheap (no torch import), so `medllava --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from medllava import __version__

# Modules that expose `register(subparsers)`. Only commands that work are listed here.
COMMAND_MODULES = [
    "medllava.commands",
    "finetune.adapt",
    "medllava.convert",
    "finetune.heads",
    "medllava.chat",
    "medllava.demo",
    "curation.cli",
    "eval.cli",
]


def register_group(subparsers, name: str, modules: list[str], dest: str, help: str, description: str) -> None:
    """A command with subcommands (`medllava curate extract`), each from a module's `register`."""
    parser = subparsers.add_parser(name, help=help, description=description)
    subs = parser.add_subparsers(dest=dest, metavar="SUBCOMMAND", required=True)
    for module in modules:
        importlib.import_module(module).register(subs)


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
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
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
