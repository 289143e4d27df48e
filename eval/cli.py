"""`medllava eval ...`: answer, score and judge medical VQA benchmarks.

Each subcommand module exposes `register(subparsers)` and keeps heavy imports inside its
run function.
"""

from __future__ import annotations

from medllava.cli import register_group

SUBCOMMAND_MODULES = ["eval.score", "eval.run", "eval.judge"]


def register(subparsers) -> None:
    register_group(
        subparsers, "eval", SUBCOMMAND_MODULES, dest="eval_command",
        help="evaluate models on medical VQA benchmarks",
        description="Answer, score and judge medical VQA benchmarks.",
    )
