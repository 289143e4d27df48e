"""Batched greedy answers to benchmark questions with transformers' `generate`.

How a question is asked (`Asking`: template, prompt style, closed options) is decided once
per run; `prompt_for` turns an `Example` into the generation prompt with one `<image>`
placeholder, which the processor expands to the image's tokens.

Batches are cut from the questions sorted by their full token length, longest first, so each
batch pads little and a batch that does not fit in memory fails at the start of the run, not
at the end. The full length is the prompt's tokens with its `<image>` expanded: in a fixed-
resolution family every image adds the same count, so the text decides; in a grid family such
as LLaVA-NeXT the image's tokens (1-3k for a 7B model) depend on its size and dominate, so
`image_token_counts` reads each image's size from its header and asks the processor what that
size expands to, once per size (`medllava.families.image_tokens_for_size`). Padding is on the left: every
row then ends at the last column, where generation continues, and `generate` derives position
ids from the attention mask, so a padded row gets the same greedy answer as the same question
asked alone.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from medllava.families import image_tokens_for_size, processor_family
from medllava.images import ImageLoadError, load_image
from medllava.question_styles import YES_NO, format_question
from medllava.templates import DEFAULT_TEMPLATE, get_template, prompt_text

from medllava.eval.tasks.base import Example, Task


@dataclass(frozen=True)
class Asking:
    """How questions are put to the model; a head's head.json fixes these for the head."""

    template: str = DEFAULT_TEMPLATE
    """Conversation template the model was trained with (medllava.templates.GENERATION_TEMPLATES)."""

    prompt_style: str = "llava-med"
    """Question style (medllava.question_styles.PROMPT_STYLES)."""

    closed_options: tuple[str, ...] = YES_NO
    """Candidate answers of closed questions: listed by the llava-med style, scored by likelihood."""


def question_text(example: Example, asking: Asking) -> str:
    """The human-turn text for `example` (without the image placeholder)."""
    return format_question(example.question, asking.prompt_style, example.answer_type,
                           tuple(options_for(example, asking)))


def options_for(example: Example, asking: Asking) -> list[str]:
    """Closed candidates: the question's own list when the dataset gives one, else the run's."""
    own = example.meta.get("options") or example.meta.get("choices")
    if isinstance(own, list) and own and all(isinstance(o, (str, int, float)) for o in own):
        return [str(o) for o in own]
    return list(asking.closed_options)


def prompt_for(example: Example, asking: Asking, processor) -> str:
    return prompt_text(question_text(example, asking), asking.template, processor)


def load_example_image(task: Task, example: Example):
    """The example's image as RGB; raises ImageLoadError (naming the file) when it cannot be had."""
    if example.image_bytes is not None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(example.image_bytes)) as im:
                return im.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageLoadError(f"{example.image} (inline bytes of question {example.qid}): {e}") from None
    path = task.image_path(example)
    if path is None:
        raise ImageLoadError(f"question {example.qid}: the release gives no image")
    return load_image(path)


def ensure_pad_token(processor) -> None:
    """Batches need a pad token; checkpoints without one pad with end-of-sequence (masked out)."""
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token


def length_batches(prompts: Sequence[str], tokenizer, batch_size: int,
                   image_tokens: Sequence[int] | None = None) -> list[list[int]]:
    """Indices of `prompts` cut into batches of similar token length, longest first.

    `image_tokens[i]` is what the one `<image>` of `prompts[i]` expands to (`image_token_counts`); None
    where every image takes the same count, so the text alone decides the order.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if image_tokens is not None and len(image_tokens) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(image_tokens)} image-token counts")
    if not prompts:
        return []
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    if image_tokens is not None:  # the placeholder is one token of the prompt; expanded, it is the image's
        lengths = [n + tokens - 1 for n, tokens in zip(lengths, image_tokens)]
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def image_token_counts(processor, task: Task, examples: Sequence[Example]) -> list[int] | None:
    """Tokens each example's `<image>` expands to, for sorting by full length; None in a fixed-resolution
    family (the same count for every image: no image is opened).

    In a grid family the count depends on the image's size only: the size is read from the file's header
    (`image_size`), and the processor's own expansion is asked once per distinct size. An image whose size
    cannot be read counts 0: its question is skipped when its batch loads the image.
    """
    if processor_family(processor).fixed_image_tokens:
        return None
    by_size: dict[tuple[int, int], int] = {}
    counts = []
    for example in examples:
        size = image_size(task, example)
        if size is not None and size not in by_size:
            by_size[size] = image_tokens_for_size(processor, *size)
        counts.append(by_size.get(size, 0))
    return counts


def image_size(task: Task, example: Example) -> tuple[int, int] | None:
    """`(width, height)` of the example's image as `load_example_image` would give it, None when unreadable.

    Pillow reads the header only (and EXIF orientation 5-8, which the loader applies, swaps the sides);
    files Pillow cannot open (DICOM) go through the loader.
    """
    from PIL import Image

    source = io.BytesIO(example.image_bytes) if example.image_bytes is not None else task.image_path(example)
    if source is None:
        return None
    try:
        with Image.open(source) as im:
            width, height = im.size
            turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        return (height, width) if turned else (width, height)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        pass
    try:
        return load_example_image(task, example).size
    except ImageLoadError:
        return None


@contextlib.contextmanager
def left_padding(processor) -> Iterator[None]:
    tok = processor.tokenizer
    old, tok.padding_side = tok.padding_side, "left"
    try:
        yield
    finally:
        tok.padding_side = old


def encode(processor, texts: Sequence[str], images: Sequence, device, dtype, add_special_tokens: bool = True):
    """Left-padded model inputs for `texts[i]` asked about `images[i]`: input_ids, attention_mask (batch, T)
    and the family's pixel inputs (`medllava.families`): pixel_values (batch, 3, H, W), or in a grid
    family (batch, tiles, 3, H, W) with image_sizes (batch, 2), tiles zero-padded to the batch's most.

    The processor expands each `<image>` to its image's own token count, so rows of a grid family differ
    in length by their images, and the left padding absorbs that too. Float pixel inputs are cast to
    `dtype`; integer ones (image_sizes) keep theirs. `add_special_tokens=False` for prompts that already
    hold their BOS (Jinja chat templates).
    """
    import torch

    if len(texts) != len(images):
        raise ValueError(f"{len(texts)} prompts but {len(images)} images")
    with left_padding(processor):
        # One list of images per row: every family's processor reads that (Gemma 3's reads nothing else).
        batch = processor(text=list(texts), images=[[image] for image in images], padding=True, return_tensors="pt",
                          add_special_tokens=add_special_tokens)
    batch = batch.to(device)
    for key in processor_family(processor).pixel_keys:
        if torch.is_floating_point(batch[key]):
            batch[key] = batch[key].to(dtype)
    return batch


def greedy_config(model, processor, max_new_tokens: int, template: str = DEFAULT_TEMPLATE):
    """Greedy decoding with the KV cache, stopping where `template` ends a reply; sampling settings a
    checkpoint ships are not inherited."""
    from transformers import GenerationConfig

    tok = processor.tokenizer
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                            eos_token_id=get_template(template).stop_token_ids(model, tok),
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)


def generate_answers(model, processor, prompts: Sequence[str], images: Sequence, max_new_tokens: int,
                     template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Greedy answers for one batch; `prompts[i]` (rendered with `template`) is asked about `images[i]`."""
    import torch

    batch = encode(processor, prompts, images, model.device, model.dtype,
                   add_special_tokens=not get_template(template).writes_bos)
    config = greedy_config(model, processor, max_new_tokens, template)
    with torch.inference_mode():
        out = model.generate(**batch, generation_config=config)
    new_tokens = out[:, batch["input_ids"].shape[1]:]
    return [text.strip() for text in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
