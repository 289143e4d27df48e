"""Turn teacher replies into clean LLaVA conversation records (pure functions, no I/O).

Parsing: a LLaVA-Med-style reply is a dialogue whose turns start with a role label ("User:",
"Assistant:", and the variants teachers drift into: "Human:", "Q:"/"A:", "**User:**", "- User:");
an ALLaVA-style reply is a JSON object (or "Caption:/Question:/Answer:" sections).

Cleaning works per question-answer pair: a pair whose answer refuses ("I'm sorry", "I cannot see
the image") or whose question or answer gives away that the teacher read text rather than saw
the image ("the caption says", "as mentioned in the text") is dropped with its reason; a
conversation left with no pair is dropped. Lead-in phrases ("Sure! ") are stripped, and the
record gets exactly one `<image>`, at the start of the first human turn.
"""

from __future__ import annotations

import json
import re
from collections import Counter

from medllava.records import GPT, HUMAN, IMAGE_PLACEHOLDER

_HUMAN_LABELS = {"user", "human", "question", "q"}
_ROLE_LABEL = re.compile(
    r"^[ \t]*(?:[-*>#]+[ \t]*)?(?:\d+[.)][ \t]*)?(?:\*\*|__)?[ \t]*"
    r"(?P<role>user|human|question|q|assistant|gpt|ai|answer|a)"
    r"[ \t]*(?:\*\*|__)?[ \t]*[:\uff1a][ \t]*(?:\*\*|__)?",
    re.IGNORECASE | re.MULTILINE)
_SECTION = re.compile(r"^[ \t]*(?:[-*#]+[ \t]*)?(?:\*\*)?[ \t]*(?P<name>caption|question|answer)[ \t]*(?:\*\*)?"
                      r"[ \t]*[:\uff1a][ \t]*(?:\*\*)?", re.IGNORECASE | re.MULTILINE)

# Answers in which the teacher declines or admits it cannot see the figure.
_REFUSAL = re.compile("|".join([
    r"\b(?:I'?m|I am) sorry\b",
    r"\bI apologi[sz]e\b",
    r"\bas an AI\b",
    r"\bas a (?:large )?language model\b",
    r"\bI (?:cannot|can ?not|can't|am unable to|am not able to|(?:do not|don't) have the ability to) "
    r"(?:see|view|access|look at|visuali[sz]e|display|open)\b",
    r"\b(?:do not|don't|cannot|can't) (?:have access to|see) the (?:actual |provided )?(?:image|figure|picture)",
    r"\bwithout (?:seeing|viewing|access to) the (?:actual )?(?:image|figure|picture)",
    r"\bunable to (?:see|view) (?:the |this )?(?:image|figure|picture)",
]), re.IGNORECASE)

# Phrases that show the conversation was written from text, not from looking at the image.
# "the context of" is ordinary medical prose ("in the context of sepsis"), so it is let through.
_SOURCE = r"(?:text|caption|context|description|passage|paper|article|legend|figure legend)"
_CONTEXT_LEAK = re.compile("|".join([
    r"\bcaptions?\b",
    r"\bimage description\b",
    r"\b(?:figure|given|provided|above|accompanying|surrounding) (?:context|text|description|passage)\b",
    r"\b(?:given|provided|above|accompanying|surrounding) information\b",
    r"\bthe context\b(?! of\b)",
    rf"\b(?:mentioned|described|stated|noted|reported|indicated|given|provided) in the {_SOURCE}\b",
    rf"\baccording to the {_SOURCE}\b",
    r"\b(?:based on|from) the (?:text|caption|context|description|passage|legend)\b",
    r"\bthe (?:text|passage|description|legend) (?:says|states|mentions|notes|indicates|suggests)\b",
    r"\bas (?:previously |already )?mentioned\b",
]), re.IGNORECASE)

_LEAD_IN = re.compile(r"^(?:(?:sure|certainly|of course|absolutely|great question|good question|okay|ok)"
                      r"\b[!,.:]*[ \t]*)+", re.IGNORECASE)
_SPACE_BEFORE_PUNCT = re.compile(r" ([.,;:!?])")
_QUOTES = {'"': '"', "\u201c": "\u201d", "'": "'"}

Pair = tuple[str, str]


def parse_dialogue(text: str) -> list[Pair] | None:
    """(question, answer) pairs from a role-labelled reply; None when no complete pair is found.

    Text before the first label (a preamble such as "Here is the conversation:") is ignored,
    consecutive turns of one role are joined, and a trailing unanswered question is dropped.
    """
    labels = list(_ROLE_LABEL.finditer(text))
    turns: list[list[str]] = []
    for i, m in enumerate(labels):
        role = HUMAN if m.group("role").lower() in _HUMAN_LABELS else GPT
        end = labels[i + 1].start() if i + 1 < len(labels) else len(text)
        body = text[m.end():end].strip()
        if turns and turns[-1][0] == role:
            turns[-1][1] = f"{turns[-1][1]}\n{body}".strip()
        elif turns or role == HUMAN:
            turns.append([role, body])
    pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    return pairs or None


def parse_caption_qa(text: str) -> dict[str, str] | None:
    """`{"caption", "question", "answer"}` from a JSON reply (fenced or not) or labelled sections."""
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            obj = json.loads(text[start:end + 1])
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            fields = {str(k).lower(): v for k, v in obj.items()}
            got = {k: fields.get(k) for k in ("caption", "question", "answer")}
            if all(isinstance(v, str) and v.strip() for v in got.values()):
                return {k: v.strip() for k, v in got.items()}
    sections = list(_SECTION.finditer(text))
    got = {}
    for i, m in enumerate(sections):
        end_at = sections[i + 1].start() if i + 1 < len(sections) else len(text)
        got.setdefault(m.group("name").lower(), text[m.end():end_at].strip())
    if all(got.get(k) for k in ("caption", "question", "answer")):
        return {k: got[k] for k in ("caption", "question", "answer")}
    return None


def clean_text(text: str) -> str:
    """Drop stray `<image>` tags, wrapping quotes and markdown bold, and tidy whitespace."""
    text = text.replace(IMAGE_PLACEHOLDER, " ").replace("**", "")
    text = "\n".join(" ".join(line.split()) for line in text.strip().splitlines()).strip()
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    if len(text) > 1 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def strip_lead_in(text: str) -> str:
    """Drop "Sure! ", "Certainly, " and the like from the start of an answer."""
    stripped = _LEAD_IN.sub("", text)
    if not stripped or stripped == text:
        return text
    stripped = clean_text(stripped)  # the rest may be a quoted sentence
    return stripped[:1].upper() + stripped[1:]


def drop_reason(question: str, answer: str) -> str | None:
    """Why a pair must go ("empty", "refusal", "mentions the caption or context"), or None to keep it."""
    if not question or not answer:
        return "empty turn"
    answer_plain = answer.replace("\u2019", "'")
    if _REFUSAL.search(answer_plain):
        return "refusal"
    if _CONTEXT_LEAK.search(question) or _CONTEXT_LEAK.search(answer_plain):
        return "mentions the caption or context"
    return None


def clean_pairs(pairs: list[Pair], dropped: Counter) -> list[Pair]:
    """The pairs worth keeping, cleaned; each dropped pair is counted in `dropped` by reason."""
    kept = []
    for question, answer in pairs:
        question, answer = clean_text(question), strip_lead_in(clean_text(answer))
        reason = drop_reason(question, answer)
        if reason:
            dropped[reason] += 1
        else:
            kept.append((question, answer))
    return kept


def to_record(record_id: str, image: str, pairs: list[Pair]) -> dict:
    """A LLaVA conversation record with `<image>` once, at the start of the first human turn."""
    conversations = []
    for i, (question, answer) in enumerate(pairs):
        conversations.append({"from": HUMAN, "value": f"{IMAGE_PLACEHOLDER}\n{question}" if i == 0 else question})
        conversations.append({"from": GPT, "value": answer})
    return {"id": record_id, "image": image, "conversations": conversations}


def dedupe_key(pairs: list[Pair]) -> tuple[str, ...]:
    """Conversations equal up to case and spacing share a key."""
    return tuple(" ".join(text.lower().split()) for pair in pairs for text in pair)
