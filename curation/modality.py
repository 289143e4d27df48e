"""Caption-text modality classifier: one readable rule table (YAML), compiled into one regex.

Every cue of every label becomes a named alternative of a single compiled pattern, so a caption
is scanned once by the regex engine in C; Python only looks at the (few) matches, to drop the
negated ones ("no CT findings", "not shown on MRI") and to add up per-label confidence as a
noisy OR of the matched cues' weights. `other` means "none of the five" and is assigned only
when no modality reaches the threshold.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path


from medllava.io import DataError, read_yaml_mapping

LABELS = ("chest_xray", "ct_scan", "mri", "histology", "gross", "other")
MODALITIES = LABELS[:-1]
DEFAULT_RULES = Path(__file__).with_name("modality_rules.yaml")

# Panel markers of a multi-panel figure: "(A)", "(b)", "(A-C)", "(left)", or "A." / "B)" opening a clause.
PANEL = re.compile(
    r"\(\s*(?:[A-Ha-h](?:\s*[-\u2013,&]\s*[A-Ha-h])*|left|right|top|bottom|upper|lower|middle)\s*\)"
    r"|(?:^|(?<=[.;]\s))[A-H][.)]\s", re.IGNORECASE)


@dataclass(frozen=True)
class Cue:
    label: str
    pattern: str
    weight: float
    case: bool = False


@dataclass
class Rules:
    """The rule table: cues per label, negation phrases and the weight of mention evidence."""

    cues: list[Cue] = field(default_factory=list)
    negate_before: list[str] = field(default_factory=list)
    negate_after: list[str] = field(default_factory=list)
    gap_words: int = 2
    mention_weight: float = 0.8


def load_rules(extra: list[str | Path] = ()) -> Rules:
    """The shipped rules, extended by each YAML file in `extra` (later files win on equal patterns)."""
    rules = Rules()
    for path in [DEFAULT_RULES, *extra]:
        _merge(rules, Path(path))
    return rules


def _merge(rules: Rules, path: Path) -> None:
    doc = read_yaml_mapping(path, "'labels', 'negation', 'mention_weight'")
    for label, cues in (doc.get("labels") or {}).items():
        if label not in LABELS:
            raise DataError(f"{path}: labels.{label}: unknown label (expected one of {', '.join(LABELS)})")
        for i, raw in enumerate(cues or []):
            cue = _cue(label, raw, f"{path}: labels.{label}[{i}]")
            rules.cues = [c for c in rules.cues if (c.label, c.pattern) != (label, cue.pattern)] + [cue]
    negation = doc.get("negation") or {}
    for key in ("before", "after"):
        bad = [w for w in negation.get(key, []) if not isinstance(w, str)]
        if bad:
            raise DataError(f"{path}: negation.{key}: {bad!r} are not strings (quote them: YAML reads no as false)")
    rules.negate_before += [w for w in negation.get("before", []) if w not in rules.negate_before]
    rules.negate_after += [w for w in negation.get("after", []) if w not in rules.negate_after]
    rules.gap_words = int(negation.get("gap_words", rules.gap_words))
    rules.mention_weight = float(doc.get("mention_weight", rules.mention_weight))
    for phrase in rules.negate_after:
        _compile(phrase, f"{path}: negation.after")


def _cue(label: str, raw, where: str) -> Cue:
    if not isinstance(raw, dict) or "pattern" not in raw:
        raise DataError(f"{where}: expected {{pattern: ..., weight: ...}}, got {raw!r}")
    pattern, weight = str(raw["pattern"]), raw.get("weight", 0.9)
    if not isinstance(weight, (int, float)) or not 0 < weight <= 1:
        raise DataError(f"{where}: weight must be a number in (0, 1], got {weight!r}")
    compiled = _compile(pattern, where)
    if compiled.groups:
        raise DataError(f"{where}: pattern {pattern!r} has a capturing group; write (?:...) instead")
    return Cue(label, pattern, float(weight), bool(raw.get("case", False)))


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise DataError(f"{where}: pattern {pattern!r} does not compile ({e})") from None


@dataclass
class Result:
    modalities: list[str]
    scores: dict[str, float]
    compound: bool


class ModalityClassifier:
    """Multi-label modality from caption (and mention) text.

    >>> ModalityClassifier(load_rules()).classify("Axial CT of the chest").modalities
    ['ct_scan']
    """

    def __init__(self, rules: Rules, min_confidence: float = 0.5):
        self.rules = rules
        self.min_confidence = min_confidence
        self._cues = rules.cues
        # Case-insensitive cues run on the lower-cased text with lower-cased patterns: an IGNORECASE
        # pattern loses the regex engine's first-character fast path and scans about 3x slower.
        self._scans = [self._scan([i for i, c in enumerate(self._cues) if c.case == case], lower=not case)
                       for case in (False, True)]
        self._single = {idx: rx for scan in self._scans if scan for idx, rx in scan[2]}
        self._which: dict[tuple[bool, str], int] = {}
        negators = sorted(rules.negate_before, key=len, reverse=True)  # longest first: "absence of" before "no"
        words = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in negators)
        gap = r"(?:[^\w.;:!?()\[\]]+(?!(?:and|or|but|with|while|whereas)\b)[\w'-]+)"
        self._negated_before = re.compile(
            rf"(?i)(?<!\w)(?:{words})(?!\w){gap}{{0,{rules.gap_words}}}[^\w.;:!?()\[\]]*$") if words else None
        after = "|".join(f"(?:{p})" for p in rules.negate_after)
        self._negated_after = re.compile(rf"(?i)[^\w.;:!?]*(?:{after})") if after else None

    def _scan(self, indices: list[int], lower: bool):
        """One whole-word pattern over all the given cues (no groups: groups halve the scan speed)."""
        patterns = [_lower_pattern(self._cues[i].pattern) if lower else self._cues[i].pattern for i in indices]
        if not patterns:
            return None
        # Top-level alternatives are spliced in flat: an alternative that opens with a literal lets
        # the engine reject it on the first character, one wrapped in a group does not (~10% faster).
        flat = [alt for p in patterns for alt in _top_level_alternatives(p)]
        master = re.compile(r"(?<!\w)(?:%s)(?!\w)" % "|".join(flat))
        singles = [(i, re.compile(rf"(?:{p})(?!\w)")) for i, p in zip(indices, patterns)]
        return lower, master, singles

    def hits(self, text: str) -> list[tuple[int, int]]:
        """(cue index, start offset) of every cue match in `text` that is not negated."""
        found = []
        lowered = None
        for scan in self._scans:
            if scan is None:
                continue
            lower, master, singles = scan
            if lower:
                lowered = lowered if lowered is not None else text.lower()
            target = lowered if lower else text
            for m in master.finditer(target):
                start = m.start()
                if self._negated_before is not None and self._negated_before.search(target, max(0, start - 60), start):
                    continue
                if self._negated_after is not None and self._negated_after.match(target, m.end()):
                    continue
                found.append((self._cue_of(lower, singles, target, m), start))
        return found

    def _cue_of(self, lower: bool, singles, target: str, m: re.Match) -> int:
        """Which cue a match came from: the first in table order matching there to the same end.

        Matched strings repeat endlessly ("ct", "mri", "h&e"), so the answer is cached per string
        and only re-checked with that one cue's pattern.
        """
        key = (lower, m.group())
        start, end = m.span()
        cached = self._which.get(key)
        if cached is not None:
            hit = self._single[cached].match(target, start)
            if hit is not None and hit.end() == end:
                return cached
        for idx, rx in singles:
            hit = rx.match(target, start)
            if hit is not None and hit.end() == end:
                if len(self._which) > 100_000:
                    self._which.clear()
                self._which[key] = idx
                return idx
        raise AssertionError(f"no cue matches {m.group()!r} on its own")

    def _scores(self, hits: list[tuple[int, int]], scale: float = 1.0) -> dict[str, float]:
        miss: dict[str, float] = {}
        for idx in {i for i, _ in hits}:  # a cue repeated is still one piece of evidence
            cue = self._cues[idx]
            miss[cue.label] = miss.get(cue.label, 1.0) * (1.0 - cue.weight * scale)
        return {label: 1.0 - m for label, m in miss.items()}

    def classify(self, caption: str, mentions: list[str] | tuple = ()) -> Result:
        hits = self.hits(caption) if caption else []
        scores = self._scores(hits)
        if mentions and not any(label != "other" for label in scores):
            mention_hits = [h for text in mentions if text for h in self.hits(text)]
            if mention_hits:
                scores = _noisy_or(scores, self._scores(mention_hits, self.rules.mention_weight))
        labels = decide(scores, self.min_confidence)
        compound = len(labels) > 1 and self._is_compound(caption, hits, labels)
        return Result(labels, finish_scores(scores, labels), compound)

    def _is_compound(self, caption: str, hits: list[tuple[int, int]], labels: list[str]) -> bool:
        """Two or more panels, and the assigned labels first appear in different panels."""
        markers = [m.start() for m in PANEL.finditer(caption)]
        if len(markers) < 2:
            return False
        first_panel: dict[str, int] = {}
        for idx, start in sorted(hits, key=lambda h: h[1]):
            label = self._cues[idx].label
            if label in labels and label not in first_panel:
                first_panel[label] = bisect_right(markers, start)
        return len(set(first_panel.values())) > 1


def _lower_pattern(pattern: str) -> str:
    """Lower-case a regex's literal characters, leaving escapes such as \\W and \\S as they are."""
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "\\":
            out.append(pattern[i:i + 2])
            i += 2
        else:
            out.append(pattern[i].lower())
            i += 1
    return "".join(out)


def _top_level_alternatives(pattern: str) -> list[str]:
    """Split a regex at the `|` that are outside groups and character classes."""
    parts, depth, in_class, start, i = [], 0, False, 0, 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch in "()":
            depth += 1 if ch == "(" else -1
        elif ch == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
        i += 1
    parts.append(pattern[start:])
    try:
        # A class such as []|x] can fool the scan above; then the pattern stays whole.
        for part in parts:
            re.compile(part)
    except re.error:
        return [pattern]
    return parts


def _noisy_or(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: 1.0 - (1.0 - a.get(k, 0.0)) * (1.0 - b.get(k, 0.0)) for k in a.keys() | b.keys()}


def decide(scores: dict[str, float], min_confidence: float) -> list[str]:
    """Labels at or above the threshold in table order; ["other"] when no modality reaches it."""
    labels = [label for label in MODALITIES if scores.get(label, 0.0) >= min_confidence]
    return labels or ["other"]


def finish_scores(scores: dict[str, float], labels: list[str]) -> dict[str, float]:
    """Scores rounded for output; `other` is at least 1 - the best modality score when assigned."""
    out = {label: round(scores[label], 3) for label in LABELS if scores.get(label, 0.0) > 0.0}
    if labels == ["other"]:
        best = max((scores.get(label, 0.0) for label in MODALITIES), default=0.0)
        out["other"] = round(max(scores.get("other", 0.0), 1.0 - best), 3)
    return out
