"""Conversation templates and label masking: the one registry of templates.

A record's turns are rendered to one string with the template its checkpoint was trained on, the
`<image>` placeholder expanded to as many image tokens as the vision tower yields (as transformers'
Llava processor does), then tokenised once. Labels keep only the assistant tokens, end-of-turn token
included; everything else is -100. Assistant spans are tracked as character ranges while rendering
and mapped to tokens through the fast tokenizer's offsets, so the tokens that carry loss are exactly
the tokens the model sees at inference, with no re-tokenisation at segment boundaries.

`TEMPLATES` below is the registry that training, `eval run`, `chat`, `check`, `convert` and head
files all read: a template's name, how it renders turns (and so which characters carry loss), its
generation prompt, whether its text holds its own BOS, where generation stops, and the Jinja chat
template `convert` writes into a checkpoint for it. Adding a template is one entry here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from medllava.records import HUMAN, IMAGE_PLACEHOLDER

IGNORE_INDEX = -100

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass
class Rendered:
    """A rendered conversation: the text and the character spans that carry loss."""

    text: str
    assistant_spans: list[tuple[int, int]]


class UnusableConversation(ValueError):
    """A record whose turns the chosen template cannot render (e.g. several rounds under `plain`)."""


class _Builder:
    """Accumulates text and the spans of assistant content."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.spans: list[tuple[int, int]] = []

    def add(self, text: str, supervised: bool = False) -> None:
        if supervised and text:
            self.spans.append((self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)

    def done(self) -> Rendered:
        return Rendered("".join(self.parts), self.spans)


# A writer renders turns into a _Builder: (builder, turns, image_text, eos, system). Supervised text
# (the assistant's reply and its end-of-turn markup) is added with supervised=True.
Writer = Callable[[_Builder, list[dict], str, str, "str | None"], None]


def _write_vicuna_v1(b: _Builder, turns: list[dict], image_text: str, eos: str, system: str | None) -> None:
    b.add((VICUNA_SYSTEM if system is None else system) + " ")
    for t in turns:
        if t["from"] == HUMAN:
            b.add("USER: " + t["value"].replace(IMAGE_PLACEHOLDER, image_text) + " ASSISTANT:")
        else:
            # The space after "ASSISTANT:" is part of the target, as in LLaVA: the generation
            # prompt ends at the colon, so the model must learn to produce it (a tokenizer that
            # does not merge it into the reply's first word would otherwise never be taught it).
            b.add(" " + t["value"] + eos, supervised=True)


def _write_mistral_instruct(b: _Builder, turns: list[dict], image_text: str, eos: str, system: str | None) -> None:
    for i, t in enumerate(turns):
        if t["from"] == HUMAN:
            sys_prefix = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if (system and i == 0) else ""
            b.add("[INST] " + sys_prefix + t["value"].replace(IMAGE_PLACEHOLDER, image_text) + " [/INST]")
        else:
            b.add(" " + t["value"] + " " + eos, supervised=True)  # the space too, as for vicuna_v1


def _write_plain(b: _Builder, turns: list[dict], image_text: str, eos: str, system: str | None) -> None:
    for t in turns:
        if t["from"] == HUMAN:
            # Stage-1 alignment: only the image conditions the caption.
            b.add(image_text * t["value"].count(IMAGE_PLACEHOLDER))
        else:
            b.add(t["value"] + "\n", supervised=True)


# Jinja chat templates that render exactly what the writers above write for the same turns, preceded
# by BOS; `content` is a string or llava-hf's list of {"type": "image"|"text"} parts. `convert` writes
# them into the checkpoints it makes, so any tool that uses the chat template asks as training taught.
_JINJA_CONTENT = (
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for part in m['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in m['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
)
_JINJA_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] if m['content'] is string"
    " else m['content'] | map(attribute='text') | join('') %}{% endif %}{% endfor %}"
)
_VICUNA_V1_JINJA = (
    "{{ bos_token }}{% set ns = namespace(system=" + json.dumps(VICUNA_SYSTEM) + ") %}" + _JINJA_SYSTEM
    + "{{ ns.system }} {% for m in messages %}{% if m['role'] == 'user' %}USER: " + _JINJA_CONTENT
    + " {% elif m['role'] == 'assistant' %}ASSISTANT: " + _JINJA_CONTENT + "{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_MISTRAL_INSTRUCT_JINJA = (
    "{{ bos_token }}{% set ns = namespace(system='', first=true) %}" + _JINJA_SYSTEM
    + "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% if ns.first and ns.system %}"
    "<<SYS>>\n{{ ns.system }}\n<</SYS>>\n\n{% endif %}{% set ns.first = false %}" + _JINJA_CONTENT
    + " [/INST]{% elif m['role'] == 'assistant' %} " + _JINJA_CONTENT + " {{ eos_token }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Template:
    """One conversation template: everything any command needs to know about it."""

    name: str
    summary: str
    """One line for help texts and docs: which checkpoints use it."""
    writer: Writer | None
    """Renders turns and marks the supervised characters; None renders with the checkpoint
    processor's own Jinja chat template (assistant spans found by rendering prefixes)."""
    generates: bool = True
    """It has a generation prompt (text that ends where the assistant's reply starts), so `eval run`
    and `chat` can ask with it; `plain` (stage 1) has none."""
    max_turns: int | None = None
    """Longest conversation it can render (`plain`: one human and one gpt turn), checked per record."""
    jinja: str | None = None
    """A Jinja chat template that renders the same text after BOS, for `convert` to write."""

    @property
    def writes_bos(self) -> bool:
        """The rendered text holds its own BOS (a Jinja chat template writes it): tokenise it without
        the tokenizer's special tokens. The hand-written templates rely on the tokenizer adding BOS."""
        return self.writer is None

    def problem(self, turns: list[dict]) -> str | None:
        """Why this template cannot render `turns`, or None when it can."""
        if self.max_turns is not None and len(turns) > self.max_turns:
            return f"template {self.name!r} takes one human and one gpt turn, got {len(turns)} turns"
        return None

    def stop_token_ids(self, model, tokenizer) -> int | list[int] | None:
        """Where greedy generation stops: the checkpoint's end-of-turn id(s) from its generation
        config, else the tokenizer's EOS (what every template here ends a reply with)."""
        eos = model.generation_config.eos_token_id
        return eos if eos is not None else tokenizer.eos_token_id


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("vicuna_v1", "LLaVA-1.5 and LLaVA-Med v1.0: `SYSTEM USER: q ASSISTANT: a</s>USER: ...`",
             _write_vicuna_v1, jinja=_VICUNA_V1_JINJA),
    Template("mistral_instruct", "LLaVA-Med v1.5 (Mistral-7B): `[INST] q [/INST] a </s>[INST] ...`",
             _write_mistral_instruct, jinja=_MISTRAL_INSTRUCT_JINJA),
    Template("plain", "LLaVA's stage-1 format: the image, then the caption; the instruction is dropped",
             _write_plain, generates=False, max_turns=2),
    Template("chat_template", "the checkpoint tokenizer's own Jinja chat template", None),
)}
"""Every conversation template, by name."""

GENERATION_TEMPLATES = tuple(name for name, t in TEMPLATES.items() if t.generates)
"""Templates that can ask a question (`eval run`, `chat`)."""

DEFAULT_TEMPLATE = "vicuna_v1"
"""The template of LLaVA-1.5 checkpoints, used when neither a config nor a head names one."""


def get_template(name: str) -> Template:
    """The registered template `name`; a ValueError naming the choices otherwise."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def _image_first(value: str) -> str:
    """Move a single `<image>` to the front of the turn, as LLaVA's training code does."""
    if value.count(IMAGE_PLACEHOLDER) != 1:
        return value
    return IMAGE_PLACEHOLDER + "\n" + value.replace(IMAGE_PLACEHOLDER, "").strip()


def template_problem(turns: list[dict], template: str) -> str | None:
    """Why `template` cannot render `turns`, or None when it can: a per-record check, cheap enough to
    run over a whole data set before training."""
    return get_template(template).problem(turns)


def render(
    turns: list[dict],
    template: str,
    eos: str,
    image_text: str = IMAGE_PLACEHOLDER,
    system: str | None = None,
    processor=None,
    add_generation_prompt: bool = False,
) -> Rendered:
    """Render `turns` ({from, value}, alternating, human first) with `template`.

    `image_text` replaces each `<image>` in a hand-written template (the family's image markup,
    `medllava.families.image_markup`); a chat template writes its own markup per image.
    `eos` is the end-of-turn string after each assistant reply. With `add_generation_prompt`, the
    text ends where the assistant's next reply would start (turns must then end with a human turn).
    `processor` (one with a chat template) is needed only for `chat_template`.
    """
    spec = get_template(template)
    turns = [dict(t, value=_image_first(t["value"])) if t["from"] == HUMAN else t for t in turns]
    if spec.writer is None:
        return _render_chat_template(turns, processor, add_generation_prompt)
    if problem := spec.problem(turns):
        raise UnusableConversation(problem)
    b = _Builder()
    spec.writer(b, turns, image_text, eos, system)
    return b.done()


def _render_chat_template(turns, processor, add_generation_prompt) -> Rendered:
    """Render with the processor's Jinja chat template; assistant spans come from rendering prefixes.

    Processors ship a chat template over structured content (`{"type": "image"}` and `{"type": "text"}`
    parts) that writes the family's own markup per image part (`<image>\n`, Qwen's
    `<|vision_start|><|image_pad|><|vision_end|>`, Gemma 3's `<start_of_image>`); it is left as written,
    for the caller to expand. The text after rendering turns[:i] with a generation prompt and before
    rendering turns[:i+1] is the i-th assistant reply with its end-of-turn markup; a template whose prefix
    renderings are not prefixes of the full rendering cannot be masked this way.
    """
    if processor is None or not getattr(processor, "chat_template", None):
        raise ValueError("template 'chat_template' needs a processor that has a chat template")
    msgs = []
    for t in turns:
        n_images = t["value"].count(IMAGE_PLACEHOLDER)
        text = t["value"].replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        msgs.append({"role": "user" if t["from"] == HUMAN else "assistant", "content": content})

    def text_of(n: int, gen: bool) -> str:
        return processor.apply_chat_template(msgs[:n], tokenize=False, add_generation_prompt=gen)

    full = text_of(len(msgs), add_generation_prompt)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start_text, end_text = text_of(i, True), text_of(i + 1, False)
        if not (full.startswith(end_text) and end_text.startswith(start_text)):
            raise ValueError("the chat template does not render prefixes stably; use vicuna_v1 or mistral_instruct")
        spans.append((len(start_text), len(end_text)))
    return Rendered(full, spans)


def _expand_images(text: str, spans: list[tuple[int, int]], image_text: str | Sequence[str],
                   placeholder: str = IMAGE_PLACEHOLDER) -> Rendered:
    """Replace each `placeholder` in `text` by `image_text` (or the i-th one by `image_text[i]`), moving the
    spans that follow it."""
    positions = []
    start = text.find(placeholder)
    while start != -1:
        positions.append(start)
        start = text.find(placeholder, start + len(placeholder))
    texts = [image_text] * len(positions) if isinstance(image_text, str) else list(image_text)
    if len(texts) != len(positions):
        raise UnusableConversation(f"{len(positions)} {placeholder} placeholders for {len(texts)} images")
    if all(t == placeholder for t in texts):
        return Rendered(text, spans)
    grows = [len(t) - len(placeholder) for t in texts]

    def shift(offset: int) -> int:
        return offset + sum(g for p, g in zip(positions, grows) if p < offset)

    parts, last = [], 0
    for p, t in zip(positions, texts):
        parts += [text[last:p], t]
        last = p + len(placeholder)
    parts.append(text[last:])
    return Rendered("".join(parts), [(shift(a), shift(b)) for a, b in spans])


class TooLongError(ValueError):
    """A conversation whose image tokens or first reply do not fit in `max_length`."""


def encode_conversation(
    turns: list[dict],
    processor,
    template: str,
    num_image_tokens: int | Sequence[int] | None = None,
    max_length: int | None = None,
    system: str | None = None,
    image_texts: Sequence[str] | None = None,
) -> dict[str, list[int]]:
    """Turn a conversation into `input_ids`, `attention_mask` and `labels` (lists of length T).

    The conversation is rendered with the family's image markup, then each image's placeholder
    (`medllava.families.image_placeholder`) becomes what the processor writes for it: `image_texts[i]`
    for the i-th image, or `num_image_tokens` image tokens (one count for every image, or the i-th
    image's count). Labels are the input ids on assistant tokens (end-of-turn token included) and -100
    elsewhere; the model shifts them internally. Truncation cuts the end; a conversation whose image
    tokens or whole first reply would be cut raises TooLongError (training on a cut image or on no target
    teaches nothing).
    """
    from medllava.families import image_markup, image_placeholder

    tokenizer = processor.tokenizer
    placeheld = render(turns, template, eos=tokenizer.eos_token or "", image_text=image_markup(processor),
                       system=system, processor=processor)
    placeholder = image_placeholder(processor)
    if image_texts is None:
        token = processor.image_token
        if isinstance(num_image_tokens, int):
            image_texts = [token * num_image_tokens] * placeheld.text.count(placeholder)
        else:
            image_texts = [token * n for n in num_image_tokens]
    rendered = _expand_images(placeheld.text, placeheld.assistant_spans, list(image_texts), placeholder)
    enc = tokenizer(
        rendered.text, add_special_tokens=not get_template(template).writes_bos, return_offsets_mapping=True,
    )
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    spans = rendered.assistant_spans
    k = 0
    for i, (start, end) in enumerate(offsets):
        if end <= start:
            continue  # special tokens added by the tokenizer have empty offsets
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        if k < len(spans) and start < spans[k][1] and end > spans[k][0]:
            labels[i] = ids[i]
    if max_length is not None and len(ids) > max_length:
        image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
        cut_ids, cut_labels = ids[:max_length], labels[:max_length]
        if ids.count(image_id) != cut_ids.count(image_id) or _cuts_an_image(rendered.text, offsets, max_length,
                                                                           image_texts):
            raise TooLongError(f"{len(ids)} tokens; max_length {max_length} would cut the image tokens")
        first_reply_end = _first_reply_end(labels)
        if first_reply_end > max_length:
            raise TooLongError(f"{len(ids)} tokens; max_length {max_length} would cut the first reply")
        ids, labels = cut_ids, cut_labels
    return {"input_ids": list(ids), "attention_mask": [1] * len(ids), "labels": labels}


def _cuts_an_image(text: str, offsets, max_length: int, image_texts: Sequence[str]) -> bool:
    """Whether cutting the tokens at `max_length` ends inside an image's expansion (its markup included)."""
    cut_at = offsets[max_length - 1][1]
    start = 0
    for expansion in image_texts:
        found = text.find(expansion, start)
        if found == -1:
            continue
        if found < cut_at < found + len(expansion):
            return True
        start = found + len(expansion)
    return False


def _first_reply_end(labels: list[int]) -> int:
    """Index just past the first contiguous run of supervised labels."""
    started = False
    for i, lab in enumerate(labels):
        if lab != IGNORE_INDEX:
            started = True
        elif started:
            return i
    return len(labels)


def supervised_spans(labels: list[int]) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of supervised positions in `labels`."""
    spans, start = [], None
    for i, lab in enumerate(list(labels) + [IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def prompt_text(question: str, template: str, processor, system: str | None = None) -> str:
    """The generation prompt for one question about one image, with the family's markup for it (the
    processor expands its placeholder, as it does at inference)."""
    from medllava.families import image_markup

    turns = [{"from": HUMAN, "value": IMAGE_PLACEHOLDER + "\n" + question}]
    eos = processor.tokenizer.eos_token or ""
    return render(turns, template, eos, image_markup(processor), system, processor, add_generation_prompt=True).text
