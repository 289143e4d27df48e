"""Command-line options shared by the `medllava eval` subcommands that load a benchmark task (`score`, `run`)."""

from __future__ import annotations

import argparse

TASK_OPTION_HELP = "task option, e.g. lang=zh (SLAKE) or source=official (VQA-RAD, PathVQA)"


def task_option(text: str) -> tuple[str, str]:
    """`KEY=VALUE` -> `(KEY, VALUE)`, both stripped; the argparse type of `-o/--option`."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def add_task_options(parser: argparse.ArgumentParser) -> None:
    """`-o/--option KEY=VALUE`, repeatable: keyword arguments for the task loader (`args.option`)."""
    parser.add_argument("-o", "--option", action="append", type=task_option, default=[], metavar="KEY=VALUE",
                        help=TASK_OPTION_HELP)
