"""`medllava eval run`: answer a benchmark with a model (and its task heads), then score and report.

    medllava eval run --task vqa-rad --root data/vqa_rad --model checkpoints/medllava-7b \\
        --head heads/vqa_rad --closed-scoring likelihood --out runs/eval/vqa_rad

The base model is loaded once; with several `--head` folders each head is evaluated in turn
in its own subfolder of `--out`. A head's head.json fixes the template, prompt style and
closed options it was trained with (`--template` / `--prompt-style` override it, with a
warning). Each output folder holds:

  run.json           the settings that decide the answers; a resumed run must match them
  predictions.jsonl  one row per answered question, appended as answers come, so a killed
                     run resumes where it stopped ({"qid", "prediction", "question", ...})
  metrics.json, items.jsonl, report.md and its PNG plots, from `medllava.eval.results` / `medllava.eval.report`

A prediction goes one way: predictions.jsonl is read once, when the folder is opened
(`medllava.eval.predictions.PredictionLog`, to resume); each new answer is appended to it and
held in memory, and the held rows are what is scored. metrics.json is built whole by
`medllava.eval.results.score_predictions`, and report.md rendered whole and written once.

One run writes an output folder at a time: `--out` is locked (`medllava.locks.output_lock`) from
before the model loads to the report, and a second run into it stops at once naming the first's PID.

Questions whose image cannot be read are skipped, counted and listed in metrics.json (and
scored as empty answers); they are tried again when the run is resumed.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from medllava.families import FAMILIES
from medllava.question_styles import PROMPT_STYLES
from medllava.templates import DEFAULT_TEMPLATE, GENERATION_TEMPLATES
from medllava.tiny import TINY_SPECS

from medllava.eval.options import add_task_options

if TYPE_CHECKING:  # annotations only: the CLI imports this module to register `run`, so it stays light
    from medllava.heads import HeadInfo

    from medllava.eval.generate import Asking
    from medllava.eval.predictions import PredictionLog
    from medllava.eval.tasks.base import Example, Task

log = logging.getLogger(__name__)

CLOSED_SCORING = ("generate", "likelihood")
DEFAULT_STYLE = "llava-med"
# Settings that change the answers: a run resumed with other values would mix two runs in one file.
RUN_KEYS = ("task", "split", "model", "head", "template", "prompt_style", "closed_options", "closed_scoring",
            "max_new_tokens", "dtype")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `run` to the `medllava eval` subcommands."""
    from medllava.eval.tasks import TASKS  # light: the loaders import pyarrow only when reading parquet

    p = subparsers.add_parser(
        "run",
        help="answer a benchmark with a model (and task heads), then score and report",
        description="Batched greedy answers (or likelihood-scored closed answers) to a benchmark's questions, "
                    "written as they come and resumable, then the metrics JSON and Markdown report of "
                    "`medllava eval score`.",
    )
    p.add_argument("--task", required=True, choices=list(TASKS), help="benchmark task")
    p.add_argument("--root", required=True, type=Path, help="dataset folder")
    p.add_argument("--model", required=True,
                   help=f"checkpoint folder of a supported family ({', '.join(FAMILIES)}: medllava.families), or a "
                        f"named random model ({', '.join(TINY_SPECS)})")
    p.add_argument("--head", action="extend", nargs="+", type=Path, default=[], metavar="DIR",
                   help="task head folder(s); several are evaluated in turn on one base")
    p.add_argument("--split", default="test", help="split to answer (default: test)")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES,
                   help=f"question style (default: the head's, else {DEFAULT_STYLE})")
    p.add_argument("--template", choices=GENERATION_TEMPLATES,
                   help=f"conversation template (default: the head's, else the model family's: {DEFAULT_TEMPLATE} "
                        "for llava)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per batch (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest generated answer in tokens (default 128)")
    p.add_argument("--closed-scoring", choices=CLOSED_SCORING, default="generate",
                   help="closed questions: generate an answer, or pick the candidate with the highest likelihood")
    p.add_argument("--out", type=Path, help="output folder (default: runs/eval/<task>_<split>_<model>)")
    p.add_argument("--limit", type=int, help="answer only the first N questions")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weight dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    add_task_options(p)
    p.set_defaults(func=run)


@dataclass
class RunStats:
    """What one pass over the questions did."""

    answered: int = 0
    resumed: int = 0
    seconds: float = 0.0
    skipped_images: dict[str, str] = field(default_factory=dict)
    """qid -> why its image could not be read."""

    @property
    def questions_per_second(self) -> float | None:
        """Answers per second of answering, None when nothing was answered."""
        return self.answered / self.seconds if self.answered and self.seconds > 0 else None

    def facts(self, settings: dict) -> dict:
        """metrics.json's "run": the settings that made the answers, then what this pass did."""
        qps = self.questions_per_second
        return {**settings, "answered_now": self.answered, "resumed": self.resumed, "seconds": round(self.seconds, 3),
                "questions_per_second": round(qps, 3) if qps else None, "skipped_images": self.skipped_images}


def resolve_asking(template: str | None, prompt_style: str | None, info: HeadInfo | None = None,
                   default_template: str = DEFAULT_TEMPLATE) -> Asking:
    """The head's settings (or the defaults: `default_template` is the model family's), with the flags
    that were given on top."""
    from medllava.eval.generate import Asking

    values = {"template": default_template, "prompt_style": DEFAULT_STYLE}
    options = tuple(info.closed_options) if info else Asking().closed_options
    if info:
        values = {"template": info.template, "prompt_style": info.prompt_style}
    for key, given in (("template", template), ("prompt_style", prompt_style)):
        if given is not None and given != values[key] and info:
            log.warning("--%s %s overrides the head's %s %r (head.json)",
                        key.replace("_", "-"), given, key, values[key])
        if given is not None:
            values[key] = given
    return Asking(values["template"], values["prompt_style"], options)


def check_resume(out_dir: Path, settings: dict) -> None:
    """Record the settings in run.json, refusing to add answers made otherwise to a folder."""
    import json

    from medllava.io import atomic_write_json

    path = out_dir / "run.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = [f"{k}: {before.get(k)!r} -> {settings[k]!r}" for k in RUN_KEYS if before.get(k) != settings[k]]
        if changed:
            raise ValueError(f"{out_dir} holds answers made with other settings ({'; '.join(changed)}); "
                             "give another --out, or delete the folder to start over")
    atomic_write_json(path, settings)


def answer_questions(model, processor, task: Task, examples: Sequence[Example], asking: Asking, pred_log, *,
                     batch_size: int, max_new_tokens: int, closed_scoring: str = "generate", head: str | None = None,
                     done: Collection[str] = frozenset()) -> RunStats:
    """Answer every example whose qid is not in `done`, appending one row per answer to `pred_log`
    (a `PredictionLog`, or anything with `path` and `append(row)`, such as a `JsonlLog`)."""
    from tqdm import tqdm

    from medllava.eval.generate import ensure_pad_token
    from medllava.eval.tasks.base import CLOSED

    ensure_pad_token(processor)
    todo = [ex for ex in examples if ex.qid not in done]
    stats = RunStats(resumed=len(examples) - len(todo))
    if stats.resumed:
        log.info("resuming: %d of %d questions already answered in %s", stats.resumed, len(examples), pred_log.path)
    by_likelihood = [ex for ex in todo if closed_scoring == "likelihood" and ex.answer_type == CLOSED]
    by_generation = [ex for ex in todo if not (closed_scoring == "likelihood" and ex.answer_type == CLOSED)]
    start = time.perf_counter()
    with tqdm(total=len(todo), unit="q", desc=head or "answering", disable=not todo) as bar:
        for mode, group in (("likelihood", by_likelihood), ("generate", by_generation)):
            for batch, images, n_tried in _batches(processor, task, group, asking, batch_size, stats):
                if batch:
                    rows = _answer_batch(model, processor, batch, images, asking, mode, max_new_tokens)
                    for row in rows:
                        pred_log.append({**row, "head": head})
                    stats.answered += len(rows)
                bar.update(n_tried)
    stats.seconds = time.perf_counter() - start
    if stats.skipped_images:
        first = next(iter(stats.skipped_images.values()))
        log.warning("skipped %d questions whose image could not be read (first: %s)", len(stats.skipped_images), first)
    return stats


def _batches(processor, task: Task, group: list[Example], asking: Asking, batch_size: int,
             stats: RunStats) -> Iterator[tuple[list[Example], list, int]]:
    """Yield `(examples, images, questions tried)` per batch sorted by full token length (image tokens
    included), leaving out (and noting in `stats`) the questions whose image cannot be read."""
    from medllava.images import ImageLoadError

    from medllava.eval.generate import image_token_counts, length_batches, load_example_image, prompt_for

    prompts = [prompt_for(ex, asking, processor) for ex in group]
    for indices in length_batches(prompts, processor.tokenizer, batch_size, image_token_counts(processor, task, group)):
        batch, images = [], []
        for i in indices:
            try:
                images.append(load_example_image(task, group[i]))
            except ImageLoadError as e:
                stats.skipped_images[group[i].qid] = str(e)
                continue
            batch.append(group[i])
        yield batch, images, len(indices)


def _answer_batch(model, processor, batch: list[Example], images: list, asking: Asking, mode: str,
                  max_new_tokens: int) -> list[dict]:
    """One prediction row per example of `batch`, by likelihood over its options or by generation."""
    from medllava.eval.generate import generate_answers, options_for, prompt_for, question_text
    from medllava.eval.likelihood import best, score_candidates

    rows = [{"qid": ex.qid, "question": ex.question, "answer_type": ex.answer_type, "scoring": mode} for ex in batch]
    if mode == "likelihood":
        scores = score_candidates(model, processor, [question_text(ex, asking) for ex in batch], images,
                                  [options_for(ex, asking) for ex in batch], asking.template)
        for row, s in zip(rows, scores):
            row.update(prediction=best(s), scores=s)
    else:
        prompts = [prompt_for(ex, asking, processor) for ex in batch]
        answers = generate_answers(model, processor, prompts, images, max_new_tokens, asking.template)
        for row, answer in zip(rows, answers):
            row["prediction"] = answer
    return rows


def run(args: argparse.Namespace) -> int:
    """Load the task, then answer, score and report each head (or the base) under the output lock."""
    from medllava.locks import output_lock

    from medllava.eval.tasks import load_task

    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--batch-size, --max-new-tokens and --limit must be at least 1")
    device, dtype = _device_and_dtype(args.device, args.dtype)
    task = load_task(args.task, args.root, args.split, **dict(args.option))
    examples = task.examples[:args.limit] if args.limit else task.examples
    out = args.out or Path("runs") / "eval" / f"{task.name}_{task.split}_{Path(args.model).name}"
    # Taken before the model loads, so a second run into the folder is refused at once instead of
    # answering every question again into the same predictions.jsonl.
    with output_lock(out, f"medllava eval run --task {args.task} --model {args.model} --out {out}"):
        return _run_locked(args, task, examples, out, device, dtype)


def _run_locked(args: argparse.Namespace, task: Task, examples: Sequence[Example], out: Path, device: str,
                dtype: str) -> int:
    """The rest of `run`, while this process holds the lock of `out`."""
    from medllava.families import model_family
    from medllava.heads import load_with_heads, use_head
    from medllava.model import ModelConfig

    # The base is loaded once; each head is switched on in turn (heads share the base's weights).
    model, processor, infos = load_with_heads(ModelConfig(name_or_path=args.model, dtype=dtype), args.head)
    model.to(device)
    default_template = model_family(model).default_template
    for name in list(infos) or [None]:
        if name is not None:
            use_head(model, name)
        asking = resolve_asking(args.template, args.prompt_style, infos.get(name), default_template)
        settings = {"task": task.name, "split": task.split, "model": _model_id(args.model), "head": name,
                    **asdict(asking), "closed_options": list(asking.closed_options),
                    "closed_scoring": args.closed_scoring, "max_new_tokens": args.max_new_tokens, "dtype": dtype}
        report = evaluate(model, processor, task, examples, asking, out / name if name else out, settings,
                          batch_size=args.batch_size)
        print(f"report: {report}")
    return 0


def evaluate(model, processor, task: Task, examples: Sequence[Example], asking: Asking, out_dir: Path, settings: dict,
             *, batch_size: int) -> Path:
    """Answer (or resume answering) `examples` into `out_dir`, then score and report; returns the report path."""
    from medllava.eval.predictions import PredictionLog

    out_dir.mkdir(parents=True, exist_ok=True)
    check_resume(out_dir, settings)
    with PredictionLog(out_dir / "predictions.jsonl") as pred_log:
        if pred_log.unreadable:
            log.warning("%s: %d unreadable rows ignored; their questions are answered again (first: %s)",
                        pred_log.path, len(pred_log.unreadable), pred_log.unreadable[0])
        stats = answer_questions(model, processor, task, examples, asking, pred_log, batch_size=batch_size,
                                 max_new_tokens=settings["max_new_tokens"], closed_scoring=settings["closed_scoring"],
                                 head=settings["head"], done=pred_log.answered())
    return score_and_report(task, examples, pred_log, out_dir, settings, stats)


def score_and_report(task: Task, examples: Sequence[Example], pred_log: PredictionLog, out_dir: Path, settings: dict,
                     stats: RunStats) -> Path:
    """metrics.json, items.jsonl and report.md (with plots) for the questions `pred_log` (a `PredictionLog`)
    holds answers to: the questions asked now plus any answered by an earlier, larger run into the folder."""
    from medllava.io import atomic_write_json, write_jsonl

    from medllava.eval.report import print_summary, write_report
    from medllava.eval.results import score_predictions

    answered = pred_log.answered()
    if not answered:
        raise ValueError(f"no question could be answered: {len(stats.skipped_images)} of {len(examples)} images "
                         f"unreadable (first: {next(iter(stats.skipped_images.values()), 'none')})")
    asked = {ex.qid for ex in examples}
    scope = [ex for ex in task.examples if ex.qid in asked or ex.qid in answered]
    results, items = score_predictions(task, pred_log.predictions(), examples=scope, run=stats.facts(settings))
    atomic_write_json(out_dir / "metrics.json", results)
    write_jsonl(out_dir / "items.jsonl", items)
    report = out_dir / "report.md"
    write_report(results, report)
    print_summary(results)
    return report


def _device_and_dtype(device: str, dtype: str) -> tuple[str, str]:
    """"auto" resolved: cuda when torch sees a GPU, bfloat16 on a GPU and float32 on the CPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to torch")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def _model_id(model: str) -> str:
    """A model folder as its absolute path (so run.json names it wherever the run starts), a name as given."""
    path = Path(model)
    return str(path.resolve()) if path.exists() else model
