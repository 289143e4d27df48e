"""Templates and label masking: exact rendered strings of each template, loss only on assistant
tokens (end-of-turn included), image placeholders expanded as transformers' Llava processor does."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medllava.families import fixed_image_token_count
from medllava.templates import (
    GENERATION_TEMPLATES, IGNORE_INDEX, TEMPLATES, TooLongError, encode_conversation, prompt_text, render,
    supervised_spans,
)

TURNS = [
    {"from": "human", "value": "What is shown?\n<image>"},
    {"from": "gpt", "value": "A chest X-ray with a right pleural effusion."},
    {"from": "human", "value": "Is the heart enlarged?"},
    {"from": "gpt", "value": "No"},
]


def test_vicuna_v1_matches_llava_format():
    r = render(TURNS, "vicuna_v1", eos="</s>", system="SYS")
    assert r.text == (
        "SYS USER: <image>\nWhat is shown? ASSISTANT: A chest X-ray with a right pleural effusion.</s>"
        "USER: Is the heart enlarged? ASSISTANT: No</s>"
    )
    # The space after "ASSISTANT:" belongs to the reply: generation prompts end at the colon.
    assert [r.text[a:b] for a, b in r.assistant_spans] == [" A chest X-ray with a right pleural effusion.</s>", " No</s>"]


def test_mistral_instruct_matches_llava_med_v15_format():
    r = render(TURNS, "mistral_instruct", eos="</s>")
    assert r.text == (
        "[INST] <image>\nWhat is shown? [/INST] A chest X-ray with a right pleural effusion. </s>"
        "[INST] Is the heart enlarged? [/INST] No </s>"
    )


def test_plain_keeps_only_image_and_caption():
    r = render(TURNS[:2], "plain", eos="</s>", image_text="<im><im>")
    assert r.text == "<im><im>A chest X-ray with a right pleural effusion.\n"
    with pytest.raises(ValueError, match="one human and one gpt turn"):
        render(TURNS, "plain", eos="</s>")


def test_generation_prompt_ends_where_the_answer_starts(tiny):
    _, processor = tiny
    assert prompt_text("Is it normal?", "vicuna_v1", processor).endswith("USER: <image>\nIs it normal? ASSISTANT:")
    assert prompt_text("Is it normal?", "mistral_instruct", processor) == "[INST] <image>\nIs it normal? [/INST]"
    assert prompt_text("Is it normal?", "chat_template", processor) == "<s>USER: <image>\nIs it normal? ASSISTANT:"


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_label_span_decodes_to_exactly_the_assistant_text(tiny, template):
    _, processor = tiny
    tok = processor.tokenizer
    turns = TURNS[:2] if template == "plain" else TURNS
    enc = encode_conversation(turns, processor, template, fixed_image_token_count(processor))
    assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["attention_mask"])
    spans = supervised_spans(enc["labels"])
    replies = [t["value"] for t in turns if t["from"] == "gpt"]
    assert len(spans) == len(replies)
    for (a, b), reply in zip(spans, replies):
        ids = enc["input_ids"][a:b]
        assert enc["labels"][a:b] == ids
        decoded = tok.decode(ids, skip_special_tokens=False)
        if template == "plain":
            assert decoded == reply + "\n"
        else:
            assert decoded.strip() == reply + (" " if template == "mistral_instruct" else "") + tok.eos_token
            assert ids[-1] == tok.eos_token_id  # the model learns to stop
    # nothing outside the spans is supervised: prompts, system text, image tokens
    supervised = {i for a, b in spans for i in range(a, b)}
    assert all(lab == IGNORE_INDEX for i, lab in enumerate(enc["labels"]) if i not in supervised)


@pytest.mark.parametrize("template", ["vicuna_v1", "mistral_instruct", "chat_template"])
@pytest.mark.parametrize("reply", ["yes", "no", "Yes"])
def test_every_token_after_the_generation_prompt_is_supervised(tiny, template, reply):
    # The tiny tokenizer splits " yes" into " " + "yes" but keeps " no" whole: if the space were not
    # supervised, a model would learn to start every reply with " no", never with the space.
    _, processor = tiny
    tok = processor.tokenizer
    human = {"from": "human", "value": "<image>\nIs it normal?"}
    enc = encode_conversation([human, {"from": "gpt", "value": reply}], processor, template, fixed_image_token_count(processor))
    text = prompt_text("Is it normal?", template, processor)
    prompt = tok(text.replace("<image>", processor.image_token * fixed_image_token_count(processor)),
                 add_special_tokens=template != "chat_template")["input_ids"]
    (a, b), = supervised_spans(enc["labels"])
    assert enc["input_ids"][:len(prompt)] == prompt and a == len(prompt)


@pytest.mark.parametrize("template", ["vicuna_v1", "mistral_instruct", "chat_template"])
def test_image_expansion_matches_the_transformers_processor(tiny, template):
    _, processor = tiny
    n = fixed_image_token_count(processor)
    enc = encode_conversation(TURNS, processor, template, n)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert enc["input_ids"].count(image_id) == n == 16
    text = render(TURNS, template, eos=processor.tokenizer.eos_token, processor=processor).text
    image = Image.fromarray((np.random.RandomState(0).rand(40, 30, 3) * 255).astype("uint8"))
    reference = processor(text=text, images=image, add_special_tokens=template != "chat_template")
    assert list(reference["input_ids"][0]) == enc["input_ids"]


def test_truncation_never_cuts_the_image_or_the_first_reply(tiny):
    _, processor = tiny
    n = fixed_image_token_count(processor)
    full = encode_conversation(TURNS, processor, "vicuna_v1", n)
    first_end = supervised_spans(full["labels"])[0][1]
    cut = encode_conversation(TURNS, processor, "vicuna_v1", n, max_length=first_end + 2)
    assert len(cut["input_ids"]) == first_end + 2 and cut["input_ids"] == full["input_ids"][: first_end + 2]
    with pytest.raises(TooLongError, match="first reply"):
        encode_conversation(TURNS, processor, "vicuna_v1", n, max_length=first_end - 1)
    with pytest.raises(TooLongError, match="image tokens"):
        encode_conversation(TURNS, processor, "vicuna_v1", n, max_length=20)


@pytest.mark.parametrize("template", GENERATION_TEMPLATES)
def test_every_generation_prompt_is_where_the_rendered_reply_starts(tiny, template):
    """Generation and likelihood scoring ask with prompt_text; training renders whole conversations:
    for every template that can ask, the prompt is exactly the text before the supervised reply."""
    _, processor = tiny
    turns = [{"from": "human", "value": "<image>\nIs it normal?"}, {"from": "gpt", "value": "Yes"}]
    prompt = prompt_text("Is it normal?", template, processor)
    full = render(turns, template, processor.tokenizer.eos_token, processor=processor)
    (start, _), = full.assistant_spans
    assert full.text[:start] == prompt


def test_the_registry_is_what_every_command_offers():
    """A template added to TEMPLATES reaches every command; none keeps its own list."""
    import argparse

    from medllava.commands import chat, check
    from medllava.eval import run

    def template_choices(module) -> set[str]:
        parser = argparse.ArgumentParser()
        module.register(parser.add_subparsers())
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        (command,) = sub.choices.values()
        return set(next(a for a in command._actions if a.dest == "template").choices)

    assert template_choices(check) == set(TEMPLATES)
    assert template_choices(chat) == template_choices(run) == set(GENERATION_TEMPLATES)
    assert set(GENERATION_TEMPLATES) == {n for n, t in TEMPLATES.items() if t.generates}
    assert "plain" in TEMPLATES and "plain" not in GENERATION_TEMPLATES
    with pytest.raises(ValueError, match="unknown template 'vicuna'; choose one of vicuna_v1, mistral_instruct"):
        render(TURNS, "vicuna", eos="</s>")
