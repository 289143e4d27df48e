"""Qwen3-VL on the model-family seam, on the tiny random `tiny-qwen3-vl` and on the real Qwen2 vocabulary: the
stage freeze table (stage 1 trains the merger and the DeepStack mergers), label spans and image tokens from the
chat template the Qwen3-VL Instruct checkpoints ship, the Encoder's tokens and token types equal to the
processor's own, batched answers equal one-at-a-time ones, likelihood scores equal a direct computation, packing
refused with its reason, and a folder written by transformers itself answering as the in-memory model.

The chat template (medllava/assets/chat_templates/qwen3_vl.jinja) is Qwen/Qwen3-VL-8B-Instruct's
chat_template.json (the same text Qwen/Qwen3-VL-30B-A3B-Instruct ships, as its GGUF conversion reports it), copied
from NVIDIA's tao-vl-reason cosmos-rl dataset module (QWEN3VL_INSTRUCT_CHAT_TEMPLATE, stated byte-identical to the
Qwen3-VL-8B-Instruct one) and checked against a llama.cpp server log of Qwen3-VL-30B-A3B-Instruct's template. The
Instruct template writes no `<think>` block and no default system prompt; the Thinking checkpoints' template does
add `<think>` markup and is not what this file tests.
"""

from __future__ import annotations

import math

import pytest
import torch
from real_tokenizers import qwen2_vl_tokenizer

from medllava.commands.chat import answer_batch
from medllava.config import from_dict
from medllava.data import Collator, Encoder
from medllava.eval.generate import ensure_pad_token
from medllava.eval.likelihood import score_candidates
from medllava.families import FAMILIES, image_inputs, load_processor
from medllava.finetune.config import STAGE_DEFINITIONS, LoraConfig, RunSettings, StageConfig
from medllava.finetune.stage_checks import check_speed_options, stage_modules
from medllava.finetune.stages import apply_lora
from medllava.images import load_image
from medllava.model import ModelConfig, build_model, module_of, set_trainable
from medllava.templates import IGNORE_INDEX, prompt_text, render, supervised_spans
from medllava.tiny import TINY_SPECS, demo_data
from medllava.tiny_qwen3_vl import build_qwen3_vl
from test_families import SHAPES, TURNS, direct_log_likelihood  # three image shapes, two rounds: as every family is checked

pytestmark = pytest.mark.usefixtures("one_thread")

QWEN3 = FAMILIES["qwen3_vl"]


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_model(ModelConfig(name_or_path="tiny-qwen3-vl"))
    ensure_pad_token(processor)
    return model, processor


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """`{name: (path, image)}` of the three shapes, saved as PNG files."""
    root, folder = demo_data()[1], tmp_path_factory.mktemp("images")
    out = {}
    for name, (file, box) in SHAPES.items():
        image = load_image(root / file)
        image = image.crop(box) if box else image
        image.save(folder / f"{name}.png")
        out[name] = (folder / f"{name}.png", image)
    return out


def trained_modules(model) -> set[str]:
    return {module_of(n.replace("base_model.model.", "", 1), QWEN3.modules)
            for n, p in model.named_parameters() if p.requires_grad}


def test_the_named_model_is_qwen3_vl_with_deepstack_mergers(tiny):
    model, processor = tiny
    assert type(model).__name__ == QWEN3.model_class and type(processor).__name__ == QWEN3.processor_class
    assert TINY_SPECS["tiny-qwen3-vl"].family == "qwen3_vl"
    assert model.config.vision_config.patch_size == 16 == processor.image_processor.patch_size
    assert len(model.model.visual.deepstack_merger_list) == len(model.config.vision_config.deepstack_visual_indexes) > 0
    rope = model.config.text_config.rope_parameters
    assert rope["mrope_interleaved"] and sum(rope["mrope_section"]) == model.config.text_config.head_dim // 2
    # Every parameter belongs to one of the family's modules, under the names transformers saves too.
    assert {module_of(n, QWEN3.modules) for n, _ in model.named_parameters()} == set(QWEN3.modules)


@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_full_training_trains_what_the_stage_definitions_say(tiny, stage):
    model, _ = tiny
    definition = STAGE_DEFINITIONS[stage]
    modules = stage_modules(stage, StageConfig(), definition, QWEN3)
    expected = set(QWEN3.trainable(definition.trains))
    assert set(modules) == expected
    if stage == "align":
        assert expected == {"merger", "deepstack_merger_list"}  # the connector, exactly
    try:
        names = set_trainable(model, modules)
        assert {module_of(n, QWEN3.modules) for n in names} == expected
        assert trained_modules(model) == expected
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def test_lora_instruct_trains_the_adapters_and_the_connector():
    model, _ = build_model(ModelConfig(name_or_path="tiny-qwen3-vl"))
    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0)
    modules = stage_modules("instruct", StageConfig(lora=lora), STAGE_DEFINITIONS["instruct"], QWEN3)
    assert modules == QWEN3.lora_trainable(QWEN3.trainable(STAGE_DEFINITIONS["instruct"].trains))
    set_trainable(model, modules)
    model = apply_lora(model, lora, modules)
    # The language model trains through its adapters; the merger and DeepStack mergers in full (saved copies).
    assert trained_modules(model) == {"merger", "deepstack_merger_list", "language_model"}


def test_packing_and_the_feature_cache_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="packing does not apply to qwen3_vl models: the model computes 3-D rope"):
        check_speed_options("instruct", from_dict(StageConfig, {"packing": True}), ("language_model",),
                            RunSettings(), QWEN3)
    with pytest.raises(ValueError, match="cache_vision_features does not apply to qwen3_vl models: stage 1 trains"):
        check_speed_options("align", from_dict(StageConfig, {"cache_vision_features": "memory"}),
                            QWEN3.connector, RunSettings(), QWEN3)
    check_speed_options("instruct", StageConfig(), ("language_model",), RunSettings(), QWEN3)


def check_label_spans(processor, encoder: Encoder, record: dict, image) -> dict:
    """Encode `record`; every supervised span is exactly an assistant reply with its `<|im_end|>\\n`, and no image
    token (nor anything else) is supervised."""
    tok = processor.tokenizer
    enc = encoder(record)
    rendered = render(record["conversations"], "chat_template", tok.eos_token, processor=processor)
    replies = [rendered.text[a:b] for a, b in rendered.assistant_spans]
    assert replies == [t["value"] + "<|im_end|>\n" for t in record["conversations"] if t["from"] == "gpt"]
    spans = supervised_spans(enc["labels"])
    assert len(spans) == len(replies)
    for (a, b), reply in zip(spans, replies):
        assert enc["labels"][a:b] == enc["input_ids"][a:b]
        assert tok.decode(enc["input_ids"][a:b], skip_special_tokens=False) == reply
    supervised = {i for a, b in spans for i in range(a, b)}
    assert all(lab == IGNORE_INDEX for i, lab in enumerate(enc["labels"]) if i not in supervised)
    image_id = tok.convert_tokens_to_ids(processor.image_token)
    assert enc["input_ids"].count(image_id) == image_inputs(processor, [image]).counts[0]
    assert all(lab != image_id for lab in enc["labels"])
    return enc


def test_labels_are_exactly_the_replies_and_tokens_equal_the_processors(tiny, images):
    model, processor = tiny
    encoder = Encoder(processor, template="chat_template", image_root=next(iter(images.values()))[0].parent)
    assert encoder.type_key == "mm_token_type_ids"
    encoded, counts = [], set()
    for name, (path, image) in images.items():
        enc = check_label_spans(processor, encoder, {"id": name, "image": path.name, "conversations": TURNS}, image)
        counts.add(enc["input_ids"].count(processor.tokenizer.convert_tokens_to_ids(processor.image_token)))
        # The processor's own output for the same rendered text and image: the same ids and token types.
        text = render(TURNS, "chat_template", "", processor=processor).text
        own = processor(text=[text], images=[image], add_special_tokens=False)
        assert enc["input_ids"] == list(own["input_ids"][0])
        assert enc["mm_token_type_ids"] == list(own["mm_token_type_ids"][0])
        assert torch.equal(enc["image_grid_thw"], torch.as_tensor(own["image_grid_thw"]))
        encoded.append(enc)
    assert len(counts) >= 2  # the count depends on the image's size
    # The model agrees: a padded batch of the three runs, and its image features fill every image token.
    batch = Collator(pad_token_id=processor.tokenizer.pad_token_id)(encoded)
    batch.pop("example_ids"), batch.pop("skipped")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_batched_answers_equal_one_at_a_time(tiny, images):
    model, processor = tiny
    pictures = [image for _, image in images.values()]
    questions = ["What is shown?", "Is there an effusion?", "Which organ is this?"]
    batched = answer_batch(model, processor, pictures, questions, "chat_template", max_new_tokens=6)
    alone = [answer_batch(model, processor, [im], [q], "chat_template", max_new_tokens=6)[0]
             for im, q in zip(pictures, questions)]
    assert batched == alone
    assert any(batched)


def test_likelihood_scores_match_a_direct_computation(tiny, images):
    model, processor = tiny
    pictures = [image for _, image in images.values()]
    questions = ["Is there an effusion?", "Which modality?", "Is it normal?"]
    candidates = [["yes", "no"], ["CT", "MRI", "ultrasound"], ["yes", "no"]]
    scores = score_candidates(model, processor, questions, pictures, candidates, "chat_template")
    for q, im, options, got in zip(questions, pictures, candidates, scores):
        assert list(got) == options
        for c in options:
            assert math.isclose(got[c], direct_log_likelihood(model, processor, q, im, c, "chat_template"),
                                abs_tol=1e-3)


def test_a_folder_saved_by_transformers_loads_and_answers_the_same(tiny, images, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)  # transformers' own writers, as a hub folder is made
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = build_model(ModelConfig(name_or_path=str(tmp_path)))
    assert type(loaded).__name__ == QWEN3.model_class
    assert type(load_processor(tmp_path, QWEN3)).__name__ == QWEN3.processor_class
    assert loaded_processor.chat_template == processor.chat_template
    for name, p in model.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name]), name
    ensure_pad_token(loaded_processor)
    pictures = [image for _, image in images.values()]
    questions = ["What is shown?", "Is there an effusion?", "Which organ is this?"]
    assert (answer_batch(loaded, loaded_processor, pictures, questions, "chat_template", max_new_tokens=6)
            == answer_batch(model, processor, pictures, questions, "chat_template", max_new_tokens=6))


def test_the_real_qwen2_vocabulary_masks_labels_and_expands_images_as_the_processor(images):
    tokenizer = qwen2_vl_tokenizer()
    assert tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]) \
        == [151645, 151652, 151655, 151653]
    spec = TINY_SPECS["tiny-qwen3-vl"]
    model, processor = build_qwen3_vl(tokenizer, spec, seed=0)
    assert model.config.image_token_id == 151655 and model.config.text_config.vocab_size == 151936
    path, image = images["wide"]
    encoder = Encoder(processor, template="chat_template", image_root=path.parent)
    check_label_spans(processor, encoder, {"id": "wide", "image": path.name, "conversations": TURNS}, image)
    # The prompt for one image holds the placeholder once; the processor expands it into the image's tokens.
    prompt = prompt_text("What is shown?", "chat_template", processor)
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"].count(151655) == 1
    expanded = processor(text=[prompt], images=[image], add_special_tokens=False)
    grid = expanded["image_grid_thw"][0]
    n = int(grid[0] * grid[1] * grid[2]) // processor.image_processor.merge_size ** 2
    assert list(expanded["input_ids"][0]).count(151655) == n == image_inputs(processor, [image]).counts[0]
    assert sum(expanded["mm_token_type_ids"][0]) == n
