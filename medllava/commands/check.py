"""`medllava check`.

`check` reads a conversation dataset the way training will (schema, images, template, tokenizer,
max length), runs the model forward over it, and reports what a long run would skip and why,
before any GPU hour is spent.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medllava.templates import DEFAULT_TEMPLATE, TEMPLATES
from medllava.tiny import demo_data


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
    p.add_argument("--model", default="tiny", help="llava-hf checkpoint folder or a named model (tiny, small)")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, choices=TEMPLATES,
                   help=f"conversation template (default {DEFAULT_TEMPLATE})")
    p.add_argument("--max-length", type=int, default=2048, help="token limit per example (default 2048)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per forward pass (default 4)")
    p.add_argument("--limit", type=int, help="check only the first N records")
    p.add_argument("--report", type=Path, help="also write the report as JSON here")
    p.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    import itertools
    from collections import Counter
    import math
    import statistics

    import torch
    from tqdm import tqdm

    from medllava.data import Collator, Encoder, SkipExample
    from medllava.io import atomic_write_json
    from medllava.model import ModelConfig, build_model
    from medllava.records import ReadReport, iter_records

    data, image_root = args.data, args.image_root
    if data is None:
        data, default_root = demo_data()
        image_root = image_root or default_root
    image_root = image_root or data.parent
    model, processor = build_model(ModelConfig(name_or_path=args.model))
    encoder = Encoder(processor, template=args.template, image_root=image_root, max_length=args.max_length)
    collator = Collator(pad_token_id=processor.tokenizer.pad_token_id)
    read = ReadReport()
    records = itertools.islice(iter_records(data, skip_bad=True, report=read), args.limit)

    lengths, targets, losses, pending = [], [], [], []

    skipped = Counter()
    problems: list[str] = []

    def forward(batch_feats):
        batch = collator(batch_feats)
        batch.pop("example_ids")
        for reason, detail in batch.pop("skipped"):
            skipped[reason] += 1
            problems.append(f"{reason}: {detail}")
        if batch["input_ids"].numel() == 0:
            return
        with torch.no_grad():
            out = model(**batch)
        n = int((batch["labels"][:, 1:] != -100).sum())
        losses.append((float(out.loss) * n, n))

    for record in tqdm(records, desc="checking", unit="rec", disable=None):
        try:
            enc = encoder(record)
        except SkipExample as e:
            pending.append({"skip": e.reason, "detail": e.detail})
            continue
        lengths.append(len(enc["input_ids"]))
        targets.append(sum(lab != -100 for lab in enc["labels"]))
        pending.append(enc)
        if sum("skip" not in f for f in pending) >= args.batch_size:
            forward(pending)
            pending = []
    if pending:
        forward(pending)

    tokens = sum(n for _, n in losses)
    mean_loss = sum(l for l, _ in losses) / tokens if tokens else float("nan")
    report = {
        "data": str(data),
        "model": args.model,
        "template": args.template,
        "records_read": read.read,
        "records_invalid": len(read.skipped),
        "examples_ok": len(lengths),
        "examples_skipped": dict(skipped),
        "first_problems": (read.skipped + problems)[:10],
        "tokens": {
            "min": min(lengths, default=0),
            "median": statistics.median(lengths) if lengths else 0,
            "max": max(lengths, default=0),
            "supervised_total": sum(targets),
        },
        "loss": mean_loss,
        "perplexity": math.exp(mean_loss) if tokens and mean_loss < 50 else None,
    }
    _print_report(report)
    if args.report:
        atomic_write_json(args.report, report)
        print(f"report written to {args.report}")
    return 0 if lengths else 1


def _print_report(r: dict) -> None:
    t = r["tokens"]
    skipped = ", ".join(f"{k}: {v}" for k, v in r["examples_skipped"].items()) or "none"
    print(f"data      {r['data']}")
    print(f"model     {r['model']} (template {r['template']})")
    print(f"records   {r['records_read']} read, {r['records_invalid']} invalid, {r['examples_ok']} usable")
    print(f"skipped   {skipped}")
    print(f"tokens    min {t['min']}, median {t['median']}, max {t['max']}; {t['supervised_total']} supervised")
    print(f"loss      {r['loss']:.4f} per supervised token")
    for problem in r["first_problems"]:
        print(f"  problem: {problem}")
