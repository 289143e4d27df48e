"""The demo's report: what each step of `medllava demo` produced, as Markdown with PNG plots.

Everything is read back from the files the steps wrote (curation JSONL, stage completion records,
the Trainer's logs, evaluation metrics), so the report shows what is on disk, not what a step said.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from medllava.io import atomic_write_text, save_png

PIPELINE = """```
PMC OA packages + DICOM figures
  -> curate extract -> classify (imaging modalities) -> dedupe (+ test-image leakage) -> align   [stage-1 set]
  -> instruct (teacher model, or shipped teacher conversations)                                  [stage-2 set]
  -> adapt: stage 1 projector on the stage-1 set -> stage 2 LoRA on the stage-2 set              [adapted base]
  -> finetune: VQA-RAD head on the adapted base                                                  [head]
  -> eval run: base and base + head on VQA-RAD test questions                                    [scores]
```"""


def _count(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _losses(stage_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) from the newest Trainer state in the stage's checkpoints."""
    states = sorted(stage_dir.glob("checkpoints/checkpoint-*/trainer_state.json"),
                    key=lambda p: int(p.parent.name.split("-")[1]))
    if not states:
        return []
    history = json.loads(states[-1].read_text())["log_history"]
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


def _pct(metric: dict) -> str:
    low, high = metric["ci95"]
    return f"{100 * metric['value']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2))
    ax = fig.add_subplot()
    for name, points in curves.items():
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], marker=".", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    save_png(fig, path)


def _plot_scores(scores: dict[str, dict], path: Path) -> None:
    from matplotlib.figure import Figure

    names = list(scores)
    metrics = [("closed accuracy (strict)", "closed_accuracy"), ("open token F1 (strict)", "open_f1")]
    fig = Figure(figsize=(6, 3.2))
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [100 * scores[name]["strict"][key]["value"] for _, key in metrics]
        errors = [[100 * (scores[name]["strict"][k]["value"] - scores[name]["strict"][k]["ci95"][0]) for _, k in metrics],
                  [100 * (scores[name]["strict"][k]["ci95"][1] - scores[name]["strict"][k]["value"]) for _, k in metrics]]
        ax.bar([j + i * width for j in range(len(metrics))], values, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(metrics))], [m for m, _ in metrics])
    ax.set_ylabel("% (95% CI)")
    ax.legend()
    save_png(fig, path)


def write_report(work: Path, seconds: float) -> Path:
    cur = work / "curation"
    classified = _rows(cur / "classified.jsonl")
    labels = Counter(label for r in classified for label in r.get("modalities", []))
    lines = ["# medllava demo report", "", f"The whole pipeline ran in {seconds:.0f} s.", "", PIPELINE, "",
             "## Curation", "", "| step | records |", "|---|---|",
             f"| figures extracted | {_count(cur / 'figures.jsonl')} |",
             f"| kept by the modality filter | {len(classified)} |",
             f"| after dedupe and leakage check | {_count(cur / 'deduped.jsonl')} |",
             f"| stage-1 (alignment) conversations | {_count(cur / 'alignment.jsonl')} |",
             f"| stage-2 (instruction) conversations | {_count(work / 'instruct' / 'stage2.jsonl')} |", "",
             "Modalities of the kept figures: " + (", ".join(f"{k} {v}" for k, v in sorted(labels.items())) or "none"), ""]

    lines += ["## Training", "", "| stage | steps | mean train loss | examples | skipped |", "|---|---|---|---|---|"]
    curves = {}
    for name, stage_dir in (("align", work / "adapt" / "align"), ("instruct", work / "adapt" / "instruct"),
                            ("head", work / "head" / "train")):
        done = stage_dir / "stage_complete.json"
        if done.is_file():
            r = json.loads(done.read_text())
            before = r["data"]["records_invalid"] + r["data"].get("unusable_for_template", 0) + r["data"]["missing_images"]
            skipped = sum(r.get("skipped_in_batches", {}).values()) + before
            lines.append(f"| {name} | {r['steps']} | {r['train_loss']:.3f} | {r['examples']} | {skipped} |")
        curves[name] = _losses(stage_dir)
    _plot_losses(curves, work / "report_losses.png")
    lines += ["", "![training loss](report_losses.png)", ""]

    scores = {}
    for name, metrics in (("adapted base", work / "eval" / "base" / "metrics.json"),
                          ("base + VQA-RAD head", work / "eval" / "head" / "vqa_rad_demo" / "metrics.json")):
        if metrics.is_file():
            scores[name] = json.loads(metrics.read_text())
    lines += ["## Evaluation (VQA-RAD demo test subset)", "",
              "| model | closed accuracy, strict | closed accuracy, LLaVA-Med | open token F1 | n |", "|---|---|---|---|---|"]
    for name, m in scores.items():
        lines.append(f"| {name} | {_pct(m['strict']['closed_accuracy'])} | {_pct(m['llava_med']['closed_accuracy'])} "
                     f"| {_pct(m['strict']['open_f1'])} | {m['n']} |")
    if scores:
        _plot_scores(scores, work / "report_scores.png")
        lines += ["", "![scores](report_scores.png)", ""]
    lines += ["The model is the tiny random-weight one, so the numbers show the pipeline working, not a",
              "useful model. Per-question details: `eval/*/report.md`.", ""]
    path = work / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
