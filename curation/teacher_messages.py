"""Chat messages for the teacher: LLaVA-Med's caption-only method and ALLaVA's image method.

The prompt text lives in curation/teacher_prompts/*.yaml; this module loads it, loads few-shot examples
(the shipped ones or a file in LLaVA-Med's `instruct_few_shot_examples.json` format) and builds
the message list for one figure.
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from medllava.curation.instruct_parse import Pair, clean_text
from medllava.curation.sources import detokenize, squash
from medllava.io import DataError
from medllava.records import GPT, HUMAN, ROLE_ALIASES

# Figures are often a few thousand pixels a side; vision endpoints scale them down anyway, so
# sending at most this many pixels per side keeps requests small without losing what they see.
MAX_IMAGE_SIDE = 1024
# Heavily cited figures have dozens of citing sentences; the first few carry the description.
MAX_MENTIONS = 5


@dataclass(frozen=True)
class FewShot:
    """One worked example: what the teacher is shown, and the conversation it should write."""

    caption: str
    mentions: tuple[str, ...]
    pairs: tuple[Pair, ...]


def load_prompts(name: str) -> dict:
    """A shipped prompt file from curation/teacher_prompts (e.g. "llava_med.yaml") as a dict."""
    text = resources.files("medllava.curation").joinpath("teacher_prompts", name).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def load_few_shot(path: str | os.PathLike | None = None) -> list[FewShot]:
    """Few-shot examples from `path` (JSON or YAML, a list or `{few_shot: [...]}`), else the shipped set.

    Each example has `caption` (or LLaVA-Med's `fig_caption`), optional `mentions` (or
    `in_text_mention`, as strings or `{tokens: ...}`) and `conversations` of human/gpt turns.
    """
    if path is None:
        where, data = "curation/teacher_prompts/llava_med.yaml", load_prompts("llava_med.yaml").get("few_shot")
    else:
        where = str(path)
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f) if Path(path).suffix.lower() == ".json" else yaml.safe_load(f)
            except (ValueError, yaml.YAMLError) as e:
                raise DataError(f"{where}: not valid JSON/YAML ({e})") from None
    if isinstance(data, dict):
        data = data.get("few_shot")
    if not isinstance(data, list) or not data:
        raise DataError(f"{where}: expected a non-empty list of few-shot examples")
    return [_few_shot_example(obj, f"{where}: example {i}") for i, obj in enumerate(data)]


def _few_shot_example(obj, where: str) -> FewShot:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object")
    caption = obj.get("caption", obj.get("fig_caption"))
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{where}: missing caption (`caption` or `fig_caption`)")
    turns = obj.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise DataError(f"{where}: `conversations` must hold at least one human/gpt pair")
    roles, texts = [], []
    for j, turn in enumerate(turns):
        role = ROLE_ALIASES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {j} must be {{from: human|gpt, value: text}}")
        if role != (HUMAN if j % 2 == 0 else GPT):
            raise DataError(f"{where}: turn {j} is from {role}; turns must alternate, starting with human")
        roles.append(role)
        texts.append(clean_text(turn["value"]))
    if roles[-1] != GPT:
        raise DataError(f"{where}: the last turn must be the assistant's answer")
    pairs = tuple((texts[k], texts[k + 1]) for k in range(0, len(texts), 2))
    return FewShot(squash(caption), tuple(mention_texts(obj.get("mentions", obj.get("in_text_mention")))), pairs)


def mention_texts(raw) -> list[str]:
    """Citing sentences as plain strings, from strings or LLaVA-Med's `{tokens: ...}` objects."""
    texts = []
    for m in raw or []:
        text = m.get("tokens", "") if isinstance(m, dict) else m
        text = detokenize(text) if isinstance(text, str) else ""
        if text and text not in texts:
            texts.append(text)
    return texts[:MAX_MENTIONS]


def render_context(caption: str, mentions: list[str] | tuple[str, ...], prompts: dict) -> str:
    """What the teacher reads about one figure: the caption, then any citing sentences."""
    text = f"{prompts['caption_header']}\n{caption}"
    if mentions:
        text += f"\n\n{prompts['mentions_header']}\n" + "\n".join(f"- {m}" for m in mentions)
    return text


def render_dialogue(pairs) -> str:
    """A conversation in the reply format the teacher is asked for."""
    return "\n".join(f"User: {q}\nAssistant: {a}" for q, a in pairs)


def llava_med_messages(figure: dict, with_mentions: bool, prompts: dict, few_shot: list[FewShot]) -> list[dict]:
    """System rules, each few-shot example as a user/assistant exchange, then this figure's text."""
    messages = [{"role": "system", "content": prompts["system"].strip()}]
    for ex in few_shot:
        mentions = ex.mentions if with_mentions else ()
        messages.append({"role": "user", "content": render_context(ex.caption, mentions, prompts)})
        messages.append({"role": "assistant", "content": render_dialogue(ex.pairs)})
    mentions = mention_texts(figure.get("mentions")) if with_mentions else []
    messages.append({"role": "user", "content": render_context(squash(figure["caption"]), mentions, prompts)})
    return messages


def allava_messages(figure: dict, image_url: str, prompts: dict) -> list[dict]:
    """System rules, then the authors' caption as a hint and the image itself."""
    text = prompts["user"].format(caption=squash(figure["caption"])).strip()
    return [{"role": "system", "content": prompts["system"].strip()},
            {"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


def image_data_url(path: str | os.PathLike, max_side: int = MAX_IMAGE_SIDE) -> str:
    """The image at `path` as a base64 JPEG data URL, at most `max_side` pixels a side.

    Raises medllava.images.ImageLoadError (an OSError naming the path) for a missing or bad file.
    """
    from medllava.images import load_image

    image = load_image(path)
    image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
