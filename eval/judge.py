"""The LLaVA-Med chat benchmark: a judge model rates a reference answer and a candidate answer.

    medllava eval chat-judge --questions llava_med_eval_qa50_qa.jsonl --answers answers.jsonl \\
        --base-url https://api.openai.com/v1 --model gpt-4o --out runs/chat/gpt4o.json

Inputs, in the release's own formats:
  questions  LLaVA-Med's 193-question file: JSONL rows {question_id, text (question + "<image>"),
             gpt4_answer, fig_caption, fig_label, in_text_mention: [{tokens, ...}], domain: {name:
             bool}, type: conversation | detailed_description, pair_id}
  captions   optional: LLaVA-Med's figure records ({domain: [record, ...]} or a list), keyed by
             pair_id; a record found there gives the caption and the citing sentences, else the
             question row's own fields are used
  answers    the candidate: {question_id, text} (LLaVA-Med answer files) or {qid, prediction}
  reference  optional, same formats; default: each question's gpt4_answer

The judge sees the figure caption, the sentences of the paper that cite the figure, the
question and both answers (reference first, as in LLaVA's GPT-4 review), and is asked for a
first line holding two scores from 1 to 10. Replies are parsed leniently ("8 7", "8, 7",
"Answer 1: 8  Answer 2: 7", "**8** **7**"); replies without two scores in range are counted
as unparseable and left out of the means.

Relative score = mean(candidate) / mean(reference) x 100, overall, per question type and per
domain (a question's domain is the first of chest_xray, mri, histology, gross, ct_scan that its
flags set, the order LLaVA-Med's summary uses). LLaVA-Med's own summary averages per-question
ratios instead; that number is reported beside it as `mean_of_ratios`.

Every reply is cached beside the output (`<out>.cache.jsonl`), so a killed run resumes without
paying twice; per-question reviews go to `<out>.reviews.jsonl`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DOMAINS = ("chest_xray", "mri", "histology", "gross", "ct_scan")
SCORE_RANGE = (1.0, 10.0)
SYSTEM_PROMPT = ("You review answers to questions about figures from biomedical papers. You are exact, "
                 "fair and consistent, and you follow the requested output format.")
TASK_PROMPT = (
    "You cannot see the figure; its caption and the sentences that cite it stand in for it. Rate each "
    "answer for how helpful, relevant, accurate and detailed it is, as one overall score from 1 to 10 "
    "(higher is better).\n"
    "Write the two scores alone on the first line, the score of answer 1 first, separated by a space. "
    "From the second line on, explain the scores. Judge the content only: neither the order in which "
    "the answers appear nor their length should sway you."
)
JUDGE_PARAMS = {"temperature": 0.0, "max_tokens": 1024}
_LABEL = re.compile(r"\b(?:assistant|answer|score|response)\s*[12]?\s*[:=]?", re.I)
_OUT_OF_TEN = re.compile(r"\s*/\s*10\b")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?!\w|\.\d)")


@dataclass(frozen=True)
class ChatQuestion:
    """One question of the chat benchmark with the figure text the judge sees."""

    qid: str
    question: str
    type: str
    domain: str
    caption: str
    label: str
    mentions: tuple[str, ...]
    reference: str | None


def parse_scores(reply: str) -> tuple[float, float] | None:
    """(reference score, candidate score) from the reply's first non-blank line, or None."""
    line = next((ln for ln in reply.splitlines() if ln.strip()), "")
    line = _OUT_OF_TEN.sub(" ", _LABEL.sub(" ", line.replace("*", " ")))
    numbers = [float(n) for n in _NUMBER.findall(line)]
    if len(numbers) != 2 or not all(SCORE_RANGE[0] <= n <= SCORE_RANGE[1] for n in numbers):
        return None
    return numbers[0], numbers[1]


def domain_of(flags) -> str:
    """The first of DOMAINS that a question's `domain` flags set, else "unknown"."""
    if isinstance(flags, dict):
        for name in DOMAINS:
            if flags.get(name):
                return name
    return "unknown"


def _mentions(value) -> tuple[str, ...]:
    """The citing sentences of an `in_text_mention` list ({tokens, entities} items, or plain strings)."""
    if not isinstance(value, list):
        return ()
    items = (m.get("tokens") if isinstance(m, dict) else m for m in value)
    return tuple(" ".join(t.split()) for t in items if isinstance(t, str) and t.strip())


def load_captions(path: Path) -> dict[str, dict]:
    """pair_id -> figure record, from LLaVA-Med's {domain: [records]} file or a plain list."""
    from medllava.io import DataError

    from medllava.eval.tasks.formats import json_object

    obj = json_object(path)
    groups = obj.items() if isinstance(obj, dict) else [(None, obj)]
    out: dict[str, dict] = {}
    for group, records in groups:
        if not isinstance(records, list):
            raise DataError(f"{path}: group {group!r} is not a list of figure records")
        for i, rec in enumerate(records):
            if not isinstance(rec, dict) or not isinstance(rec.get("pair_id"), str):
                raise DataError(f"{path}: group {group!r} record {i}: expected an object with a pair_id")
            out.setdefault(rec["pair_id"], {**rec, "_group": group})
    return out


def load_questions(path: Path, captions: dict[str, dict] | None = None) -> tuple[list[ChatQuestion], list[str]]:
    """The benchmark's questions and the messages of rows that could not be used (skipped, not fatal)."""
    from medllava.io import DataError

    from medllava.eval.tasks.formats import ERROR_KEY, json_records

    questions, skipped, seen = [], [], set()
    for where, row in json_records(path):
        try:
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object")
            if ERROR_KEY in row:
                raise DataError(row[ERROR_KEY])
            q = _question(row, where, captions or {})
            if q.qid in seen:
                raise DataError(f"{where}: duplicate question_id {q.qid!r}")
        except DataError as e:
            skipped.append(str(e))
            continue
        seen.add(q.qid)
        questions.append(q)
    if not questions:
        raise DataError(f"{path}: no usable questions" + (f" (first problem: {skipped[0]})" if skipped else ""))
    return questions, skipped


def _question(row: dict, where: str, captions: dict[str, dict]) -> ChatQuestion:
    from medllava.io import DataError

    qid, text = row.get("question_id"), row.get("text")
    if qid is None or isinstance(qid, (dict, list, bool)):
        raise DataError(f"{where}: missing or invalid question_id")
    if not isinstance(text, str) or not text.replace("<image>", "").strip():
        raise DataError(f"{where}: missing question text")
    fig = captions.get(row.get("pair_id")) or row
    caption = fig.get("fig_caption") or row.get("fig_caption")
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{where}: no figure caption for question {qid} (pair_id {row.get('pair_id')!r})")
    domain = domain_of(row.get("domain"))
    if domain == "unknown":
        domain = domain_of(fig.get("domain")) if fig.get("domain") else (fig.get("_group") or "unknown")
    reference = row.get("gpt4_answer")
    return ChatQuestion(
        qid=str(qid).strip(), question=text.replace("<image>", "").strip(), type=str(row.get("type") or "unknown"),
        domain=domain, caption=caption.strip(), label=str(fig.get("fig_label") or row.get("fig_label") or "Figure"),
        mentions=_mentions(fig.get("in_text_mention") or row.get("in_text_mention")),
        reference=reference if isinstance(reference, str) and reference.strip() else None,
    )


def judge_messages(q: ChatQuestion, reference: str, candidate: str) -> list[dict]:
    """The chat messages asking the judge to rate `reference` (answer 1) and `candidate` (answer 2)."""
    cited = "\n".join(f"- {m}" for m in q.mentions) or "- (the paper's text does not cite the figure)"
    user = (f"[Figure]\n{q.label}: {q.caption}\n\n[Sentences citing the figure]\n{cited}\n\n"
            f"[Question]\n{q.question}\n\n"
            f"[Answer 1]\n{reference}\n[End of answer 1]\n\n[Answer 2]\n{candidate}\n[End of answer 2]\n\n"
            f"[Task]\n{TASK_PROMPT}")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def summarize(reviews: list[dict]) -> dict:
    """{group: {n, reference_mean, candidate_mean, relative_score, mean_of_ratios}} over scored reviews.

    Groups: "overall", then each question type and each domain.
    """
    scored = [r for r in reviews if r.get("scores") is not None]
    groups: dict[str, list[dict]] = {"overall": scored}
    for key in ("type", "domain"):
        for r in sorted(scored, key=lambda r: r[key]):
            groups.setdefault(r[key], []).append(r)
    out = {}
    for name, rows in groups.items():
        if not rows:
            out[name] = {"n": 0, "reference_mean": None, "candidate_mean": None, "relative_score": None,
                         "mean_of_ratios": None}
            continue
        ref = [r["scores"][0] for r in rows]
        cand = [r["scores"][1] for r in rows]
        ref_mean, cand_mean = sum(ref) / len(ref), sum(cand) / len(cand)
        out[name] = {"n": len(rows), "reference_mean": ref_mean, "candidate_mean": cand_mean,
                     "relative_score": 100 * cand_mean / ref_mean,
                     "mean_of_ratios": 100 * sum(c / r for r, c in zip(ref, cand)) / len(rows)}
    return out


def register(subparsers) -> None:
    """Add `chat-judge` to the `medllava eval` subcommands."""
    p = subparsers.add_parser(
        "chat-judge",
        help="LLaVA-Med chat benchmark: a judge model rates candidate answers against reference answers",
        description="Rate a model's answers to LLaVA-Med's chat questions against reference answers with a "
                    "judge model behind an OpenAI-compatible API; reports the relative score overall, per "
                    "question type and per domain.",
    )
    p.add_argument("--questions", required=True, type=Path,
                   help="LLaVA-Med question file (llava_med_eval_qa50_qa.jsonl)")
    p.add_argument("--captions", type=Path, help="LLaVA-Med figure records (llava_med_eval_qa50_fig_captions.json); "
                   "default: the captions in the question rows")
    p.add_argument("--answers", required=True, type=Path,
                   help="candidate answers ({question_id, text} or {qid, prediction})")
    p.add_argument("--reference", type=Path, help="reference answers in the same formats (default: gpt4_answer)")
    p.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint root, e.g. https://api.openai.com/v1")
    p.add_argument("--model", required=True, help="judge model name")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default OPENAI_API_KEY; '' for none)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--out", required=True, type=Path, help="summary JSON; reviews and the reply cache go beside it")
    p.set_defaults(func=run)


def _answers(path: Path) -> dict[str, str]:
    """question id -> answer text, from a prediction file of either format."""
    from medllava.eval.predictions import read_predictions

    return {p.id: p.text for p in read_predictions(path).rows}


def _requests(questions, candidates, references, counts):
    """One judge request per question with both answers; the others are counted in `counts`."""
    from medllava.llm_client import ChatRequest

    for q in questions:
        reference = references.get(q.qid) if references is not None else q.reference
        if reference is None:
            counts["no_reference"].append(q.qid)
        elif q.qid not in candidates:
            counts["no_answer"].append(q.qid)
        else:
            yield ChatRequest(q.qid, judge_messages(q, reference, candidates[q.qid]), dict(JUDGE_PARAMS))


def judge(questions: list[ChatQuestion], candidates: dict[str, str], references: dict[str, str] | None,
          client) -> tuple[list[dict], dict]:
    """Ask the judge about every question that has both answers; returns (reviews, counts)."""
    counts: dict[str, list[str]] = {"no_answer": [], "no_reference": [], "failed": [], "unparseable": []}
    by_qid = {q.qid: q for q in questions}
    reviews = {}
    for result in client.run(_requests(questions, candidates, references, counts)):
        q = by_qid[result.key]
        scores = parse_scores(result.text) if result.ok else None
        if not result.ok:
            counts["failed"].append(q.qid)
        elif scores is None:
            counts["unparseable"].append(q.qid)
        reviews[q.qid] = {"question_id": q.qid, "type": q.type, "domain": q.domain,
                          "scores": list(scores) if scores else None, "review": result.text, "error": result.error}
    ordered = [reviews[q.qid] for q in questions if q.qid in reviews]
    return ordered, counts


def run(args: argparse.Namespace) -> int:
    """Judge every question with both answers, write the summary and reviews, and print the scores."""
    from medllava.io import atomic_write_json, write_jsonl
    from medllava.llm_client import ChatClient, ClientConfig

    from medllava.eval.report import table

    captions = load_captions(args.captions) if args.captions else None
    questions, skipped = load_questions(args.questions, captions)
    candidates = _answers(args.answers)
    references = _answers(args.reference) if args.reference else None
    unknown = sorted(set(candidates) - {q.qid for q in questions})
    if unknown:
        log.warning("%s: %d answers to question ids not in %s (e.g. %s); ignored",
                    args.answers, len(unknown), args.questions, unknown[0])
    config = ClientConfig(base_url=args.base_url, model=args.model, api_key_env=args.api_key_env or None,
                          concurrency=args.concurrency)
    stem = args.out.with_suffix("")
    with ChatClient(config, cache_path=stem.with_name(stem.name + ".cache.jsonl")) as client:
        reviews, counts = judge(questions, candidates, references, client)
        usage = client.stats.summary()
    summary = summarize(reviews)
    result = {"questions": str(args.questions), "answers": str(args.answers),
              "reference": str(args.reference) if args.reference else "gpt4_answer", "judge": args.model,
              "n_questions": len(questions), "n_judged": len(reviews),
              "n_scored": summary["overall"]["n"], "skipped_question_rows": skipped,
              **counts, "usage": usage, "scores": summary}
    reviews_path = stem.with_name(stem.name + ".reviews.jsonl")
    write_jsonl(reviews_path, reviews)
    atomic_write_json(args.out, result)
    for name, qids in counts.items():
        if qids:
            log.warning("%d questions %s (first: %s)", len(qids), name.replace("_", " "), qids[0])
    outcome = judged_summary(len(questions), reviews, counts)
    if summary["overall"]["n"] == 0:
        # Means over nothing are no result: say why in one line and fail the command.
        print(f"medllava: error: chat-judge scored no answer: {outcome}; see {reviews_path}", file=sys.stderr)
        return 1
    rows = [(name, s["n"], _num(s["reference_mean"]), _num(s["candidate_mean"]), _num(s["relative_score"], 1),
             _num(s["mean_of_ratios"], 1)) for name, s in summary.items()]
    print(table(("group", "n", "reference", "candidate", "relative %", "mean of ratios %"), rows))
    print(f"judged: {outcome}")
    print(f"judge usage: {usage}")
    print(f"wrote {args.out}, {reviews_path}")
    return 0


def judged_summary(n_questions: int, reviews: list[dict], counts: dict[str, list[str]]) -> str:
    """One line: how many questions were scored, and how many were lost to each cause (first error named)."""
    n_scored = sum(1 for r in reviews if r.get("scores") is not None)
    parts = [f"{n_scored} of {n_questions} questions scored"]
    for name, qids in counts.items():
        if qids:
            parts.append(f"{len(qids)} {name.replace('_', ' ')}")
    first_error = next((r["error"] for r in reviews if r.get("error")), None)
    if first_error:
        parts.append(f"first failure: {' '.join(first_error.split())[:200]}")
    return ", ".join(parts)


def _num(value: float | None, digits: int = 2) -> str:
    """A number with `digits` decimals, "n/a" for None."""
    return "n/a" if value is None else f"{value:.{digits}f}"
