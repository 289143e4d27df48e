"""`medllava eval ...`: scoring and benchmark runs.

Each subcommand module exposes `register(subparsers)` and keeps heavy imports inside its
run function.
"""

from __future__ import annotations

import importlib

# Subcommand modules with a `register(subparsers)`; one is listed once it works.
SUBCOMMAND_MODULES: list[str] = ["eval.score"]


def register(subparsers) -> None:
    if not SUBCOMMAND_MODULES:
        return
    parser = subparsers.add_parser(
        "eval",
        help="score medical VQA benchmarks",
        description="Score models and prediction files on medical VQA benchmarks.",
    )
    subs = parser.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subs)
