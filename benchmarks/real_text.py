"""The real text behind the training benchmarks' examples: their token lengths and turn structure.

Stage 1 (align) trains on figure captions: the real captions shipped with the project, i.e. the figures of
the PMC Open Access articles in `medllava/assets/demo/pmc` (read by curation's JATS extractor) and the
LLaVA-Med figure captions in `tests/assets/curation/modality_labelled.jsonl` (real PMC captions, five
modalities). Stage 2 (instruct) trains on the teacher-written multi-turn conversations of
`medllava/assets/demo/teacher_conversations.jsonl`. `--lengths-from FILE` (a conversation file) replaces
either: its records with one image, stage 1 taking each record's first round.

The shipped sets are small (14 captions; 2 conversations of 5 rounds in all), so examples are drawn from
them with replacement, and the printed header says so. Captions are drawn whole. A stage-2 example is a
conversation built from rounds (a question and its answer) drawn with replacement from every round of the
real conversations, as many rounds as a real conversation drawn at random has; its image placeholder
leads the first question, as in the real records. A file's records are drawn whole.

`encode_examples` turns drawn records into training examples with medllava's template code, as training
data is encoded, so their labels supervise the replies only.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from medllava.io import DataError
from medllava.templates import TooLongError, encode_conversation

REPO = Path(__file__).resolve().parent.parent
PMC_ARTICLES = REPO / "medllava" / "assets" / "demo" / "pmc"
LABELLED_CAPTIONS = REPO / "tests" / "assets" / "curation" / "modality_labelled.jsonl"
TEACHER_CONVERSATIONS = REPO / "medllava" / "assets" / "demo" / "teacher_conversations.jsonl"
IMAGE = "<image>"


@dataclass
class TextSource:
    """Where a stage's text comes from, and how an example is drawn from it."""

    description: str
    records: list[dict]
    """Real records in the LLaVA conversation format, each with `conversations`."""

    by_round: bool = False
    """Build each example from rounds drawn across records, instead of drawing whole records."""

    def draw(self, n: int, seed: int = 0) -> list[dict]:
        """`n` records drawn with replacement (seeded): the conversations of the benchmark's examples."""
        rng = random.Random(seed)
        if not self.by_round:
            return [rng.choice(self.records) for _ in range(n)]
        rounds = [r for rec in self.records for r in _rounds(rec["conversations"])]
        counts = [len(_rounds(rec["conversations"])) for rec in self.records]
        drawn = []
        for i in range(n):
            picked = [rng.choice(rounds) for _ in range(rng.choice(counts))]
            turns = [dict(t, value=t["value"].replace(IMAGE, "").strip()) for r in picked for t in r]
            turns[0]["value"] = f"{IMAGE}\n{turns[0]['value']}"
            drawn.append({"id": f"drawn_{i}", "conversations": turns})
        return drawn


def _rounds(turns: list[dict]) -> list[list[dict]]:
    return [turns[i:i + 2] for i in range(0, len(turns) - 1, 2)]


def caption_source() -> TextSource:
    """Stage 1: every real caption shipped, each as an image + caption record; duplicates (by figure id) once."""
    from medllava.curation.common import StepReport
    from medllava.curation.extract import jats_records
    from medllava.io import read_jsonl

    captions = {rec["id"]: rec["caption"] for rec in jats_records([str(PMC_ARTICLES)], None, StepReport("extract"))}
    from_articles = len(captions)
    for _, rec in read_jsonl(LABELLED_CAPTIONS):
        captions.setdefault(rec["id"], rec["caption"])
    records = [{"id": key, "conversations": [{"from": "human", "value": IMAGE}, {"from": "gpt", "value": text}]}
               for key, text in captions.items() if text.strip()]
    return TextSource(
        f"{len(records)} real PMC figure captions ({from_articles} from the JATS articles in"
        f" {PMC_ARTICLES.relative_to(REPO)}, {len(records) - from_articles} LLaVA-Med figure captions from"
        f" {LABELLED_CAPTIONS.relative_to(REPO)}), drawn with replacement", records)


def conversation_source() -> TextSource:
    """Stage 2: the shipped teacher-written conversations, resampled round by round."""
    records, _ = conversation_records(TEACHER_CONVERSATIONS)
    n_rounds = sum(len(_rounds(r["conversations"])) for r in records)
    return TextSource(
        f"{len(records)} teacher-written conversations ({n_rounds} rounds) from"
        f" {TEACHER_CONVERSATIONS.relative_to(REPO)}, each example built from rounds drawn with replacement",
        records, by_round=True)


def file_source(path: Path, stage: str) -> TextSource:
    """A conversation file's records with one image, drawn whole with replacement; stage 1 keeps each record's
    first round. Invalid records and records without exactly one image are left out and counted."""
    records, invalid = conversation_records(path)
    if stage == "align":
        records = [dict(r, conversations=r["conversations"][:2]) for r in records]
    one_image = [r for r in records if sum(t["value"].count(IMAGE) for t in r["conversations"]) == 1]
    if not one_image:
        raise DataError(f"{path}: no record with exactly one {IMAGE}{' in its first round' if stage == 'align' else ''}")
    left_out = [f"{len(invalid)} invalid (first: {invalid[0]})"] if invalid else []
    if len(one_image) < len(records):
        left_out.append(f"{len(records) - len(one_image)} without exactly one image")
    note = f" ({'; '.join(left_out)} left out)" if left_out else ""
    return TextSource(f"{len(one_image)} records of {path}{note}, drawn with replacement", one_image)


def conversation_records(path: Path) -> tuple[list[dict], list[str]]:
    """The valid records of a conversation file (JSON array or JSONL) and what was wrong with each invalid
    one; a file without a single valid record is an error naming it."""
    from medllava.records import ReadReport, iter_records

    report = ReadReport()
    records = list(iter_records(path, skip_bad=True, report=report))
    if not records:
        raise DataError(f"{path}: no valid conversation records ({report.read} read)")
    return records, report.skipped


def source_for(stage: str, lengths_from: Path | None) -> TextSource:
    if lengths_from is not None:
        return file_source(lengths_from, stage)
    return caption_source() if stage == "align" else conversation_source()


def spread(values: list[int]) -> dict:
    """min / median / max of a list of lengths."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def describe(numbers: dict) -> str:
    return f"{numbers['min']}/{numbers['median']:g}/{numbers['max']}"


def encode_examples(records, processor, template, n_image_tokens, image_token_index, pixels, max_length):
    """Encode conversations as medllava's training data does; each example's image is random pixels shaped
    as `pixels` (one image's processor outputs: `pixel_values` `(1, 3, S, S)`, or a grid family's
    `(1, tiles, 3, S, S)` with its `image_sizes`, copied); none when `pixels` is None (lengths only).

    Longer records are cut at `max_length` as training cuts them; returns the examples and how many records
    were left out because the cut would take their image or first reply.
    """
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    examples, too_long = [], 0
    for i, rec in enumerate(records):
        try:
            enc = encode_conversation(rec["conversations"], processor, template, n_image_tokens, max_length=max_length)
        except TooLongError:
            too_long += 1
            continue
        # The processor's image token may have another id than the model's (the llava-7b shape).
        ids = [image_token_index if t == image_id else t for t in enc["input_ids"]]
        examples.append({"id": str(i), "input_ids": ids, "attention_mask": enc["attention_mask"],
                         "labels": enc["labels"], "image_keys": [f"random/{i}.png"]})
        if pixels is not None:
            examples[-1].update({key: torch.randn(value.shape) if value.is_floating_point() else value.clone()
                                 for key, value in pixels.items()})
    return examples, too_long
