"""What every model family must do, once for all of them: label masking exact whatever an image's token
count, and the table itself consistent. The per-family files (test_family_*.py) hold what differs."""

from __future__ import annotations

import pytest

from medllava.data import Collator, Encoder
from medllava.families import FAMILIES, image_inputs, max_image_tokens
from medllava.images import load_image
from medllava.model import ModelConfig, build_model, family_of
from medllava.templates import IGNORE_INDEX, TEMPLATES, render, supervised_spans
from medllava.tiny import TINY_SPECS, demo_data

TURNS = [
    {"from": "human", "value": "What is shown?\n<image>"},
    {"from": "gpt", "value": "A chest X-ray with a right pleural effusion."},
    {"from": "human", "value": "Is the heart enlarged?"},
    {"from": "gpt", "value": "No"},
]
# Real demo images, wide (128 x 76), square and cropped tall (40 x 105): three grid shapes.
SHAPES = {"wide": ("synpic100132.jpg", None), "square": ("synpic100176.jpg", None),
          "tall": ("synpic18651.jpg", (0, 0, 40, 105))}
# Named models of the grid families, with the templates their tokenizers can render.
GRID_CASES = [("tiny-next", t) for t in TEMPLATES] + [("tiny-onevision", t) for t in ("chat_template", "plain")]


@pytest.fixture(scope="module")
def models():
    """The named models, built once each."""
    return {name: build_model(ModelConfig(name_or_path=name)) for name in ("tiny-next", "tiny-onevision")}


@pytest.mark.parametrize(("named", "template"), GRID_CASES)
def test_every_label_span_decodes_to_exactly_the_rendered_reply(models, named, template, tmp_path):
    """Each image of a grid family expands to its own token count; the supervised tokens are still exactly
    the replies the template renders (end of turn included), and nothing else."""
    model, processor = models[named]
    tok = processor.tokenizer
    turns = TURNS[:2] if template == "plain" else TURNS
    rendered = render(turns, template, tok.eos_token or "", processor=processor)
    replies = [rendered.text[a:b] for a, b in rendered.assistant_spans]
    _, root = demo_data()
    encoder = Encoder(processor, template=template, image_root=tmp_path)
    image_id = tok.convert_tokens_to_ids(processor.image_token)
    encoded, counts = [], set()
    for name, (file, box) in SHAPES.items():
        image = load_image(root / file)
        image = image.crop(box) if box else image
        image.save(tmp_path / f"{name}.png")
        enc = encoder({"id": name, "image": f"{name}.png", "conversations": turns})
        n = enc["input_ids"].count(image_id)
        assert n == image_inputs(processor, [image])[1][0] <= max_image_tokens(processor)
        counts.add(n)
        spans = supervised_spans(enc["labels"])
        assert len(spans) == len(replies)
        for (a, b), reply in zip(spans, replies):
            assert enc["labels"][a:b] == enc["input_ids"][a:b]
            assert tok.decode(enc["input_ids"][a:b], skip_special_tokens=False).strip() == reply.strip()
        supervised = {i for a, b in spans for i in range(a, b)}
        assert all(lab == IGNORE_INDEX for i, lab in enumerate(enc["labels"]) if i not in supervised)
        encoded.append(enc)
    assert len(counts) >= 2  # the count depends on the image's shape
    # The model agrees: it raises when a row's image tokens and its image's features differ in number.
    batch = Collator(pad_token_id=tok.pad_token_id)(encoded)
    batch.pop("example_ids"), batch.pop("skipped")
    model(**batch)


@pytest.mark.parametrize("named", sorted(TINY_SPECS))
def test_every_named_model_is_its_familys_and_the_family_knows_its_classes(named):
    family = family_of(ModelConfig(name_or_path=named))
    assert family is FAMILIES[TINY_SPECS[named].family]
    assert family.default_template in TEMPLATES
    assert set(family.connector) <= set(family.modules) and set(family.bare_parameters) <= set(family.connector)
