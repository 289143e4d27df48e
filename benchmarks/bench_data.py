"""Input pipeline: can image decoding keep a training GPU fed? medllava's dataloader against the plain way.

    python benchmarks/bench_data.py                                   # the embedded demo images
    python benchmarks/bench_data.py --images /data/vqa_rad/images --examples 512 --workers 0,2,4,8

Each example is a stage-1 record as `medllava adapt` reads it: a real image from `--images` (every image
file of the folder, cycled) and a real PMC figure caption (benchmarks/real_text.py), turned into a batch by
medllava's own `EncodedDataset` (read the image, CLIP preprocessing at 336 px by the LLaVA-1.5-7B processor,
template and tokenizer) and `Collator` (packed rows, sparse logits), through a `torch.utils.data.DataLoader`
as `transformers.Trainer` builds it. The plain way is Trainer's default, `dataloader_num_workers=0`: every
image is decoded in the training process, between two steps. medllava's stage configs use
`dataloader_workers: 4` (finetune/config.py); this machine's core count bounds what more workers can give.

Printed per worker count: samples/s the loader delivers (wall clock over every batch, worker start-up
included), its ratio to the plain way, and its headroom over a GPU's appetite (`--gpu-rate`, samples/s;
default the fastest stage-1 path measured on one H100, benchmarks/results/h100/align_flex.json). With no
workers the decode is serial with the step (Trainer syncs with the GPU every micro-batch, to check the loss
for NaN), so the GPU idles for a share decode / (decode + step) of the time; with workers decoding ahead,
it idles only if the loader is slower than the GPU (headroom below 1). Those two idle shares are derived
from the measured rates, not timed on a GPU; a real run reports its own (`waited for data ...`, logged as
`data_wait`, from medllava.finetune.trainer.InputWait).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.real_text import caption_source  # noqa: E402
from medllava.curation.dedupe import IMAGE_SUFFIXES  # noqa: E402  (the image files curation collects, DICOM included)
from medllava.tiny import demo_data  # noqa: E402
from medllava.io import atomic_write_json  # noqa: E402

H100_STAGE1 = REPO / "benchmarks" / "results" / "h100" / "align_flex.json"


def default_gpu_rate() -> float:
    """Samples/s of the fastest path in the H100 stage-1 run."""
    paths = json.loads(H100_STAGE1.read_text())["paths"]
    return max(row["samples/s"] for row in paths.values() if "samples/s" in row)


def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"bench_data: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return files


def stage1_records(images: list[Path], n: int) -> list[dict]:
    """`n` image + caption records: images cycled in order, captions drawn from the real ones (seeded)."""
    captions = caption_source().draw(n, seed=0)
    return [{"id": f"bench_{i}", "image": str(images[i % len(images)]), "conversations": captions[i]["conversations"]}
            for i in range(n)]


def loader_rate(dataset, collator, batch: int, workers: int) -> tuple[float, int]:
    """Samples/s of one pass over `dataset` through a DataLoader as Trainer makes it, and the samples seen."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch, collate_fn=collator, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), prefetch_factor=2 if workers else None)
    start = time.perf_counter()
    seen = sum(len(b["example_ids"]) + len(b["skipped"]) for b in loader)
    return seen / (time.perf_counter() - start), seen


def measure(args) -> dict:
    from benchmarks.shapes import random_7b_processor
    from medllava.data import Collator, EncodedDataset, Encoder

    processor = random_7b_processor()
    images = image_files(args.images)
    records = stage1_records(images, args.examples)
    dataset = EncodedDataset(records, Encoder(processor, template="plain"))
    collator = Collator(processor.tokenizer.pad_token_id, pack=True, sparse_logits=True)
    dataset[0]  # noqa: B018 (first call imports and builds what every later call reuses)
    rows = []
    for workers in args.workers:
        rate, seen = loader_rate(dataset, collator, args.batch, workers)
        rows.append({"workers": workers, "samples_per_s": rate, "samples": seen})
    plain = next((r["samples_per_s"] for r in rows if r["workers"] == 0), None)
    step = 1 / args.gpu_rate
    for row in rows:
        row["ratio"] = row["samples_per_s"] / plain if plain else None
        row["headroom"] = row["samples_per_s"] / args.gpu_rate
        decode = 1 / row["samples_per_s"]
        row["gpu_idle"] = decode / (decode + step) if row["workers"] == 0 else max(0.0, 1 - row["headroom"])
    return {
        "images": str(args.images), "n_images": len(images), "examples": args.examples, "batch": args.batch,
        "image_processor": type(processor.image_processor).__name__, "cpu_cores": os.cpu_count(),
        "gpu_rate": args.gpu_rate, "rows": rows,
    }


def report(result: dict) -> str:
    lines = [
        f"stage-1 input pipeline: {result['examples']} examples over {result['n_images']} images in {result['images']};"
        f" batches of {result['batch']}, packed; {result['image_processor']}; {result['cpu_cores']} CPU cores",
        f"GPU appetite: {result['gpu_rate']:.1f} samples/s (--gpu-rate)",
        "",
        "| workers | samples/s | vs 0 workers | headroom over the GPU | GPU idle from input (derived) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        lines.append(f"| {row['workers']} | {row['samples_per_s']:.1f} | {ratio} | {row['headroom']:.1f}x"
                     f" | {row['gpu_idle']:.1%} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, default=demo_data()[1], help="folder of images (default: the demo images)")
    p.add_argument("--examples", type=int, default=128, help="examples per pass (images cycled)")
    p.add_argument("--batch", type=int, default=8, help="examples per batch (the 7B stage-1 configs: 8)")
    p.add_argument("--workers", type=lambda s: [int(w) for w in s.split(",")], default=[0, 4],
                   help="comma-separated dataloader worker counts (0 = the plain way)")
    p.add_argument("--gpu-rate", type=float, default=None,
                   help="samples/s the GPU trains at (default: the H100 stage-1 figure)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.gpu_rate is None:
        args.gpu_rate = default_gpu_rate()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = measure(args)
    print(report(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
