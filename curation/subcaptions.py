"""Split a compound figure's caption into the sub-caption of each panel by its panel labels.

Labels are found in four styles: in parentheses ("(A) ...", "(a)", "(A-C)", "(A, B)", "(A and B)"),
bare letters opening a clause ("A, ...", "B. ...", "C: ...", "D) ...", also after "of": "structures of
A, THL and B, ..."), lower-case letters with a parenthesis ("a) ..."), and positions ("Left:",
"(Right)", "Top:", "Bottom panel:"). A range or list ("A-C", "(A–C)", "(A, B)") is one segment
shared by each panel it names. Only labels that continue the sequence A, B, C... (or left, right; top,
bottom) count, so a back-reference ("(C) as in (A)") or an abbreviation ("L, lumen.") stays text.
The style giving the longest sequence wins.

The text before the first label is the shared part, kept with every panel. A caption whose labels
follow their text ("a mass (A) and oedema (B).") is read that way: each label closes its segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Positions in the order panels are read; a caption's positional labels must follow one of them.
POSITIONS = (("left", "middle", "right"), ("left", "center", "right"), ("left", "centre", "right"),
             ("top", "middle", "bottom"), ("upper", "middle", "lower"), ("top", "bottom"),
             ("upper", "lower"), ("left", "right"))
_DASH = r"\s*[-\u2013\u2014]\s*"
_LIST = r"(?:\s*[-\u2013\u2014,&]\s*|\s+and\s+)"
_LABEL = rf"[A-Za-z](?:{_LIST}[A-Za-z])*"
STYLES = {
    "parenthesised": re.compile(rf"\(\s*({_LABEL})\s*\)\s*[:.,]?"),
    "bare": re.compile(rf"(?:^|(?<=[.;:]\s)|(?<=\bof\s)|(?<=\band\s)|(?<=[;,]\s)|(?<=\n))"
                       rf"([A-Z](?:{_LIST}[A-Z])*)(?:[,.:)]\s|\s[-\u2013\u2014]\s)"),
    "lower": re.compile(rf"(?:^|(?<=\s))([a-z](?:{_LIST}[a-z])*)\)\s"),
    "position": re.compile(r"(?:\(\s*|(?:^|(?<=[.;:)]\s)|(?<=[.;:)])|(?<=\n)))"
                           r"(left|right|top|bottom|upper|lower|middle|cent(?:er|re))"
                           r"(?:\s+(?:panel|image|row|column))?\s*(?:\)\s*[:.,]?|:)", re.IGNORECASE),
}


@dataclass(frozen=True)
class Segment:
    """One labelled piece of a caption: the panel labels it names and its text (label removed)."""

    labels: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class SubCaptions:
    """A caption split by its panel labels: the shared text and the labelled segments in caption order."""

    shared: str
    segments: tuple[Segment, ...]
    style: str = ""

    @property
    def labels(self) -> list[str]:
        """Every panel label named, in caption order (a range counts each panel)."""
        return [label for s in self.segments for label in s.labels]

    def caption_for(self, label: str) -> str:
        """The shared text followed by the text of every segment naming `label`."""
        parts = [self.shared] + [s.text for s in self.segments if label in s.labels]
        return " ".join(p for p in parts if p)


def expand(token: str) -> tuple[str, ...]:
    """Panel labels of one label token: "A" -> (A,), "A-C" -> (A, B, C), "a, b and d" -> (a, b, d)."""
    parts = re.split(r"\s*([-\u2013\u2014,&]|\band\b)\s*", token.strip())
    labels: list[str] = [parts[0]]
    for sep, letter in zip(parts[1::2], parts[2::2]):
        if sep in "-\u2013\u2014" and len(letter) == 1 and len(labels[-1]) == 1 and labels[-1] < letter:
            start = LETTERS.index(labels[-1].upper()) + 1
            span = LETTERS[start:LETTERS.index(letter.upper()) + 1]
            labels += [c if letter.isupper() else c.lower() for c in span]
        else:
            labels.append(letter)
    return tuple(labels)


def _in_sequence(labels: tuple[str, ...], nxt: int) -> bool:
    """Whether letter labels continue the sequence at index `nxt` (A=0) with no gaps and in order."""
    indices = [LETTERS.find(label.upper()) for label in labels]
    return indices[0] == nxt and all(b == a + 1 for a, b in zip(indices, indices[1:]))


def letter_markers(caption: str, style: str) -> list[tuple[int, int, tuple[str, ...]]]:
    """(start, end, labels) of the markers of one letter style that continue A, B, C... in order."""
    chosen, nxt = [], 0
    for m in STYLES[style].finditer(caption):
        labels = expand(m.group(1))
        if _in_sequence(labels, nxt):
            chosen.append((m.start(), m.end(), labels))
            nxt += len(labels)
    return chosen


def position_markers(caption: str) -> list[tuple[int, int, tuple[str, ...]]]:
    """(start, end, (position,)) of positional labels that follow one of the POSITIONS orders."""
    found = [(m.start(), m.end(), m.group(1).lower()) for m in STYLES["position"].finditer(caption)]
    best: list = []
    for order in POSITIONS:
        chosen, nxt = [], 0
        for start, end, word in found:
            if nxt < len(order) and word in order[nxt:]:
                if word != order[nxt] and order != ("left", "right"):
                    continue  # a three-position order must not skip its middle
                chosen.append((start, end, (word,)))
                nxt = order.index(word) + 1
        if len(chosen) > len(best):
            best = chosen
    return best


def _clean(text: str) -> str:
    """Whitespace collapsed; the joining words and commas a label left at either end removed."""
    text = re.sub(r"\s+", " ", text).strip(" ;,")
    return re.sub(r"^(?:and|or)\s+|\s+(?:and|or)$", "", text).strip(" ;,")


def _is_trailing(caption: str, markers: list) -> bool:
    """Labels follow their text: the caption ends right after the last label."""
    rest = caption[markers[-1][1]:]
    return not re.sub(r"[\s.;,:)]", "", rest) and markers[0][0] > 0


def _segments(caption: str, markers: list, trailing: bool) -> tuple[str, list[Segment]]:
    if not trailing:
        shared = _clean(caption[:markers[0][0]])
        ends = [m[0] for m in markers[1:]] + [len(caption)]
        return shared, [Segment(m[2], _clean(caption[m[1]:end])) for m, end in zip(markers, ends)]
    starts = [0] + [m[1] for m in markers[:-1]]
    first = caption[:markers[0][0]]
    # The sentences before the one holding the first label are shared by every panel.
    cut = max((m.end() for m in re.finditer(r"[.!?]\s+", first)), default=0)
    starts[0] = cut
    segments = [Segment(m[2], _clean(caption[s:m[0]])) for m, s in zip(markers, starts)]
    return _clean(first[:cut]), segments


def split_caption(caption: str) -> SubCaptions:
    """The caption's shared text and labelled segments; no segments when fewer than two labels are found."""
    candidates = {style: letter_markers(caption, style) for style in ("parenthesised", "bare", "lower")}
    candidates["position"] = position_markers(caption)
    style, markers = max(candidates.items(), key=lambda kv: sum(len(m[2]) for m in kv[1]))
    if sum(len(m[2]) for m in markers) < 2:
        return SubCaptions(_clean(caption), ())
    shared, segments = _segments(caption, markers, _is_trailing(caption, markers))
    return SubCaptions(shared, tuple(segments), style)
