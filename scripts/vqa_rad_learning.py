"""The learning experiment: does the `small` random-weight LLaVA, fine-tuned on real VQA-RAD questions,
learn to answer, and do the images help?

    python scripts/vqa_rad_learning.py --data /path/to/vqa_rad --out runs/vqa_rad_learning

`--data` is a VQA-RAD folder with the MEVF split (trainset.json, testset.json, images/). Two runs
with the same settings and seed go through `medllava finetune`'s code (`medllava.finetune.head_training.train_head`:
a full-checkpoint head, every module trained from random weights):
  images   every question with its image;
  blank    every image replaced by the mean training image, so the model sees the questions only
           and can learn no more than VQA-RAD's language prior.
10% of the training images (with all their questions) are held out; the checkpoint with the lowest
loss on them is kept. `--hold-out questions` holds out 10% of the questions instead, with their
images still trained on: that mirrors VQA-RAD's test split, whose questions are about training images. Both runs are scored on the real test questions (272 closed, 179 open) with
the strict scorer, against the majority-class baseline (the commonest closed training answer given
to every closed question), beside two linear references trained on the same questions (logistic
regression on question words, and on question words plus the image's identity) that show how much
signal the data holds. Differences come with paired bootstrap 95% intervals over the test
questions. The table is printed and the figures written to `<out>/results.json`.

The two runs can train at once on two cores: start the script with `--conditions images` and with
`--conditions blank` on the same `--out`, then once more with both, which reuses the finished runs
and writes the comparison (`minutes` in results.json counts only the work of the last invocation).

Images are first downscaled (a copy under `<out>/vqa_rad_<size>px`): the model sees 64 px anyway,
and decoding 1000 px JPEGs would dominate a CPU run.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from medllava.eval.metrics.stats import bootstrap_ci  # noqa: E402
from medllava.eval.results import score_examples  # noqa: E402
from medllava.eval.tasks import CLOSED, load_task  # noqa: E402
from medllava.finetune.config import DataConfig, StageConfig  # noqa: E402
from medllava.finetune.head_training import FinetuneConfig, HeadSettings, train_head  # noqa: E402
from medllava.config import claim_run_dir  # noqa: E402
from medllava.finetune.splits import assign_groups  # noqa: E402
from medllava.finetune.task_data import task_records  # noqa: E402
from medllava.io import atomic_write_json, write_jsonl  # noqa: E402
from medllava.model import MODULES, ModelConfig  # noqa: E402
from medllava.tiny import TINY_SPECS  # noqa: E402

CONDITIONS = ("images", "blank")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="VQA-RAD folder (trainset.json, testset.json, images/)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--model", default="small", help="named random-weight model (default small)")
    p.add_argument("--epochs", type=float, default=8.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--hold-out", choices=("images", "questions"), default="images",
                   help="validation set: whole training images with their questions (default), or questions alone")
    p.add_argument("--val", type=float, default=0.1,
                   help="fraction of the training images held out (with their questions) to pick the checkpoint")
    p.add_argument("--batch", type=int, default=32, help="global batch (default 32)")
    p.add_argument("--micro-batch", type=int, default=16, help="examples per forward pass (default 16)")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (timing trials)")
    p.add_argument("--thumb", type=int, default=96, help="shortest edge of the downscaled images (default 96)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on shared cores, more threads wait on each other)")
    p.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    return p.parse_args()


def downscaled_copy(data: Path, out: Path, size: int) -> Path:
    """A copy of the VQA-RAD folder with every image's shortest edge cut to `size` px (once)."""
    from PIL import Image

    from medllava.images import load_image

    if (out / "done").is_file():
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name in ("trainset.json", "testset.json"):
        shutil.copy2(data / name, out / name)
    for src in sorted((data / "images").iterdir()):
        image = load_image(src)
        scale = size / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        image.save(out / "images" / f"{src.stem}.png")
    for name in ("trainset.json", "testset.json"):
        rows = json.loads((out / name).read_text())
        for row in rows:
            row["image_name"] = Path(row["image_name"]).stem + ".png"
        (out / name).write_text(json.dumps(rows))
    (out / "done").write_text("")
    return out


def mean_image(paths: list[Path], side: int):
    """The pixel mean of `paths`, each resized to side x side: one image that carries no case."""
    import numpy as np
    from PIL import Image

    from medllava.images import load_image

    total = np.zeros((side, side, 3))
    for path in paths:
        total += np.asarray(load_image(path).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float64)
    return Image.fromarray(np.rint(total / len(paths)).astype("uint8"))


def train_condition(name: str, args, records: dict[str, list[dict]], image_root: Path) -> Path:
    """Train one head on `records["train"]`, keeping the checkpoint with the lowest loss on
    `records["validation"]`; returns the head folder."""
    run_dir = args.out / name
    steps_per_epoch = math.ceil(len(records["train"]) / args.batch)
    stage = StageConfig(
        train_modules=list(MODULES),  # random weights: the vision tower has to learn too
        learning_rate=args.lr, epochs=args.epochs, max_steps=args.max_steps,
        global_batch_size=args.batch, per_device_batch_size=args.micro_batch,
        warmup_ratio=0.03, lr_scheduler="cosine", weight_decay=args.weight_decay, gradient_checkpointing=False,
        save_steps=max(1, steps_per_epoch // 2), save_total_limit=2, logging_steps=20, dataloader_workers=0,
    )
    cfg = FinetuneConfig(run_dir=str(run_dir), base=ModelConfig(name_or_path=args.model, seed=args.seed),
                         head=HeadSettings(full=True), train=stage, seed=args.seed, bf16=False, report_to=["none"])
    # A folder holding a run with other settings is refused, so results never mix two runs.
    command = "python " + " ".join(sys.argv)
    claim_run_dir(run_dir, cfg, command, command)
    data = {}
    for split, rows in records.items():
        write_jsonl(run_dir / f"{split}.jsonl", rows)
        data[split] = DataConfig(path=str(run_dir / f"{split}.jsonl"), image_root=str(image_root), template="vicuna_v1")
    return Path(train_head(cfg, data["train"], data["validation"])["head"])


def predict(head: Path, task, images: list, batch: int = 64) -> list[str]:
    from medllava.commands.chat import answer_batch, read_full_head_info
    from medllava.model import build_model
    from medllava.question_styles import format_question

    model, processor = build_model(ModelConfig(name_or_path=str(head)))
    info = read_full_head_info(head)
    questions = [format_question(ex.question, info.prompt_style, ex.answer_type, tuple(info.closed_options))
                 for ex in task]
    answers = []
    for i in range(0, len(questions), batch):
        answers += answer_batch(model, processor, images[i:i + batch], questions[i:i + batch], info.template, 12)
    return answers


def per_question(examples, predictions) -> tuple[dict, list[float]]:
    """Strict closed accuracy (with its interval) and per-closed-question correctness."""
    results, items = score_examples(examples, predictions, n_boot=2000, seed=0)
    closed = [it["strict"]["closed_accuracy"] for it in items if it["answer_type"] == CLOSED]
    return results, closed


def bag_of_words(train, test, with_image: bool) -> list[float]:
    """Per-closed-question correctness of a linear reference: logistic regression (scikit-learn
    defaults) on tf-idf word uni- and bigrams of the question, optionally with the image's name as
    one more word (VQA-RAD's test images are all training images, so their identity is a feature)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    def text(ex) -> str:
        return ex.question + (f" image_{Path(ex.image).stem}" if with_image else "")

    closed_train = [ex for ex in train if ex.answer_type == CLOSED]
    closed_test = [ex for ex in test if ex.answer_type == CLOSED]
    vectorizer = TfidfVectorizer(ngram_range=(1, 2))
    model = LogisticRegression(max_iter=5000)
    model.fit(vectorizer.fit_transform([text(ex) for ex in closed_train]), [ex.answer.lower() for ex in closed_train])
    predicted = model.predict(vectorizer.transform([text(ex) for ex in closed_test]))
    return [float(p == ex.answer.lower()) for p, ex in zip(predicted, closed_test)]


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of a - b over the same questions, with a paired bootstrap 95% interval."""
    diff = [x - y for x, y in zip(a, b, strict=True)]
    lo, hi = bootstrap_ci(diff, n_boot=2000, seed=0)
    return {"difference": sum(diff) / len(diff), "ci95": [lo, hi]}


def prepare(args):
    """The tasks, the training conversations split into train / validation, and the mean image."""
    root = downscaled_copy(args.data, args.out / f"vqa_rad_{args.thumb}px", args.thumb)
    train, test = load_task("vqa-rad", root, "train"), load_task("vqa-rad", root, "test")
    made = task_records(train, "llava-med", ["yes", "no"], args.out)
    # Held out by image (default), no paraphrase of a validation question about the same image is
    # trained on; held out by question, validation looks like the test split (seen images, new questions).
    groups = [r["image"] if args.hold_out == "images" else r["id"] for r in made.records]
    held_out = assign_groups(groups, args.val, 0.0, args.seed, None)
    split = {s: [r for r, h in zip(made.records, held_out) if h == s] for s in ("train", "validation")}
    # Weighted by question, as the training set shows the images.
    blank = mean_image([train.image_path(ex) for ex in train], TINY_SPECS[args.model].image_size)
    blank.save(args.out / "mean_image.png")
    return train, test, made, split, blank


def baselines(train, test, split) -> tuple[dict, list[float], dict]:
    """The majority answer (with per-question correctness) and the bag-of-words references."""
    from collections import Counter

    majority = Counter(ex.answer.strip().lower() for ex in train if ex.answer_type == CLOSED).most_common(1)[0][0]
    _, base_closed = per_question(test.examples, [majority if ex.answer_type == CLOSED else "" for ex in test])
    # The linear references learn from the same training questions as the model.
    trained_on = {r["id"] for r in split["train"]}
    references = {}
    for name, with_image in (("question words", False), ("question words + image id", True)):
        correct = bag_of_words([ex for ex in train if ex.qid in trained_on], test, with_image)
        references[name] = {"closed_accuracy": sum(correct) / len(correct),
                            "ci95": bootstrap_ci(correct, n_boot=2000, seed=0),
                            "vs_majority": paired(correct, base_closed)}
    majority_row = {"answer": majority, "closed_accuracy": sum(base_closed) / len(base_closed)}
    return majority_row, base_closed, references


def run_condition(name: str, args, test, made, split, blank, base_closed: list[float]) -> dict:
    """Train and score one condition (images, or every image replaced by the mean image)."""
    from medllava.images import load_image

    t0 = time.time()
    if name == "images":
        records, image_root, images = split, made.image_root, [load_image(test.image_path(ex)) for ex in test]
    else:
        records = {s: [dict(r, image="mean_image.png") for r in rows] for s, rows in split.items()}
        image_root, images = args.out, [blank] * len(test)
    head = train_condition(name, args, records, image_root)
    predictions = predict(head, test, images)
    results, closed = per_question(test.examples, predictions)
    write_jsonl(args.out / name / "predictions.jsonl",
                [{"qid": ex.qid, "prediction": p} for ex, p in zip(test, predictions)])
    return {"strict": results["strict"], "closed_correct": closed, "minutes": (time.time() - t0) / 60,
            "head": str(head), "vs_majority": paired(closed, base_closed),
            "head_metrics": json.loads((head / "head.json").read_text())["metrics"]}


def main() -> int:
    import torch

    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    train, test, made, split, blank = prepare(args)
    majority, base_closed, references = baselines(train, test, split)
    runs = {name: run_condition(name, args, test, made, split, blank, base_closed) for name in args.conditions}
    report = {
        "command": " ".join(["python", *sys.argv]), "data": str(args.data), "model": args.model,
        "n_train": len(split["train"]), "n_validation": len(split["validation"]), "n_test": len(test),
        "n_test_closed": len(base_closed),
        "settings": {"epochs": args.epochs, "learning_rate": args.lr, "global_batch": args.batch,
                     "micro_batch": args.micro_batch, "max_steps": args.max_steps, "seed": args.seed,
                     "threads": args.threads, "weight_decay": args.weight_decay,
                     "validation": f"{args.val:.0%} of the training {args.hold_out}, best checkpoint by validation loss",
                     "schedule": "cosine, 3% warmup", "trained": list(MODULES), "prompt_style": "llava-med",
                     "template": "vicuna_v1", "image_px": TINY_SPECS[args.model].image_size,
                     "thumbnail_px": args.thumb},
        "majority": majority,
        "references": references,
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "closed_correct"} for k, v in runs.items()},
        "minutes_total": (time.time() - started) / 60,
    }
    if len(runs) == 2:
        report["images_vs_blank"] = paired(runs["images"]["closed_correct"], runs["blank"]["closed_correct"])
    atomic_write_json(args.out / "results.json", report)
    print_table(report)
    return 0


def print_table(r: dict) -> None:
    def pct(x: float) -> str:
        return f"{100 * x:.1f}"

    def interval(ci) -> str:
        return f"[{pct(ci[0])}, {pct(ci[1])}]"

    rows = [(f"majority answer ({r['majority']['answer']})", r["majority"]["closed_accuracy"], None, None, None)]
    for name, run in r["runs"].items():
        acc, em = run["strict"]["closed_accuracy"], run["strict"].get("open_exact_match", {}).get("value")
        rows.append((f"small LLaVA, {name}", acc["value"], acc["ci95"], run["vs_majority"], em))
    for name, ref in r["references"].items():
        rows.append((f"reference: {name}", ref["closed_accuracy"], ref["ci95"], ref["vs_majority"], None))
    print(f"\nVQA-RAD test: {r['n_test_closed']} closed questions, strict closed accuracy (%), "
          "paired bootstrap 95% intervals")
    print(f"{'':<36} {'closed':>6} {'95% CI':>14} {'vs majority':>11} {'95% CI':>15} {'open EM':>8}")
    for name, acc, ci, vs, em in rows:
        gain = f"{100 * vs['difference']:+.1f}" if vs else ""
        print(f"{name:<36} {pct(acc):>6} {interval(ci) if ci else '':>14} {gain:>11}"
              f" {interval(vs['ci95']) if vs else '':>15} {pct(em) if em is not None else '':>8}")
    if "images_vs_blank" in r:
        d = r["images_vs_blank"]
        print(f"images - blank: {100 * d['difference']:+.1f} points {interval(d['ci95'])}")
    print(f"total {r['minutes_total']:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
