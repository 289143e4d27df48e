"""Mistral 3 (Mistral-Small-3.1 vision) on the model-family seam: a Pixtral tower at native resolution, images of
different sizes padded to a batch's largest, rows of `[IMG]` ended by `[IMG_BREAK]` / `[IMG_END]`.

The chat template is the one Mistral-Small-3.1-24B-Instruct-2503 ships for transformers, as transformers'
tests/models/mistral3/test_processing_mistral3.py copies it (hf-internal-testing/
Mistral-Small-3.1-24B-Instruct-2503-only-processor): medllava/assets/chat_templates/mistral3.jinja. It writes a
default system prompt holding today's date (`strftime_now`), so a rendering depends on the day it is made.

Tests run on the named `tiny-mistral3` (a BPE trained on the shipped corpus) and on the same model over the real
Mistral tekken vocabulary (../shared/tokenizers/tekken_240911.json, converted by transformers once per session).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from medllava.data import Collator, Encoder
from medllava.eval.generate import ensure_pad_token, generate_answers
from medllava.eval.likelihood import score_candidates
from medllava.families import FAMILIES, image_inputs
from medllava.images import load_image
from medllava.model import TRAINABLE, ModelConfig, build_model, module_of, set_trainable
from medllava.templates import IGNORE_INDEX, prompt_text, render, supervised_spans
from medllava.tiny import TINY_SPECS, build_tokenizer, demo_data
from medllava.tiny_mistral3 import build_mistral3, tekken_tokenizer
from test_families import direct_log_likelihood

pytestmark = pytest.mark.usefixtures("one_thread")

TEKKEN = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers" / "tekken_240911.json"
FAMILY = FAMILIES["mistral3"]
TURNS = [
    {"from": "human", "value": "<image>\nWhat is shown?"},
    {"from": "gpt", "value": "A chest X-ray with a right pleural effusion."},
    {"from": "human", "value": "Is the heart enlarged?"},
    {"from": "gpt", "value": "No"},
]
# Real demo images: wide (128 x 76), square, and cropped tall (40 x 105): three sizes, three token counts.
SHAPES = {"wide": ("synpic100132.jpg", None), "square": ("synpic100176.jpg", None),
          "tall": ("synpic18651.jpg", (0, 0, 40, 105))}


@pytest.fixture(scope="session")
def tekken(tmp_path_factory):
    """The real Mistral tekken tokenizer, converted once."""
    if not TEKKEN.is_file():
        pytest.skip(f"{TEKKEN} is absent (see ../shared/tokenizers/README.md)")
    return tekken_tokenizer(str(TEKKEN), str(tmp_path_factory.mktemp("tekken")))


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_model(ModelConfig(name_or_path="tiny-mistral3"))
    ensure_pad_token(processor)
    return model.float(), processor


@pytest.fixture(scope="module")
def real(tekken):
    """tiny-mistral3's sizes on the real vocabulary."""
    return build_mistral3(tekken, TINY_SPECS["tiny-mistral3"])


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    """`(folder, {name: image})`: the three demo shapes saved as PNG files."""
    folder = tmp_path_factory.mktemp("shapes")
    images = {}
    for name, (file, box) in SHAPES.items():
        image = load_image(demo_data()[1] / file)
        image = image.crop(box) if box else image
        image.save(folder / f"{name}.png")
        images[name] = load_image(folder / f"{name}.png")
    return folder, images


def test_tekken_ids_are_the_real_checkpoints(tekken):
    """The converted vocabulary gives the ids Mistral-Small-3.1's processor test expects."""
    ids = tekken.convert_tokens_to_ids(["<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "<pad>", "[IMG_BREAK]",
                                        "[IMG_END]", "[SYSTEM_PROMPT]"])
    assert ids == [1, 2, 3, 4, 10, 11, 12, 13, 17]
    # transformers' test: "USER: [IMG]...\nWhat's the content of the image? ASSISTANT:" after "USER: "
    assert tekken("\nWhat's the content of the image? ASSISTANT:", add_special_tokens=False)["input_ids"] == [
        1010, 7493, 1681, 1278, 4701, 1307, 1278, 3937, 1063, 1349, 4290, 16002, 41150, 1058]


def test_stages_train_what_stage_definitions_say(tiny):
    """align trains exactly the projector (its norm, patch merger and MLP); instruct the projector, language
    model and head, never the Pixtral tower; LoRA adapters on the language model plus the projector in full."""
    from medllava.finetune.config import LoraConfig
    from medllava.finetune.stages import apply_lora

    model = build_model(ModelConfig(name_or_path="tiny-mistral3"))[0]
    names = [n for n, _ in model.named_parameters()]
    align = set_trainable(model, "align")
    assert align and set(align) == {n for n in names if n.startswith("model.multi_modal_projector.")}
    assert any("patch_merger" in n for n in align)
    instruct = set(set_trainable(model, "instruct"))
    assert instruct == {n for n in names if not n.startswith("model.vision_tower.")}
    assert FAMILY.trainable(TRAINABLE["instruct"]) == ("multi_modal_projector", "language_model", "lm_head")
    set_trainable(model, "instruct")
    lora = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0),
                      FAMILY.lora_trainable(FAMILY.trainable(TRAINABLE["instruct"])))
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "multi_modal_projector" in n for n in trained)
    assert any("language_model" in n and "lora_A" in n for n in trained)
    assert not any("vision_tower" in n for n in trained)
    assert any("multi_modal_projector.modules_to_save" in n for n in trained)


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_labels_are_exactly_the_replies_and_ids_equal_the_processors(which, request, shaped):
    """Every label span decodes to the reply plus `</s>`; image tokens are never supervised; the Encoder's ids
    equal the processor's own for the rendered text and the image, whatever the image's size."""
    model, processor = request.getfixturevalue(which)
    tok = processor.tokenizer
    folder, images = shaped
    rendered = render(TURNS, "chat_template", tok.eos_token, processor=processor)
    replies = [rendered.text[a:b] for a, b in rendered.assistant_spans]
    assert replies == ["A chest X-ray with a right pleural effusion.</s>", "No</s>"]
    image_ids = {tok.convert_tokens_to_ids(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")}
    encoder = Encoder(processor, template="chat_template", image_root=folder)
    counts = set()
    for name, image in images.items():
        enc = encoder({"id": name, "image": f"{name}.png", "conversations": TURNS})
        spans = supervised_spans(enc["labels"])
        assert [tok.decode(enc["input_ids"][a:b]) for a, b in spans] == replies
        assert not any(lab in image_ids for lab in enc["labels"])
        own = processor(text=[rendered.text], images=[image], add_special_tokens=False, return_tensors="pt")
        assert enc["input_ids"] == own["input_ids"][0].tolist()
        assert torch.equal(enc["pixel_values"], own["pixel_values"]) and torch.equal(enc["image_sizes"], own["image_sizes"])
        counts.add(sum(i in image_ids for i in enc["input_ids"]))
    assert len(counts) == 3, counts


def per_example_losses(model, batch) -> list[float]:
    """Mean next-token loss of each row over its supervised tokens."""
    labels = batch["labels"]
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    out = []
    for row in range(labels.shape[0]):
        target = labels[row, 1:]
        keep = target != IGNORE_INDEX
        losses = torch.nn.functional.cross_entropy(logits[row, :-1][keep], target[keep], reduction="mean")
        out.append(losses.item())
    return out


def encoded_pair(processor, shaped):
    folder, _ = shaped
    encoder = Encoder(processor, template="chat_template", image_root=folder)
    return [encoder({"id": n, "image": f"{n}.png", "conversations": TURNS[:2] if n == "tall" else TURNS})
            for n in ("wide", "tall")]


def test_a_batch_of_two_image_sizes_gives_each_examples_loss(tiny, shaped):
    """Pixels padded to the batch's largest height and width (image_sizes says each image's own): every
    example's loss is that of the example alone."""
    model, processor = tiny
    features = encoded_pair(processor, shaped)
    collate = Collator(processor.tokenizer.pad_token_id)
    batch = {k: v for k, v in collate(features).items() if k not in ("example_ids", "skipped")}
    assert batch["pixel_values"].shape[0] == 2 and batch["image_sizes"].tolist() != [batch["image_sizes"][0].tolist()] * 2
    together = per_example_losses(model, batch)
    alone = [per_example_losses(model, {k: v for k, v in collate([f]).items() if k not in ("example_ids", "skipped")})[0]
             for f in features]
    assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5) for a, b in zip(together, alone)), (together, alone)


def test_packed_loss_equals_padded_loss(tiny, shaped):
    """Mistral 3's positions are 1-D and its images' features are placed by [IMG] tokens wherever they are: one
    packed row (positions restarting per example, no mask) gives the padded batch's loss."""
    model, processor = tiny
    features = encoded_pair(processor, shaped)
    drop = ("example_ids", "skipped")
    padded = {k: v for k, v in Collator(processor.tokenizer.pad_token_id)(features).items() if k not in drop}
    packed = {k: v for k, v in Collator(processor.tokenizer.pad_token_id, pack=True)(features).items() if k not in drop}
    with torch.no_grad():
        a, b = model(**padded).loss.item(), model(**packed).loss.item()
    assert math.isclose(a, b, rel_tol=1e-5), (a, b)


def questions(n: int):
    from medllava.eval.tasks import load_task

    task = load_task("vqa-rad", demo_data()[1].parent / "vqa_rad")
    picked, sizes = [], set()
    for ex in task.examples:
        image = load_image(task.image_path(ex))
        if image.size not in sizes or len(sizes) >= 3:
            picked.append((ex.question, image))
            sizes.add(image.size)
        if len(picked) == n:
            return picked
    return picked


def test_batched_answers_equal_one_at_a_time(tiny):
    model, processor = tiny
    asked = questions(3)
    prompts = [prompt_text(q, "chat_template", processor) for q, _ in asked]
    images = [im for _, im in asked]
    batched = generate_answers(model, processor, prompts, images, max_new_tokens=5, template="chat_template")
    alone = [generate_answers(model, processor, [p], [im], max_new_tokens=5, template="chat_template")[0]
             for p, im in zip(prompts, images)]
    assert batched == alone


def test_likelihood_scores_match_a_direct_computation(tiny):
    model, processor = tiny
    asked = questions(2)
    candidates = [["yes", "no"], ["CT", "MRI"]]
    scores = score_candidates(model, processor, [q for q, _ in asked], [im for _, im in asked], candidates,
                              "chat_template")
    for (q, image), options, got in zip(asked, candidates, scores):
        for c in options:
            direct = direct_log_likelihood(model, processor, q, image, c, "chat_template")
            assert math.isclose(got[c], direct, abs_tol=1e-3), (got, c, direct)


@pytest.mark.xfail(strict=True, raises=(AttributeError, ImportError, TypeError),
                   reason="medllava.families.new_processor/load_processor build a processor without torchvision only "
                          "with a video processor, and look PixtralProcessor up in transformers' top level, which "
                          "exports a placeholder without torchvision (see medllava.tiny_mistral3.pixtral_processor_class)")
def test_a_folder_transformers_saved_loads_and_answers_the_same(tiny, tmp_path, shaped):
    """model.save_pretrained + processor.save_pretrained (as from the hub) loads through build_model, with the
    processor built from its saved parts where torchvision is missing, and answers as the model it was saved from."""
    from safetensors import safe_open

    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # transformers writes the hub layout (`language_model.model.layers...`, `language_model.lm_head.weight`): the
    # innermost module name among a name's first parts places it, with no saved_prefixes.
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = list(f.keys())
    assert any(k.startswith("language_model.lm_head.") for k in saved)
    assert {module_of(k, FAMILY.modules, FAMILY.saved_prefixes) for k in saved} == set(FAMILY.modules)
    assert {k for k in saved if module_of(k, FAMILY.modules) == "lm_head"} == {"language_model.lm_head.weight"}
    loaded, loaded_processor = build_model(ModelConfig(name_or_path=str(tmp_path)))
    ensure_pad_token(loaded_processor)
    _, images = shaped
    prompt = prompt_text("What is shown?", "chat_template", processor)
    ours = processor(text=[prompt], images=[images["wide"]], add_special_tokens=False, return_tensors="pt")
    theirs = loaded_processor(text=[prompt], images=[images["wide"]], add_special_tokens=False, return_tensors="pt")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    answer = generate_answers(model, processor, [prompt], [images["wide"]], 5, "chat_template")
    assert generate_answers(loaded.float(), loaded_processor, [prompt], [images["wide"]], 5, "chat_template") == answer


def test_named_tokenizer_has_the_familys_special_tokens():
    tok = build_tokenizer(512, family="mistral3")
    for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]", "<s>", "</s>", "<unk>", "<pad>"):
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id or t == "<unk>"
        assert tok.tokenize(t) == [t]
    assert os.environ.get("HF_HUB_OFFLINE", "1")  # nothing here reads the hub


def test_image_inputs_read_back_the_processors_expansion(tiny, shaped):
    _, processor = tiny
    _, images = shaped
    got = image_inputs(processor, list(images.values()))
    assert got.pixels["pixel_values"].shape[0] == 3
    heights, widths = zip(*got.pixels["image_sizes"].tolist())
    assert got.pixels["pixel_values"].shape[2:] == (max(heights), max(widths))
    for text, (h, w) in zip(got.texts, got.pixels["image_sizes"].tolist()):
        assert text == (("[IMG]" * (w // 8) + "[IMG_BREAK]") * (h // 8))[:-len("[IMG_BREAK]")] + "[IMG_END]"
