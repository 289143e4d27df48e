"""PMC Open Access JATS articles to figure records: ids, label, caption, graphic, licence, mentions.

Works on the bytes of one `.nxml` file, so the caller decides where articles come from (loose
files or OA `.tar.gz` packages). Both the 2007 NLM archiving DTD and JATS 1.x are read: tags are
matched by local name, so a default namespace or `xlink:`/`ali:` prefixes make no difference.

Figures are `<fig>` elements (also inside `<fig-group>` and `<floats-group>`) and captioned
`<graphic>` elements standing outside any figure or table. Mentions are the body sentences whose
`<xref ref-type="fig">` cites the figure; a rid listing several ids cites each of them, and a
citation of a `<fig-group>` cites every figure in it.

Every tree walk here is a loop over an explicit stack, never Python recursion: an article nested
thousands of elements deep (hostile or broken) costs time and memory in proportion to its size,
and never a RecursionError.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from bisect import bisect_right
from dataclasses import dataclass, field
from xml.parsers import expat

XLINK_HREF = "{http://www.w3.org/1999/xlink}href"
# Elements whose text never belongs to the running body text of a paragraph.
FLOATS = {"fig", "fig-group", "table-wrap", "table-wrap-group", "supplementary-material", "graphic",
          "media", "boxed-text", "chem-struct-wrap", "disp-formula"}
# Floats whose graphics are not figures.
TABLE_LIKE = {"table-wrap", "table-wrap-group", "supplementary-material", "chem-struct-wrap", "disp-formula"}
# Elements that start a new block; their text is separated from the neighbours by a space.
BLOCKS = {"p", "title", "list-item", "def-item", "td", "th", "label", "caption", "disp-quote"}


# Real articles hold tens of thousands of elements; a parsed element costs ~100-200 bytes, so this
# bounds the tree's memory whatever the file holds.
MAX_ELEMENTS = 1_000_000


class UnsafeXMLError(ValueError):
    """The document declares entities (the vector for entity-expansion and external-entity attacks)."""


class ArticleTooLargeError(ValueError):
    """The document holds more elements than any real article (MAX_ELEMENTS)."""


@dataclass
class Figure:
    """One figure as found in an article; `href` is the graphic's xlink:href, without extension."""

    figure_id: str
    label: str | None
    caption: str
    href: str | None
    mentions: list[str] = field(default_factory=list)


@dataclass
class Article:
    pmcid: str | None
    pmid: str | None
    licence: str | None
    figures: list[Figure]


class _StopAtRoot(Exception):
    pass


def _check_prolog(data: bytes) -> None:
    """Refuse documents that declare entities, reading only up to the root element.

    Entity declarations can only sit in the DTD, which is all before the root element, so a
    cheap expat pass over the prolog is enough; the full parse then uses the C tree builder.
    External DTDs (the usual `archivearticle.dtd`) are never fetched: expat does not load them.
    """
    parser = expat.ParserCreate()

    def refuse(*_args):
        raise UnsafeXMLError("the document declares XML entities; refusing to expand them")

    def stop(*_args):
        raise _StopAtRoot

    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.StartElementHandler = stop
    try:
        parser.Parse(data, True)
    except _StopAtRoot:
        return


def parse_xml(data: bytes) -> ET.Element:
    """Parse untrusted XML safely; raises UnsafeXMLError, ArticleTooLargeError or ET.ParseError."""
    _check_prolog(data)
    # Start tags (an upper bound on the elements), counted before building any.
    elements = data.count(b"<") - data.count(b"</")
    if elements > MAX_ELEMENTS:
        raise ArticleTooLargeError(f"{elements} elements, more than the {MAX_ELEMENTS} any real article holds")
    parser = ET.XMLParser()
    parser.feed(data)
    return parser.close()


def local(tag) -> str:
    """Tag name without namespace (comments and processing instructions give '')."""
    if not isinstance(tag, str):
        return ""
    return tag.rsplit("}", 1)[-1]


def _href(el: ET.Element) -> str | None:
    for key, value in el.attrib.items():
        if key == XLINK_HREF or local(key) == "href":
            return value.strip() or None
    return None


def squash(text: str) -> str:
    """Collapse every run of whitespace (newlines, hair spaces, tabs) into one space."""
    return " ".join(text.split())


def flat_text(el: ET.Element | None, skip: frozenset[str] = frozenset()) -> str:
    """The element's text with markup flattened; children named in `skip` are left out."""
    if el is None:
        return ""
    parts: list[str] = []
    # Items are elements still to open or strings to emit, so the walk needs no recursion.
    stack: list[ET.Element | str] = [el]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            parts.append(item)
            continue
        name = local(item.tag)
        block = name in BLOCKS
        if block:
            parts.append(" ")
            stack.append(" ")
        if item.text and name:
            parts.append(item.text)
        for child in reversed(item):
            if child.tail:
                stack.append(child.tail)
            if local(child.tag) not in skip:
                stack.append(child)
    return squash("".join(parts))


def caption_text(title: str, text: str) -> str:
    """Title and caption text as one string; a title without end punctuation gets a period."""
    if title and text:
        sep = " " if title[-1] in ".:;!?" else ". "
        return title + sep + text
    return title or text


def parse_article(data: bytes) -> Article:
    """Parse one JATS/NLM article into its ids, licence and figures (with mentions)."""
    root = parse_xml(data)
    if local(root.tag) != "article":
        raise ValueError(f"root element is <{local(root.tag)}>, not <article>")
    ids = _article_ids(root)
    figures, group_members = _figures(root)
    _attach_mentions(root, figures, group_members)
    return Article(pmcid=ids.get("pmc"), pmid=ids.get("pmid"), licence=_licence(root), figures=figures)


def _article_ids(root: ET.Element) -> dict[str, str]:
    ids: dict[str, str] = {}
    front = next((el for el in root if local(el.tag) == "front"), root)
    for el in front.iter():
        if local(el.tag) != "article-id" or not (el.text or "").strip():
            continue
        kind = el.get("pub-id-type", "")
        value = el.text.strip()
        if kind in ("pmc", "pmcid"):
            ids.setdefault("pmc", value if value.upper().startswith("PMC") else f"PMC{value}")
        elif kind == "pmid":
            ids.setdefault("pmid", value)
    return ids


# Licence URL paths and licence-text phrases to short names; more specific entries first.
_LICENCE_URLS = [("publicdomain/zero", "CC0"), ("publicdomain/mark", "Public domain"),
                 ("licenses/by-nc-nd", "CC BY-NC-ND"), ("licenses/by-nc-sa", "CC BY-NC-SA"),
                 ("licenses/by-nc", "CC BY-NC"), ("licenses/by-nd", "CC BY-ND"),
                 ("licenses/by-sa", "CC BY-SA"), ("licenses/by", "CC BY")]
_LICENCE_TEXT = [("noncommercial-noderivs", "CC BY-NC-ND"), ("noncommercial-no derivs", "CC BY-NC-ND"),
                 ("noncommercial-sharealike", "CC BY-NC-SA"), ("noncommercial", "CC BY-NC"),
                 ("noderivs", "CC BY-ND"), ("sharealike", "CC BY-SA"),
                 ("creative commons attribution", "CC BY"), ("cc0", "CC0"), ("public domain", "Public domain")]


def _licence(root: ET.Element) -> str | None:
    """Short licence name from the licence URL if there is one, else from the licence text."""
    front = next((el for el in root if local(el.tag) == "front"), root)
    for el in _outermost(front, ("license", "license_ref")):
        nested = [sub for sub in el.iter() if local(sub.tag) in ("license", "license_ref")]
        urls = [v for sub in nested for k, v in sub.attrib.items() if local(k) in ("href", "resource")]
        refs = [el] if local(el.tag) == "license_ref" else _outermost(el, ("license_ref",))
        urls += [flat_text(ref) for ref in refs]  # an outer ref's text holds its nested refs' text
        for url in urls:
            for key, name in _LICENCE_URLS:
                if key in url.lower():
                    return name
        text = re.sub(r"[\s-]+", " ", flat_text(el).lower()).replace("non commercial", "noncommercial")
        text = text.replace("no derivs", "noderivs").replace("share alike", "sharealike")
        for key, name in _LICENCE_TEXT:
            if key.replace("-", " ") in text:
                return name
    return None


def _outermost(top: ET.Element, names: tuple[str, ...]):
    """Elements under `top` named in `names` that have no such ancestor, in document order.

    A nested one holds nothing its ancestor does not, and skipping it keeps nested licences linear.
    """
    stack = [iter(top)]
    while stack:
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
        elif local(child.tag) in names:
            yield child
        else:
            stack.append(iter(child))


def _figure_from(el: ET.Element, fallback_caption: ET.Element | None, index: int) -> Figure:
    label = flat_text(_child(el, "label")).rstrip(".").strip() or None
    caption_el = _child(el, "caption")
    if caption_el is None:
        caption_el = fallback_caption
    title = flat_text(_child(caption_el, "title")) if caption_el is not None else ""
    text = flat_text(caption_el, skip=frozenset({"title"})) if caption_el is not None else ""
    if local(el.tag) == "graphic":
        href = _href(el)
    else:
        graphics = [g for g in el.iter() if local(g.tag) == "graphic"]
        href = next((h for h in map(_href, graphics) if h), None)
    figure_id = el.get("id") or f"F{index}"
    return Figure(figure_id=figure_id, label=label, caption=caption_text(title, text), href=href)


def _child(el: ET.Element | None, name: str) -> ET.Element | None:
    if el is None:
        return None
    return next((c for c in el if local(c.tag) == name), None)


def _figures(root: ET.Element) -> tuple[list[Figure], dict[str, list[str]]]:
    """All figures in document order, and fig-group id -> ids of the figures it holds."""
    figures: list[Figure] = []
    groups: dict[str, list[str]] = {}

    # One frame per open element: its children still to visit, whether it sits in a table-like
    # float, and the last <fig> among those children if it is the previous element.
    stack: list[list] = [[iter(root), False, None]]
    while stack:
        frame = stack[-1]
        child = next(frame[0], None)
        if child is None:
            stack.pop()
            continue
        in_table, previous = frame[1], frame[2]
        name = local(child.tag)
        if previous is not None and name != "graphic":
            previous = frame[2] = None
        if name == "fig-group":
            members = [c for c in child if local(c.tag) == "fig"]
            shared = _child(child, "caption")
            if members:
                made = [_figure_from(f, shared, len(figures) + i + 1) for i, f in enumerate(members)]
                if not any(f.href for f in made):
                    # The group holds the only graphic: every member figure shows it.
                    group_href = next((_href(g) for g in child if local(g.tag) == "graphic"), None)
                    for f in made:
                        f.href = group_href
                figures.extend(made)
                if child.get("id"):
                    groups[child.get("id")] = [f.figure_id for f in made]
            else:
                figures.append(_figure_from(child, None, len(figures) + 1))
        elif name == "fig" and not in_table:
            figures.append(_figure_from(child, None, len(figures) + 1))
            frame[2] = figures[-1]
        elif name == "graphic" and not in_table and _child(child, "caption") is not None:
            figures.append(_figure_from(child, None, len(figures) + 1))
        elif name == "graphic" and previous is not None and previous.href is None:
            # Some older articles put a figure's graphic right after the <fig> instead of inside it.
            previous.href = _href(child)
        else:
            stack.append([iter(child), in_table or name in TABLE_LIKE, None])

    seen: dict[str, int] = {}
    for f in figures:
        # Figure ids key the records, so a (malformed) repeated id gets a suffix.
        n = seen.get(f.figure_id, 0)
        seen[f.figure_id] = n + 1
        if n:
            f.figure_id = f"{f.figure_id}_{n + 1}"
    return figures, groups


# Sentence splitting: a boundary is end punctuation, optional closing quotes/brackets, whitespace,
# then something that can start a sentence (capital, digit, opening bracket). Boundaries after
# known abbreviations and single capital initials ("M. tuberculosis") are ignored. Simple and
# predictable beats clever here: a mention is a hint for the caption, not a parse.
_BOUNDARY = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+(?=[A-Z0-9(\[\u201c])")
_ABBREV = {"fig", "figs", "al", "e.g", "i.e", "eg", "ie", "vs", "cf", "ca", "approx", "no", "nos",
           "dr", "mr", "mrs", "ms", "prof", "ref", "refs", "eq", "eqs", "sp", "spp", "st", "suppl",
           "resp", "vol", "ed", "eds", "inc", "ltd", "co", "dept", "univ", "min", "max", "mg", "ml"}


_LAST_WORD = re.compile(r"[^\s(\[]*$")
_WORD_WINDOW = 32  # longer than any abbreviation above


def split_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences in `text` (any whitespace, not only spaces)."""
    spans, start = [], 0
    for m in _BOUNDARY.finditer(text):
        # Only a short word can be an abbreviation or an initial, so a short window is enough, and it
        # keeps a long unspaced run or many skipped abbreviations from making this quadratic.
        word = _LAST_WORD.search(text, max(start, m.start() - _WORD_WINDOW), m.start()).group().lower()
        if word in _ABBREV or (len(word) == 1 and word.isalpha()):
            continue
        spans.append((start, m.start() + 1))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _paragraph_with_xrefs(p: ET.Element) -> tuple[str, list[tuple[int, list[str]]]]:
    """Paragraph text with markup dropped, and the (offset, rids) of each figure citation in it."""
    parts: list[str] = []
    cites: list[tuple[int, list[str]]] = []
    size = 0

    def add(s: str) -> None:
        nonlocal size
        parts.append(s)
        size += len(s)

    stack: list[ET.Element | str] = [p]  # elements to open, strings (tails) to add
    while stack:
        el = stack.pop()
        if isinstance(el, str):
            add(el)
            continue
        if local(el.tag) == "xref" and el.get("ref-type") == "fig" and el.get("rid"):
            cites.append((size, el.get("rid").split()))
        if el.text:
            add(el.text)
        for child in reversed(el):
            if child.tail:
                stack.append(child.tail)
            name = local(child.tag)
            if name and name not in FLOATS and name not in ("p", "list", "def-list"):
                stack.append(child)
    # The text keeps its raw whitespace so the offsets stay valid; sentences are squashed when cut out.
    return "".join(parts), cites


def _attach_mentions(root: ET.Element, figures: list[Figure], groups: dict[str, list[str]]) -> None:
    by_id = {f.figure_id: f for f in figures}
    body = next((el for el in root if local(el.tag) == "body"), None)
    if body is None or not by_id:
        return
    for p in _body_paragraphs(body):
        text, cites = _paragraph_with_xrefs(p)
        if not cites:
            continue
        spans = split_sentences(text)
        starts = [s for s, _ in spans]
        for offset, rids in cites:
            s, e = spans[max(bisect_right(starts, offset) - 1, 0)]
            sentence = squash(text[s:e])
            for rid in rids:
                for fid in groups.get(rid, [rid]):
                    fig = by_id.get(fid)
                    if fig is not None and sentence not in fig.mentions:
                        fig.mentions.append(sentence)


def _body_paragraphs(body: ET.Element):
    """Body `<p>` elements outside floats (figure and table captions are not running text), in order."""
    stack = [iter(body)]
    while stack:
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
            continue
        name = local(child.tag)
        if name in FLOATS or not name:
            continue
        if name == "p":
            yield child
        stack.append(iter(child))
