"""`medllava curate ...`: one subcommand per curation step.

Each step module exposes `register(subparsers)` and keeps heavy imports inside its run
function, so building the parser stays cheap.
"""

from __future__ import annotations

import importlib

# Step modules with a `register(subparsers)`; a step is listed once it works.
STEP_MODULES: list[str] = [
    "curation.extract",
    "curation.classify",
    "curation.dedupe",
    "curation.align",
    "curation.pipeline",
    "curation.instruct",
]


def register(subparsers) -> None:
    if not STEP_MODULES:
        return
    parser = subparsers.add_parser(
        "curate",
        help="build alignment and instruction sets from PMC figure-caption data",
        description="Curate PMC Open Access figure-caption pairs into training sets.",
    )
    steps = parser.add_subparsers(dest="curate_step", metavar="STEP", required=True)
    for name in STEP_MODULES:
        importlib.import_module(name).register(steps)
