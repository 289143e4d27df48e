"""`medllava eval ...`: scoring and benchmark runs.

Each subcommand module exposes `register(subparsers)` and keeps heavy imports inside its
run function.
"""

from __future__ import annotations

import importlib

# Subcommand modules with a `register(subparsers)`; one is listed once it works.
SUBCOMMAND_MODULES: list[str] = ["eval.score", "eval.run", "eval.judge"]


def register(subparsers) -> None:
    if not SUBCOMMAND_MODULES:
        return
    parser = subparsers.add_parser(
        "eval",
        help="evaluate models on medical VQA benchmarks",
        description="Answer, score and judge medical VQA benchmarks.",
    )
    subs = parser.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subs)
