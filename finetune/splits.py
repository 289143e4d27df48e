"""`medllava finetune split`: train / validation / test splits of an in-house VQA set in which no
patient (or, for rows without a patient id, no image) is in two splits.

    medllava finetune split --in cases.csv --out data/cases --group-by patient_id --val 0.1 --test 0.2 --seed 0

The input is a CSV or JSONL file read by the in-house task loader (`medllava.eval.tasks.inhouse`): image (a
file, DICOM included, or a DICOM series folder), question, answer, optional answer_type and
patient/study ids. Rows are grouped by `--group-by`; a row without that id is grouped by the
sha256 of its image bytes, so copies of one image under two names still land together. Groups are
split with scikit-learn's GroupShuffleSplit (fractions are of groups), or with StratifiedGroupKFold
under `--stratify`, which keeps the share of yes / no / other closed / open questions close across
splits (fractions are then rounded to 1/k folds).

Written to `--out`: `train.jsonl`, `validation.jsonl`, `test.jsonl` (the rows, image paths made
relative to `--out`; `medllava finetune --task inhouse --root OUT` reads them) and
`split_report.json`: rows, groups and class balance per split, and every image whose bytes occur
in more than one split (the same scan filed under two patients leaks test answers into training).
The same input, fractions and seed always give the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections import Counter, defaultdict
from pathlib import Path

SPLITS = ("train", "validation", "test")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medllava finetune split",
        description=__doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--in", dest="input", required=True, type=Path, metavar="FILE", help="in-house CSV or JSONL file")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the split files and the report")
    p.add_argument("--group-by", default="patient_id",
                   help="column that identifies a patient (default patient_id); 'image' groups by image only")
    p.add_argument("--root", type=Path, help="folder the image paths are relative to (default: the file's folder)")
    p.add_argument("--val", type=float, default=0.1, help="validation fraction of the groups (default 0.1)")
    p.add_argument("--test", type=float, default=0.2, help="test fraction of the groups (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0)")
    p.add_argument("--stratify", action="store_true", help="balance yes/no/other/open shares across splits")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    report = make_split(args.input, args.out, group_by=args.group_by, val=args.val, test=args.test,
                        seed=args.seed, stratify=args.stratify, root=args.root)
    print_report(report)
    return 0


def make_split(path: Path, out: Path, *, group_by: str = "patient_id", val: float = 0.1, test: float = 0.2,
               seed: int = 0, stratify: bool = False, root: Path | None = None) -> dict:
    """Split the in-house file at `path` into `out`; returns the report (also written as split_report.json)."""
    from medllava.eval.tasks.inhouse import InHouse
    from medllava.io import atomic_write_json, write_jsonl

    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"--val {val} and --test {test} must be fractions in [0, 1) that leave some training data")
    path = Path(path)
    task = InHouse(root or path.parent, path.stem, file=path, skip_bad=True)
    by_path: dict[Path, str | None] = {}
    for ex in task:
        path = task.image_path(ex)
        if path not in by_path:
            by_path[path] = image_hash(path)
    hashes = {ex.qid: by_path[task.image_path(ex)] for ex in task}
    groups, missing_ids = group_keys(task.examples, hashes, group_by)
    labels = [balance_label(ex) for ex in task.examples] if stratify else None
    assignment = assign_groups(groups, val, test, seed, labels)
    out = Path(out)
    for name in SPLITS:
        write_jsonl(out / f"{name}.jsonl",
                    [split_row(task, ex, out) for ex, s in zip(task.examples, assignment) if s == name])
    report = {
        "input": str(path), "out": str(out), "seed": seed, "val": val, "test": test, "group_by": group_by,
        "method": "StratifiedGroupKFold" if stratify else "GroupShuffleSplit",
        "rows": len(task.examples), "skipped_records": len(task.skipped), "first_skipped": task.skipped[:10],
        "rows_grouped_by_image": missing_ids,
        "missing_images": sorted(str(task.image_path(ex)) for ex in task if hashes[ex.qid] is None)[:20],
        "splits": {name: split_summary([(ex, g) for ex, g, s in zip(task.examples, groups, assignment) if s == name])
                   for name in SPLITS},
        "duplicate_images_across_splits": cross_split_duplicates(task, hashes, assignment),
    }
    atomic_write_json(out / "split_report.json", report)
    return report


def image_hash(path: Path) -> str | None:
    """sha256 of the image file's bytes (a DICOM folder: of its middle slice); None when unreadable."""
    from medllava.commands.chat import series_slice

    try:
        path = series_slice(path) if path.is_dir() else path
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


def group_keys(examples, hashes: dict, group_by: str) -> tuple[list[str], int]:
    """One group key per example, and how many examples had no id and were grouped by image."""
    keys, by_image = [], 0
    for ex in examples:
        value = ex.meta.get(group_by) if group_by != "image" else None
        if value is None or str(value).strip() == "":
            by_image += 1
            # An unreadable image has no hash; its path is the best identity left.
            keys.append(f"image:{hashes[ex.qid] or ex.image}")
        else:
            keys.append(f"{group_by}:{str(value).strip()}")
    return keys, by_image


def balance_label(example) -> str:
    """The class a stratified split balances: yes, no, other closed, or open."""
    answer = example.answer.strip().lower()
    if example.answer_type == "closed":
        return answer if answer in ("yes", "no") else "closed-other"
    return "open"


def assign_groups(groups: list[str], val: float, test: float, seed: int, labels: list[str] | None) -> list[str]:
    """The split name of each row; rows of one group always share a split."""
    import numpy as np

    n = len(groups)
    names = np.array(["train"] * n, dtype=object)
    remaining = np.arange(n)
    # Test is carved from everything, then validation from what is left, as a fraction of the whole.
    for name, fraction in (("test", test), ("validation", val / (1 - test) if val else 0.0)):
        if not fraction:
            continue
        sub_groups = [groups[i] for i in remaining]
        if len(set(sub_groups)) < 2:
            raise ValueError(f"{len(set(groups))} groups are too few for train, validation and test splits")
        picked = _pick(sub_groups, fraction, seed, [labels[i] for i in remaining] if labels else None)
        names[remaining[picked]] = name
        remaining = np.delete(remaining, picked)
    return list(names)


def _pick(groups: list[str], fraction: float, seed: int, labels: list[str] | None):
    """Indices of a `fraction` of the groups (rows of whole groups)."""
    import numpy as np
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    x = np.zeros(len(groups))
    try:
        if labels is None:
            splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
            return next(splitter.split(x, groups=groups))[1]
        folds = max(2, min(round(1 / fraction), len(set(groups))))
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        return next(splitter.split(x, labels, groups=groups))[1]
    except ValueError as e:  # scikit-learn's message for too few groups names sizes, not the cause
        raise ValueError(f"cannot take {fraction:.0%} of {len(set(groups))} groups and keep the rest ({e})") from None


def split_row(task, example, out: Path) -> dict:
    """The example as an in-house row, its image path relative to the split folder."""
    image = os.path.relpath(task.image_path(example), out.resolve())
    return {"qid": example.qid, "image": Path(image).as_posix(), "question": example.question,
            "answer": example.answer, "answer_type": example.answer_type, **example.meta}


def split_summary(rows: list) -> dict:
    """Rows, groups and class balance of one split; `rows` are (example, group key) pairs."""
    closed = [ex for ex, _ in rows if ex.answer_type == "closed"]
    answers = Counter(ex.answer.strip().lower() for ex in closed)
    return {
        "rows": len(rows),
        "groups": len({g for _, g in rows}),
        "images": len({ex.image for ex, _ in rows}),
        "open": len(rows) - len(closed),
        "closed": len(closed),
        "closed_answers": dict(answers.most_common(10)),
        "closed_yes_share": answers["yes"] / len(closed) if closed else None,
    }


def cross_split_duplicates(task, hashes: dict, assignment: list[str]) -> list[dict]:
    """Images whose bytes occur in more than one split, with the splits and paths they occur under."""
    where = defaultdict(lambda: {"splits": set(), "images": set()})
    for ex, split in zip(task.examples, assignment):
        if hashes[ex.qid] is not None:
            where[hashes[ex.qid]]["splits"].add(split)
            where[hashes[ex.qid]]["images"].add(ex.image)
    return [
        {"sha256": digest, "splits": sorted(w["splits"], key=SPLITS.index), "images": sorted(w["images"])}
        for digest, w in sorted(where.items())
        if len(w["splits"]) > 1
    ]


def print_report(report: dict) -> None:
    print(f"{report['rows']} rows from {report['input']} ({report['skipped_records']} unreadable records skipped); "
          f"grouped by {report['group_by']} ({report['rows_grouped_by_image']} rows without it grouped by image); "
          f"{report['method']}, seed {report['seed']}")
    print(f"{'split':<11} {'rows':>6} {'groups':>7} {'open':>6} {'closed':>7} {'yes share':>10}")
    for name, s in report["splits"].items():
        share = f"{s['closed_yes_share']:.2f}" if s["closed_yes_share"] is not None else "-"
        print(f"{name:<11} {s['rows']:>6} {s['groups']:>7} {s['open']:>6} {s['closed']:>7} {share:>10}")
    duplicates = report["duplicate_images_across_splits"]
    if duplicates:
        print(f"warning: {len(duplicates)} images occur in more than one split (same bytes), e.g. "
              f"{', '.join(duplicates[0]['images'])} in {', '.join(duplicates[0]['splits'])}")
    if report["missing_images"]:
        print(f"warning: {len(report['missing_images'])} images could not be read, e.g. {report['missing_images'][0]}")
    print(f"wrote {', '.join(f'{n}.jsonl' for n in SPLITS)} and split_report.json to {report['out']}")
