"""`medllava check`.

`check` reads a conversation dataset the way training will (schema, images, template, tokenizer,
max length), runs the model forward over it, and reports what a long run would skip and why,
before any GPU hour is spent, with the image-token budget per example (fixed per image in LLaVA-1.5,
by each image's shape in a grid family such as LLaVA-NeXT).
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medllava.families import FAMILIES
from medllava.templates import DEFAULT_TEMPLATE, TEMPLATES
from medllava.tiny import TINY_SPECS, demo_data


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "check",
        help="check a conversation dataset against a model: schema, images, tokens, forward loss",
        description=(
            "Read a LLaVA-format conversation file (JSON array or JSONL) as training would: validate every "
            "record, load every image, render and tokenise with the model's template, run the model forward, "
            "and report token lengths, the loss, and what would be skipped and why. Without --data it checks "
            "the embedded demo set against the tiny random model."
        ),
    )
    p.add_argument("--data", type=Path, help="conversation file (default: the embedded demo set)")
    p.add_argument("--image-root", type=Path, help="folder that image paths are relative to")
    p.add_argument("--model", default="tiny",
                   help=f"checkpoint folder of a supported family ({', '.join(FAMILIES)}) or a named model "
                        f"({', '.join(TINY_SPECS)})")
    p.add_argument("--grid", metavar="HxW,...",
                   help="LLaVA-1.5-HD: tile a llava model's images on these grids, height x width in pixels (e.g."
                        " 336x672,672x336,672x672), as model.grid_pinpoints does in training")
    p.add_argument("--template", choices=TEMPLATES,
                   help=f"conversation template (default: the model family's, {DEFAULT_TEMPLATE} for llava)")
    p.add_argument("--max-length", type=int, default=2048, help="token limit per example (default 2048)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per forward pass (default 4)")
    p.add_argument("--limit", type=int, help="check only the first N records")
    p.add_argument("--report", type=Path, help="also write the report as JSON here")
    p.set_defaults(func=run_check)


@dataclass
class _Tally:
    """What checking the examples found: token counts, skips and summed losses."""

    lengths: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    image_tokens: list[int] = field(default_factory=list)
    """Image tokens per usable example: all its images' tokens (by each image's shape in a grid family)."""
    losses: list[tuple[float, int]] = field(default_factory=list)
    """(loss x supervised tokens, supervised tokens) per forward pass."""
    skipped: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


def run_check(args: argparse.Namespace) -> int:
    """Read, encode and run the model over the data as training would; print (and write) the report."""
    import itertools

    from medllava.data import Collator, Encoder
    from medllava.families import model_family
    from medllava.hd import parse_grid
    from medllava.io import atomic_write_json
    from medllava.model import ModelConfig, build_model
    from medllava.records import ReadReport, iter_records

    data, image_root = _data_and_root(args.data, args.image_root)
    grid = parse_grid(args.grid) if args.grid else []
    model, processor = build_model(ModelConfig(name_or_path=args.model, grid_pinpoints=grid))
    template = args.template or model_family(model).default_template
    encoder = Encoder(processor, template=template, image_root=image_root, max_length=args.max_length)
    collator = Collator(pad_token_id=processor.tokenizer.pad_token_id)
    read = ReadReport()
    records = itertools.islice(iter_records(data, skip_bad=True, report=read), args.limit)
    tally = _check_examples(records, encoder, lambda feats, tally: _forward(model, collator, feats, tally),
                            args.batch_size)
    report = _report(args, data, read, tally, template, _image_budget(processor, tally.image_tokens))
    _print_report(report)
    if args.report:
        atomic_write_json(args.report, report)
        print(f"report written to {args.report}")
    return 0 if tally.lengths else 1


def _data_and_root(data: Path | None, image_root: Path | None) -> tuple[Path, Path]:
    """The conversation file (default: the demo set) and the folder its image paths are relative to."""
    if data is None:
        data, default_root = demo_data()
        image_root = image_root or default_root
    return data, image_root or data.parent


def _check_examples(records, encoder, forward, batch_size: int) -> _Tally:
    """Encode every record, counting those that cannot be used, and pass batches of `batch_size` usable
    examples (with the skip markers between them) to `forward(features, tally)`."""
    from tqdm import tqdm

    from medllava.data import SkipExample

    processor = encoder.processor
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    tally, pending = _Tally(), []
    for record in tqdm(records, desc="checking", unit="rec", disable=None):
        try:
            enc = encoder(record)
        except SkipExample as e:
            pending.append({"skip": e.reason, "detail": e.detail})
            continue
        tally.lengths.append(len(enc["input_ids"]))
        tally.image_tokens.append(sum(i == image_id for i in enc["input_ids"]))
        tally.targets.append(sum(lab != -100 for lab in enc["labels"]))
        pending.append(enc)
        if sum("skip" not in f for f in pending) >= batch_size:
            forward(pending, tally)
            pending = []
    if pending:
        forward(pending, tally)
    return tally


def _forward(model, collator, features: list[dict], tally: _Tally) -> None:
    """Collate one batch (counting the skipped examples in it) and add its summed loss to `tally`."""
    import torch

    batch = collator(features)
    batch.pop("example_ids")
    for reason, detail in batch.pop("skipped"):
        tally.skipped[reason] += 1
        tally.problems.append(f"{reason}: {detail}")
    if batch["input_ids"].numel() == 0:
        return
    with torch.no_grad():
        out = model(**batch)
    n = int((batch["labels"][:, 1:] != -100).sum())
    tally.losses.append((float(out.loss) * n, n))


def _image_budget(processor, per_example: list[int]) -> dict:
    """The report's "image_tokens": min / median / max image tokens per usable example, and what one
    image takes: a fixed count, or in a grid family (LLaVA-NeXT) a count that depends on the image's
    shape, with the most one image can take (`medllava.families.max_image_tokens`)."""
    import statistics

    from medllava.families import max_image_tokens, processor_family

    fixed = processor_family(processor).fixed_image_tokens
    most = max_image_tokens(processor)
    return {
        "min": min(per_example, default=0),
        "median": statistics.median(per_example) if per_example else 0,
        "max": max(per_example, default=0),
        "depends_on_image_shape": not fixed,
        "max_per_image": most,
    }


def _report(args: argparse.Namespace, data: Path, read, tally: _Tally, template: str, image_tokens: dict) -> dict:
    """The check's findings as the JSON report."""
    import math
    import statistics

    tokens = sum(n for _, n in tally.losses)
    mean_loss = sum(l for l, _ in tally.losses) / tokens if tokens else float("nan")
    lengths = tally.lengths
    return {
        "data": str(data),
        "model": args.model,
        "template": template,
        "records_read": read.read,
        "records_invalid": len(read.skipped),
        "examples_ok": len(lengths),
        "examples_skipped": dict(tally.skipped),
        "first_problems": (read.skipped + tally.problems)[:10],
        "tokens": {
            "min": min(lengths, default=0),
            "median": statistics.median(lengths) if lengths else 0,
            "max": max(lengths, default=0),
            "supervised_total": sum(tally.targets),
        },
        "image_tokens": image_tokens,
        "loss": mean_loss,
        "perplexity": math.exp(mean_loss) if tokens and mean_loss < 50 else None,
    }


def _print_report(r: dict) -> None:
    t = r["tokens"]
    skipped = ", ".join(f"{k}: {v}" for k, v in r["examples_skipped"].items()) or "none"
    print(f"data      {r['data']}")
    print(f"model     {r['model']} (template {r['template']})")
    print(f"records   {r['records_read']} read, {r['records_invalid']} invalid, {r['examples_ok']} usable")
    print(f"skipped   {skipped}")
    print(f"tokens    min {t['min']}, median {t['median']}, max {t['max']}; {t['supervised_total']} supervised")
    print(f"images    {_image_line(r['image_tokens'])}")
    print(f"loss      {r['loss']:.4f} per supervised token")
    for problem in r["first_problems"]:
        print(f"  problem: {problem}")


def _image_line(i: dict) -> str:
    """The printed image-token budget: per example, then what one image takes."""
    each = (f"per image by its shape, at most {i['max_per_image']}" if i["depends_on_image_shape"]
            else f"{i['max_per_image']} per image (fixed)")
    return f"min {i['min']}, median {i['median']}, max {i['max']} image tokens per example; {each}"
