"""`medllava curate instruct`: teacher-written instruction conversations about PMC figures.

Two methods:
- `llava-med` (LLaVA-Med): a text-only teacher reads a figure's caption (and, for the 60k-im
  variant, the article sentences that cite it), never the image, and writes a multi-turn
  conversation in which an assistant answers questions as if it saw the figure. Few-shot
  examples steer the style: the shipped set (curation/teacher_prompts/llava_med.yaml) or `--few-shot`.
- `allava` (ALLaVA): a vision-capable teacher is sent the image (base64 JPEG) with the authors'
  caption as a hint, and in one call writes a detailed caption, a complex question and a
  detailed answer; each figure gives a caption record and a question-answer record.

Variants, as in LLaVA-Med's ablation of its instruction data:
- `10k`: 10,000 figures, the teacher sees the caption only.
- `60k`: 60,000 figures, caption only.
- `60k-im`: 60,000 figures, caption plus inline mentions (the body sentences citing the
  figure); the richest context and LLaVA-Med's best-scoring set.
The figures are drawn at random (`--seed`) from the input; `--limit` caps the count for a trial run.

Every reply is appended to a request cache (default `<out>.cache.jsonl`) the moment it arrives,
so rerunning a killed run sends only the requests that never got an answer. The output is
written once, atomically, at the end.
"""

from __future__ import annotations

import argparse
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from medllava.curation import instruct_parse as parse
from medllava.curation import teacher_messages as prompts_lib
from medllava.curation.common import StepReport, clear_stale_temps, iter_figure_records
from medllava.io import write_jsonl
from medllava.llm_client import ChatClient, ChatRequest, ClientConfig, EndpointError
from medllava.records import RecordError, check_image_path, normalize_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    size: int
    """How many figures the set is drawn from."""
    mentions: bool
    """Whether the teacher also reads the sentences that cite the figure."""


VARIANTS = {"10k": Variant(10_000, False), "60k": Variant(60_000, False), "60k-im": Variant(60_000, True)}
METHODS = ("llava-med", "allava")


@dataclass(frozen=True)
class InstructOptions:
    method: str = "llava-med"
    variant: str = "60k-im"
    image_root: Path | None = None
    few_shot: Path | None = None
    limit: int | None = None
    seed: int = 0
    temperature: float = 0.7
    max_tokens: int = 1024

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose from {', '.join(VARIANTS)}")
        if self.method == "allava" and self.image_root is None:
            raise ValueError("--method allava sends the images: give --image-root")
        if self.method == "allava" and self.few_shot is not None:
            raise ValueError("--few-shot applies to --method llava-med only")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")

    @property
    def sample_size(self) -> int:
        return self.limit if self.limit is not None else VARIANTS[self.variant].size


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "instruct", help="teacher-written instruction conversations (LLaVA-Med or ALLaVA method)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="in_path", type=Path, required=True, help="figure records (JSONL)")
    p.add_argument("--out", type=Path, required=True, help="LLaVA conversation records to write (JSONL)")
    p.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    p.add_argument("--model", required=True, help="teacher model name")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="name of the environment variable holding the API key ('' for none)")
    p.add_argument("--method", choices=METHODS, default="llava-med")
    p.add_argument("--variant", choices=list(VARIANTS), default="60k-im")
    p.add_argument("--image-root", type=Path, help="folder the records' image paths are relative to "
                   "(needed by allava; with llava-med, figures whose file is missing are skipped)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    p.add_argument("--cache", type=Path, help="request cache (default: <out> with .cache.jsonl)")
    p.add_argument("--few-shot", type=Path, help="few-shot examples (LLaVA-Med's JSON format or ours)")
    p.add_argument("--limit", type=int, help="use at most this many figures (default: the variant's size)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing figures and caption instructions")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per attempt")
    p.add_argument("--max-attempts", type=int, default=6, help="attempts per request before giving up")
    p.add_argument("--price-prompt", type=float, default=0.0, help="price per 1K prompt tokens")
    p.add_argument("--price-completion", type=float, default=0.0, help="price per 1K completion tokens")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    opts = InstructOptions(method=args.method, variant=args.variant, image_root=args.image_root,
                           few_shot=args.few_shot, limit=args.limit, seed=args.seed,
                           temperature=args.temperature, max_tokens=args.max_tokens)
    config = ClientConfig(base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
                          concurrency=args.concurrency, timeout_s=args.timeout, max_attempts=args.max_attempts,
                          price_prompt_per_1k=args.price_prompt, price_completion_per_1k=args.price_completion)
    if not args.in_path.is_file():
        raise FileNotFoundError(f"input file not found: {args.in_path}")
    cache = args.cache or args.out.with_name(args.out.stem + ".cache.jsonl")
    clear_stale_temps([args.out])  # the cache is append-only (JsonlLog) and leaves no temporaries
    with ChatClient(config, cache_path=cache) as client:
        report = generate(args.in_path, args.out, client, opts)
    print(report.summary())
    print(f"  teacher: {client.stats.summary()}")
    if report.written == 0:
        print(f"no conversations written to {args.out}")
        return 1
    return 0


def generate(in_path: Path, out_path: Path, client: ChatClient, opts: InstructOptions) -> StepReport:
    """Draw figures, ask the teacher about each, clean the replies and write the records."""
    # Prompt files are read first so a bad --few-shot file fails before any figure is read.
    prompts = prompts_lib.load_prompts("llava_med.yaml" if opts.method == "llava-med" else "allava.yaml")
    few_shot = prompts_lib.load_few_shot(opts.few_shot) if opts.method == "llava-med" else []
    report = StepReport("instruct", unit="figures")
    figures = select_figures(in_path, opts, report)
    log.info("asking the teacher about %d figures (%s, variant %s)", len(figures), opts.method, opts.variant)
    replies = {}
    try:
        with tqdm(total=len(figures), unit="fig", desc="instruct", disable=None) as bar:
            for result in client.run(iter_requests(figures, opts, prompts, few_shot, report)):
                replies[result.key] = result
                bar.update()
    except EndpointError:
        log.error("stopped after %d replies (%s); rerun the same command to resume from %s",
                  len(replies), client.stats.summary(), client.cache.path if client.cache else "nowhere")
        raise
    records = build_records(figures, replies, opts, prompts, report)
    report.written = write_jsonl(out_path, records)
    return report


def select_figures(path: Path, opts: InstructOptions, report) -> list[dict]:
    """Usable figure records, a seeded random sample of `opts.sample_size`, in input order."""
    rng = random.Random(opts.seed)
    chosen: list[tuple[int, dict]] = []
    seen_ids: set[str] = set()
    usable = 0
    for figure in iter_figure_records(path, report):
        fid = str(figure["id"])
        caption, image = figure.get("caption"), figure.get("image")
        if not isinstance(caption, str) or not caption.strip():
            report.skip("no caption", fid)
            continue
        try:
            figure["image"] = check_image_path(image) if image else None
        except ValueError as e:
            report.skip("bad image path", f"{fid}: {e}")
            continue
        if not figure["image"]:
            report.skip("no image", fid)
            continue
        if fid in seen_ids:
            report.skip("duplicate id", fid)
            continue
        seen_ids.add(fid)
        # Reservoir sampling: one pass, a uniform sample, memory bounded by the sample size.
        if len(chosen) < opts.sample_size:
            chosen.append((usable, figure))
        else:
            j = rng.randrange(usable + 1)
            if j < opts.sample_size:
                chosen[j] = (usable, figure)
        usable += 1
    if usable > len(chosen):
        report.note("usable figures not drawn", usable - len(chosen))
    return [figure for _, figure in sorted(chosen, key=lambda item: item[0])]


def iter_requests(figures: list[dict], opts: InstructOptions, prompts: dict, few_shot: list, report):
    """One ChatRequest per figure; figures whose image is missing or unreadable are skipped and counted."""
    params = {"temperature": opts.temperature, "max_tokens": opts.max_tokens}
    with_mentions = VARIANTS[opts.variant].mentions
    for figure in figures:
        fid, image = str(figure["id"]), figure["image"]
        path = opts.image_root / image if opts.image_root else None
        if opts.method == "llava-med":
            if path is not None and not path.is_file():
                report.skip("image file missing", str(path))
                continue
            messages = prompts_lib.llava_med_messages(figure, with_mentions, prompts, few_shot)
        else:
            try:
                messages = prompts_lib.allava_messages(figure, prompts_lib.image_data_url(path), prompts)
            except OSError as e:
                report.skip("image unreadable", str(e))
                continue
        yield ChatRequest(fid, messages, params)


def build_records(figures: list[dict], replies: dict, opts: InstructOptions, prompts: dict, report) -> list[dict]:
    """Parse and clean each reply into records, in figure order, dropping duplicates."""
    dropped_pairs: Counter = Counter()
    seen: set[tuple[str, ...]] = set()
    records = []
    for figure in figures:
        fid = str(figure["id"])
        result = replies.get(fid)
        if result is None:
            continue  # skipped before any request was made, and counted then
        if not result.ok:
            report.skip("teacher request failed", f"{fid}: {result.error}")
            continue
        if opts.method == "llava-med":
            candidates = _dialogue_candidates(fid, result, report)
        else:
            pick = random.Random(f"{opts.seed}:{fid}").choice(prompts["caption_instructions"])
            candidates = _caption_qa_candidates(fid, result.text, pick, report)
        for rid, pairs in candidates:
            kept = parse.clean_pairs(pairs, dropped_pairs)
            if not kept:
                report.skip("no usable turn left", rid)
                continue
            key = parse.dedupe_key(kept)
            if key in seen:
                report.skip("duplicate conversation", rid)
                continue
            try:
                records.append(normalize_record(parse.to_record(rid, figure["image"], kept), "instruct"))
            except RecordError as e:
                report.skip("invalid record", str(e))
                continue
            seen.add(key)
    for reason, n in dropped_pairs.items():
        report.note(f"question-answer pairs dropped ({reason})", n)
    return records


def _dialogue_candidates(fid: str, result, report) -> list[tuple[str, list]]:
    pairs = parse.parse_dialogue(result.text)
    if pairs is None:
        report.skip("unparseable reply", f"{fid}: {result.text[:80]!r}")
        return []
    if result.finish_reason == "length":
        # The reply hit max_tokens, so its last answer is cut off mid-sentence.
        pairs = pairs[:-1]
        report.note("truncated replies (last pair dropped)")
    return [(fid, pairs)]


def _caption_qa_candidates(fid: str, text: str, instruction: str, report) -> list[tuple[str, list]]:
    parsed = parse.parse_caption_qa(text)
    if parsed is None:
        report.skip("unparseable reply", f"{fid}: {text[:80]!r}")
        return []
    return [(f"{fid}_caption", [(instruction, parsed["caption"])]),
            (f"{fid}_qa", [(parsed["question"], parsed["answer"])])]
