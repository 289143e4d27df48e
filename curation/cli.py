"""`medllava curate ...`: one subcommand per curation step.

Each step module exposes `register(subparsers)` and keeps heavy imports inside its run
function, so building the parser stays cheap.
"""

from __future__ import annotations

from medllava.cli import register_group

STEP_MODULES = [
    "curation.extract",
    "curation.classify",
    "curation.dedupe",
    "curation.align",
    "curation.pipeline",
    "curation.instruct",
]


def register(subparsers) -> None:
    register_group(
        subparsers, "curate", STEP_MODULES, dest="curate_step",
        help="build alignment and instruction sets from PMC figure-caption data",
        description="Curate PMC Open Access figure-caption pairs into training sets.",
    )
