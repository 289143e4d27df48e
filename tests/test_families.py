"""What every model family must do, once for all of them: label masking exact whatever an image's token
count, and the table itself consistent. The per-family files (test_family_*.py) hold what differs."""

from __future__ import annotations

import math

import pytest
import torch

from medllava.data import Collator, Encoder
from medllava.families import FAMILIES, image_inputs, max_image_tokens, processor_family
from medllava.images import load_image
from medllava.model import ModelConfig, build_model, family_of
from medllava.templates import IGNORE_INDEX, TEMPLATES, get_template, prompt_text, render, supervised_spans
from medllava.tiny import TINY_SPECS, demo_data

from medllava.eval.generate import Asking, encode, ensure_pad_token, generate_answers, greedy_config, prompt_for
from medllava.eval.likelihood import best, reply_text, score_candidates
from medllava.eval.tasks import load_task

pytestmark = pytest.mark.usefixtures("one_thread")

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
GRID_CASES = ([("tiny-next", t) for t in TEMPLATES] + [("tiny-onevision", t) for t in ("chat_template", "plain")]
              + [("tiny-qwen2.5-vl", t) for t in ("chat_template", "plain")] + [("tiny-gemma3", "chat_template")])
# Families whose image takes the same tokens whatever its size (Gemma 3 without pan-and-scan).
SIZE_FREE = {"tiny-gemma3"}


# Named models of every family, with a template each can ask in, for eval's batching and scoring.
ASKING_CASES = [("tiny", "vicuna_v1"), ("tiny", "chat_template"), ("tiny-next", "vicuna_v1"),
                ("tiny-next", "chat_template"), ("tiny-onevision", "chat_template"),
                ("tiny-qwen2.5-vl", "chat_template"), ("tiny-qwen2.5-vl", "vicuna_v1"), ("tiny-gemma3", "chat_template")]
MODELS = ("tiny", "tiny-next", "tiny-onevision", "tiny-qwen2.5-vl", "tiny-gemma3")


@pytest.fixture(scope="module")
def models():
    """The named models, built once each, ready for batches (a pad token)."""
    built = {name: build_model(ModelConfig(name_or_path=name)) for name in MODELS}
    for _, processor in built.values():
        ensure_pad_token(processor)
    return built


def shaped_examples(processor, n: int) -> tuple[list, list]:
    """`n` demo VQA-RAD questions and their real images: in a grid family, images that take different numbers
    of image tokens."""
    task = load_task("vqa-rad", demo_data()[1].parent / "vqa_rad")
    varied = not processor_family(processor).fixed_image_tokens and processor_family(processor).model_type != "gemma3"
    picked, images, counts = [], [], set()
    for ex in task.examples:
        image = load_image(task.image_path(ex))
        count = image_inputs(processor, [image]).counts[0]
        if not varied or count not in counts or len(counts) >= 3:
            picked.append(ex)
            images.append(image)
            counts.add(count)
        if len(picked) == n:
            break
    assert len(counts) >= 2 or not varied, "the demo images should take different numbers of tokens"
    return picked, images


@pytest.mark.parametrize(("named", "template"), ASKING_CASES)
def test_batched_answers_equal_one_at_a_time(models, named, template):
    """Left-padded batches of images with different token (and tile) counts answer as each question alone."""
    model, processor = models[named]
    examples, images = shaped_examples(processor, 4)
    prompts = [prompt_for(ex, Asking(template=template), processor) for ex in examples]
    add_special = not get_template(template).writes_bos
    batch = encode(processor, prompts, images, "cpu", torch.float32, add_special_tokens=add_special)
    assert "image_sizes" not in batch or batch["image_sizes"].tolist() == [[im.height, im.width] for im in images]
    batched = generate_answers(model, processor, prompts, images, max_new_tokens=6, template=template)
    alone = [generate_answers(model, processor, [p], [im], max_new_tokens=6, template=template)[0]
             for p, im in zip(prompts, images)]
    assert batched == alone
    # Not only the argmax: the first step's scores match those of each question asked alone.
    config = greedy_config(model, processor, 2, template)
    config.output_scores, config.return_dict_in_generate = True, True
    with torch.inference_mode():
        together = model.generate(**batch, generation_config=config)
        for i in range(len(prompts)):
            single = model.generate(**encode(processor, prompts[i:i + 1], images[i:i + 1], "cpu", torch.float32,
                                             add_special_tokens=add_special), generation_config=config)
            assert torch.allclose(together.scores[0][i], single.scores[0][0], atol=1e-4)


def direct_log_likelihood(model, processor, question, image, answer, template) -> float:
    """log p(reply | prompt, image) from one unpadded forward pass over the whole sequence."""
    prompt = prompt_text(question, template, processor)
    add = not get_template(template).writes_bos
    # One list of images per text: every family's processor reads that (Gemma 3's and SmolVLM's nothing else).
    n_prompt = processor(text=[prompt], images=[[image]], return_tensors="pt",
                         add_special_tokens=add)["input_ids"].shape[1]
    full = processor(text=[prompt + reply_text(question, answer, template, processor)], images=[[image]],
                     return_tensors="pt", add_special_tokens=add)
    with torch.no_grad():
        logp = model(**full).logits[0].log_softmax(-1)
    ids = full["input_ids"][0]
    return sum(logp[i - 1, ids[i]].item() for i in range(n_prompt, len(ids)))


@pytest.mark.parametrize(("named", "template"), ASKING_CASES)
def test_likelihood_scores_match_a_direct_unpadded_computation(models, named, template):
    """Every candidate of every question, each row with its question's image, in one forward pass."""
    model, processor = models[named]
    examples, images = shaped_examples(processor, 3)
    questions = [ex.question for ex in examples]
    candidates = [["yes", "no"], ["CT", "MRI", "ultrasound"], ["yes", "no"]]
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        scores = score_candidates(model, processor, questions, images, candidates, template)
    finally:
        hook.remove()
    assert len(calls) == 1
    for q, im, options, got in zip(questions, images, candidates, scores):
        direct = {c: direct_log_likelihood(model, processor, q, im, c, template) for c in options}
        assert list(got) == options
        assert all(math.isclose(got[c], direct[c], abs_tol=1e-3) for c in options), (got, direct)
        assert best(got) == max(direct, key=direct.get)


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
    encoded, counts = [], set()
    for name, (file, box) in SHAPES.items():
        image = load_image(root / file)
        image = image.crop(box) if box else image
        image.save(tmp_path / f"{name}.png")
        enc = encoder({"id": name, "image": f"{name}.png", "conversations": turns})
        # The image's tokens are exactly those the processor writes for it, whole, once.
        expansion = tok(image_inputs(processor, [image]).texts[0], add_special_tokens=False)["input_ids"]
        n = len(expansion)
        assert n <= max_image_tokens(processor)
        assert [i for i in range(len(enc["input_ids"])) if enc["input_ids"][i:i + n] == expansion] != []
        counts.add(n)
        spans = supervised_spans(enc["labels"])
        assert len(spans) == len(replies)
        for (a, b), reply in zip(spans, replies):
            assert enc["labels"][a:b] == enc["input_ids"][a:b]
            assert tok.decode(enc["input_ids"][a:b], skip_special_tokens=False).strip() == reply.strip()
        supervised = {i for a, b in spans for i in range(a, b)}
        assert all(lab == IGNORE_INDEX for i, lab in enumerate(enc["labels"]) if i not in supervised)
        encoded.append(enc)
    assert len(counts) >= 2 or named in SIZE_FREE  # the count depends on the image's shape
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
