"""`medllava curate align`: figure records to the stage-1 (alignment) set, one turn per figure.

As in LLaVA-Med's alignment data, each figure gets one describe-the-image instruction and the
caption as the answer. The instruction is drawn from a concise or a detailed pool; with
`--style mixed` the pool follows the caption length (short captions get concise requests),
so the model is not taught to pad a one-line caption into a "detailed" answer. The draw is
keyed on (seed, record id), so a record gets the same instruction in every run and in any order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from medllava.io import write_jsonl

from medllava.curation.common import StepReport, clear_stale_temps, iter_figure_records

CONCISE = (
    "Describe the image concisely.",
    "Give a short description of this image.",
    "Summarize what the figure shows in a sentence or two.",
    "What does this image show? Answer briefly.",
    "Write a brief caption for this image.",
    "In a few words, what is shown here?",
    "Provide a compact summary of the image.",
    "State briefly what this medical image depicts.",
    "Offer a one-line description of the figure.",
    "Briefly describe the main content of this image.",
)
DETAILED = (
    "Describe the image in detail.",
    "Give a thorough description of this image.",
    "Explain what this figure shows, covering its main findings.",
    "Provide a detailed account of the contents of this image.",
    "Walk through what can be seen in this image.",
    "Describe this medical image as fully as you can.",
    "What does this figure show? Describe it in detail.",
    "Write a detailed caption for this image.",
    "Analyse the image and describe its key features.",
    "Report the findings visible in this image in detail.",
)
STYLES = ("concise", "detailed", "mixed")
# Captions shorter than this many words count as concise answers under --style mixed.
MIXED_WORDS = 30


def draw(seed: int, record_id: str, pool: tuple[str, ...]) -> str:
    """A pool entry chosen by hashing (seed, id): stable across runs, machines and input order."""
    digest = hashlib.blake2b(f"{seed}\0{record_id}".encode(), digest_size=8).digest()
    return pool[int.from_bytes(digest, "big") % len(pool)]


def pool_for(caption: str, style: str) -> tuple[str, ...]:
    if style == "concise":
        return CONCISE
    if style == "detailed":
        return DETAILED
    return CONCISE if len(caption.split()) < MIXED_WORDS else DETAILED


def alignment_record(record: dict, seed: int, style: str) -> dict:
    """One conversation record: the instruction (after `<image>`) and the caption as the answer."""
    caption = record["caption"].strip()
    instruction = draw(seed, str(record["id"]), pool_for(caption, style))
    return {
        "id": str(record["id"]),
        "image": record["image"],
        "conversations": [
            {"from": "human", "value": f"<image>\n{instruction}"},
            {"from": "gpt", "value": caption},
        ],
    }


def alignment_records(records, seed: int, style: str, report: StepReport) -> Iterator[dict]:
    for record in records:
        caption = record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            report.skip("empty caption")
            continue
        if not record.get("image"):
            report.skip("no image")
            continue
        yield alignment_record(record, seed, style)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "align", help="figure records to the stage-1 alignment set (LLaVA conversation JSONL)",
        description="Turn figure records into one-turn conversations: a describe-the-image instruction "
                    "answered by the caption.")
    p.add_argument("--in", dest="inp", type=Path, required=True, metavar="FILE", help="figure records (JSONL)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="conversation records (JSONL)")
    p.add_argument("--seed", type=int, default=0, help="seed of the instruction draw (default 0)")
    p.add_argument("--style", choices=STYLES, default="mixed",
                   help=f"instruction pool; mixed picks concise below {MIXED_WORDS} caption words (default)")
    p.set_defaults(func=run)


def run(args) -> int:
    clear_stale_temps([args.out])
    report = StepReport("align")
    records = iter_figure_records(args.inp, report)
    report.written = write_jsonl(args.out, alignment_records(records, args.seed, args.style, report))
    print(report.summary())
    return 0
