"""SmolVLM / SmolVLM2 (`smolvlm`) and Idefics3 (`idefics3`) on the model-family seam, on their tiny random models
(medllava.tiny_smolvlm): image splitting on, so each image is several tiles plus the global image, and examples
whose images split differently join into one batch (`pixel_layout` images).

The chat templates are the checkpoints' own: `assets/chat_templates/smolvlm.jinja` is transformers'
`processing_smolvlm.DEFAULT_CHAT_TEMPLATE` (SmolVLM2's, "the correct chat template to be used for videos after
#38105"), which renders images and text exactly as SmolVLM-Instruct's (transformers'
tests/models/smolvlm/test_processing_smolvlm.py `prepare_processor_dict`, reproduced below); `idefics3.jinja`
is HuggingFaceM4/Idefics3-8B-Llama3's, whose rendering transformers' tests/models/idefics3/
test_processing_idefics3.py `test_apply_chat_template` spells out (also checked below).
"""

from __future__ import annotations

import math

import pytest
import torch

from medllava.data import Collator, Encoder
from medllava.eval.generate import encode, ensure_pad_token, generate_answers
from medllava.eval.likelihood import score_candidates
from medllava.families import FAMILIES, image_inputs, image_placeholder
from medllava.finetune.config import STAGE_DEFINITIONS, LoraConfig
from medllava.images import load_image
from medllava.model import ModelConfig, build_model, module_of, set_trainable
from medllava.templates import IGNORE_INDEX, prompt_text, render, supervised_spans
from medllava.tiny import demo_data
from medllava.tiny_modern import chat_template
from test_families import direct_log_likelihood



def pil_image_processor_problem() -> str | None:
    """Why Idefics3's PIL image processor cannot be built here (transformers 5.17 builds it only with
    torchvision; 5.25 without), or None when it can."""
    import transformers

    try:
        transformers.Idefics3ImageProcessorPil()
    except ImportError:
        return f"transformers {transformers.__version__} builds Idefics3's image processor only with torchvision"
    return None


pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(bool(pil_image_processor_problem()), reason=str(pil_image_processor_problem()))]

NAMED = {"smolvlm": "tiny-smolvlm", "idefics3": "tiny-idefics3"}
TURNS = [
    {"from": "human", "value": "What is shown?\n<image>"},
    {"from": "gpt", "value": "A chest X-ray with a right pleural effusion."},
    {"from": "human", "value": "Is the heart enlarged?"},
    {"from": "gpt", "value": "No"},
]
# Real demo images: wide (2x2 tiles + global) and cropped tall (2x1 tiles + global).
IMAGES = {"wide": ("synpic100132.jpg", None), "tall": ("synpic18651.jpg", (0, 0, 40, 105))}
SMOLVLM_INSTRUCT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


@pytest.fixture(scope="module", params=sorted(NAMED))
def built(request):
    model, processor = build_model(ModelConfig(name_or_path=NAMED[request.param]))
    ensure_pad_token(processor)
    return FAMILIES[request.param], model, processor


@pytest.fixture(scope="module")
def images():
    root = demo_data()[1]
    out = {}
    for name, (file, box) in IMAGES.items():
        image = load_image(root / file)
        out[name] = image.crop(box) if box else image
    return out


def encoded(processor, images, tmp_path, name, turns=TURNS):
    images[name].save(tmp_path / f"{name}.png")
    return Encoder(processor, template="chat_template", image_root=tmp_path)(
        {"id": name, "image": f"{name}.png", "conversations": turns})


def test_the_shipped_templates_render_as_the_checkpoints(built):
    family, _, processor = built
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What do these images show?"}, {"type": "image"},
                                         {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Two X-rays."}]},
            {"role": "user", "content": [{"type": "text", "text": "And who is that?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    bos = "<|im_start|>" if family.model_type == "smolvlm" else "<|begin_of_text|>"
    assert text == (bos + "User: What do these images show?<image><image><end_of_utterance>\n"
                    "Assistant: Two X-rays.<end_of_utterance>\nUser: And who is that?<end_of_utterance>\nAssistant:")
    if family.model_type == "smolvlm":
        from jinja2 import Template
        assert Template(SMOLVLM_INSTRUCT_TEMPLATE).render(messages=msgs, add_generation_prompt=True) == text
    assert processor.chat_template == chat_template(family.model_type)


def test_an_image_is_its_tiles_and_the_global_image(built, images):
    family, _, processor = built
    wide, tall = image_inputs(processor, [images["wide"]]), image_inputs(processor, [images["tall"]])
    assert wide.pixels["pixel_values"].shape[:2] == (1, 5) and tall.pixels["pixel_values"].shape[:2] == (1, 3)
    assert wide.texts[0].count("<row_") == 4 and "<row_2_col_1>" in tall.texts[0] and "<row_1_col_2>" not in tall.texts[0]
    assert wide.texts[0].count("<global-img>") == 1 and wide.texts[0].count("<image>") == 5 * processor.image_seq_len
    both = image_inputs(processor, [images["wide"], images["tall"]])
    assert both.pixels["pixel_values"].shape[:2] == (1, 8) and both.counts == wide.counts + tall.counts


def test_the_stage_freeze_table(built):
    family, model, _ = built
    for stage, expected in (("align", {"connector"}), ("instruct", {"connector", "language_model", "lm_head"})):
        assert set(family.trainable(STAGE_DEFINITIONS[stage].trains)) == expected
        trained = set_trainable(model, stage)
        modules = {module_of(n, family.modules, family.saved_prefixes) for n in trained}
        assert modules == expected
        assert trained == [n for n, _ in model.named_parameters()
                           if module_of(n, family.modules, family.saved_prefixes) in expected]
    assert all(n.startswith("model.connector.") for n in set_trainable(model, "align"))
    set_trainable(model, list(family.modules))


def test_lora_wraps_the_language_model_and_trains_the_connector(built):
    from medllava.finetune.stages import apply_lora

    family, model, _ = built
    modules = family.lora_trainable(family.trainable(STAGE_DEFINITIONS["instruct"].trains))
    peft_model = apply_lora(model, LoraConfig(enabled=True, r=2, alpha=4, dropout=0.0), modules, fold_dropout=False)
    try:
        trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        assert any(".text_model." in n and "lora_A" in n for n in trained)
        assert not any(".vision_model." in n for n in trained)
        assert any(".connector." in n for n in trained)
    finally:
        peft_model.unload()


def test_label_spans_are_the_replies_and_input_ids_are_the_processors(built, images, tmp_path):
    family, _, processor = built
    tok = processor.tokenizer
    rendered = render(TURNS, "chat_template", tok.eos_token, processor=processor)
    replies = [rendered.text[a:b] for a, b in rendered.assistant_spans]
    assert replies == [" A chest X-ray with a right pleural effusion.<end_of_utterance>\n", " No<end_of_utterance>\n"]
    image_ids = {tok.convert_tokens_to_ids(t) for t in ("<image>", "<fake_token_around_image>", "<global-img>")}
    for name in IMAGES:
        enc = encoded(processor, images, tmp_path, name)
        spans = supervised_spans(enc["labels"])
        assert [tok.decode(enc["input_ids"][a:b]) for a, b in spans] == replies
        supervised = {i for a, b in spans for i in range(a, b)}
        assert all(lab == IGNORE_INDEX for i, lab in enumerate(enc["labels"]) if i not in supervised)
        assert not any(enc["labels"][i] in image_ids for i in supervised)
        # The processor's own expansion of the same rendered text and image.
        own = processor(text=[rendered.text], images=[[images[name]]], add_special_tokens=False, return_tensors="pt")
        assert enc["input_ids"] == own["input_ids"][0].tolist()
        assert torch.equal(enc["pixel_values"], own["pixel_values"])
        assert torch.equal(enc["pixel_attention_mask"].bool(), own["pixel_attention_mask"].bool())
        assert image_placeholder(processor) == "<image>"


def row_losses(model, batch) -> list[float]:
    """Summed next-token cross-entropy of each row, in float32."""
    batch = {k: v for k, v in batch.items() if k not in ("example_ids", "skipped")}
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits.float()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none",
                                           ignore_index=IGNORE_INDEX)
    return ce.sum(-1).tolist()


def test_a_batch_of_differently_split_images_loses_as_each_example_alone(built, images, tmp_path):
    _, model, processor = built
    examples = [encoded(processor, images, tmp_path, "wide"), encoded(processor, images, tmp_path, "tall", TURNS[:2])]
    collate = Collator(pad_token_id=processor.tokenizer.pad_token_id)
    batch = collate(examples)
    assert batch["pixel_values"].shape[:2] == (2, 5)  # the tall image's 3 tiles padded with 2 all-zero ones
    together = row_losses(model, batch)
    alone = [row_losses(model, collate([e]))[0] for e in examples]
    assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-4) for a, b in zip(together, alone)), (together, alone)
    # Packed into one row with per-example positions: the same total loss.
    packed = row_losses(model, Collator(pad_token_id=processor.tokenizer.pad_token_id, pack=True)(examples))
    assert math.isclose(packed[0], sum(alone), rel_tol=1e-5), (packed, alone)


def test_batched_generation_and_likelihood_scores_equal_one_at_a_time(built, images):
    _, model, processor = built
    questions = ["Is there an effusion?", "Which organ is shown?"]
    pics = [images["wide"], images["tall"]]
    prompts = [prompt_text(q, "chat_template", processor) for q in questions]
    batched = generate_answers(model, processor, prompts, pics, max_new_tokens=5, template="chat_template")
    alone = [generate_answers(model, processor, [p], [im], max_new_tokens=5, template="chat_template")[0]
             for p, im in zip(prompts, pics)]
    assert batched == alone
    batch = encode(processor, prompts, pics, "cpu", torch.float32, add_special_tokens=False)
    assert batch["pixel_values"].shape[:2] == (2, 5)
    candidates = [["yes", "no"], ["lung", "heart", "liver"]]
    scores = score_candidates(model, processor, questions, pics, candidates, "chat_template")
    for question, image, options, got in zip(questions, pics, candidates, scores):
        for option in options:
            direct = direct_log_likelihood(model, processor, question, image, option, "chat_template")
            assert math.isclose(got[option], direct, abs_tol=1e-3), (option, got, direct)


def test_a_folder_transformers_wrote_loads_and_answers_the_same(built, images, tmp_path):
    family, model, processor = built
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = build_model(ModelConfig(name_or_path=str(tmp_path)))
    assert type(loaded_processor) is type(processor)
    assert loaded_processor.image_seq_len == processor.image_seq_len
    assert loaded_processor.chat_template == processor.chat_template
    ensure_pad_token(loaded_processor)
    prompt = prompt_text("Is there an effusion?", "chat_template", processor)
    assert prompt_text("Is there an effusion?", "chat_template", loaded_processor) == prompt
    pics = [images["wide"], images["tall"]]
    ours = generate_answers(model, processor, [prompt] * 2, pics, max_new_tokens=5, template="chat_template")
    theirs = generate_answers(loaded, loaded_processor, [prompt] * 2, pics, max_new_tokens=5, template="chat_template")
    assert ours == theirs
    a = encode(processor, [prompt], pics[:1], "cpu", torch.float32, add_special_tokens=False)
    b = encode(loaded_processor, [prompt], pics[:1], "cpu", torch.float32, add_special_tokens=False)
    assert a["input_ids"].tolist() == b["input_ids"].tolist() and torch.equal(a["pixel_values"], b["pixel_values"])
