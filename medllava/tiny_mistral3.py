"""A random-weight Mistral 3 (Mistral-Small-3.1 vision): transformers' `Mistral3ForConditionalGeneration` at test
sizes, a Pixtral tower at native resolution whose patches the projector merges 2x2, a Mistral language model,
and its processor (`PixtralProcessor`) built from parts: a tokenizer, Pixtral's PIL image processor and the
chat template Mistral-Small-3.1 ships (`assets/chat_templates/mistral3.jinja`).

An image of h x w pixels (after resizing its longest edge to at most `longest_edge` and each side up to a multiple
of patch x merge) becomes rows of `[IMG]`, one per merged patch, each row ended by `[IMG_BREAK]` and the last by
`[IMG_END]`; the pixels of a batch's images are zero-padded to its largest height and width, each image's own size
travelling in `image_sizes`.

transformers 5.25 exports `PixtralProcessor` only with torchvision: its module imports the torchvision image
processor's module for one function, `get_resize_output_image_size` (used only to count an image's tokens from its
size), which the PIL image processor's module defines identically. `pixtral_processor_class` imports the processor
with that module standing in, so tests and the named model run without torchvision.
"""

from __future__ import annotations

MISTRAL3_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                     "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
"""The special tokens a Mistral 3 tokenizer has that its chat template and processor write (in the real tekken
vocabulary: `<unk>` 0, `<s>` 1, `</s>` 2, `[INST]` 3, `[/INST]` 4, `[IMG]` 10, `<pad>` 11, `[IMG_BREAK]` 12,
`[IMG_END]` 13, `[SYSTEM_PROMPT]` 17, `[/SYSTEM_PROMPT]` 18)."""

TEKKEN_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                   "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")
"""mistral-common's `Tekkenizer.DEPRECATED_SPECIAL_TOKENS`, by rank: the special tokens of a tekken file that
lists none (tekken_240911.json, the vocabulary of Pixtral and Mistral-Small-3.1), which transformers' converter
reads from mistral-common (it needs tiktoken, a compiled package); the other ranks up to the file's
`default_num_special_tokens` are `<SPECIAL_i>`."""


def pixtral_processor_class():
    """transformers' `PixtralProcessor`, importable without torchvision (see the module's docstring)."""
    import importlib
    import sys

    name = "transformers.models.pixtral.processing_pixtral"
    try:
        return importlib.import_module(name).PixtralProcessor
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise
    torchvision_module = "transformers.models.pixtral.image_processing_pixtral"
    sys.modules[torchvision_module] = importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
    try:
        return importlib.import_module(name).PixtralProcessor
    finally:
        del sys.modules[torchvision_module]


def tekken_tokenizer(tekken_file: str, workdir: str):
    """The transformers tokenizer of the tekken vocabulary `tekken_file`, as transformers converts it
    (`convert_tekken_tokenizer`), for a file without a special-token list: a copy listing `TEKKEN_SPECIALS` is
    written under `workdir` and converted."""
    import json
    from pathlib import Path

    from transformers.integrations.mistral import convert_tekken_tokenizer

    raw = json.loads(Path(tekken_file).read_text(encoding="utf-8"))
    raw.setdefault("special_tokens", [{"rank": i, "token_str": s, "is_control": True}
                                      for i, s in enumerate(TEKKEN_SPECIALS)])
    copy = Path(workdir) / "tekken.json"
    copy.write_text(json.dumps(raw), encoding="utf-8")
    return convert_tekken_tokenizer(str(copy))


def tiny_tokenizer(vocab_size: int):
    """The byte-level BPE trained on the shipped corpus with `MISTRAL3_SPECIALS` (no BOS added: the chat template
    writes it)."""
    from transformers import PreTrainedTokenizerFast

    from medllava.tiny import _trained_bpe

    return PreTrainedTokenizerFast(
        tokenizer_object=_trained_bpe(vocab_size, list(MISTRAL3_SPECIALS)), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>", additional_special_tokens=[t for t in MISTRAL3_SPECIALS if t not in ("<unk>", "<s>", "</s>", "<pad>")],
        padding_side="right", model_max_length=4096)


def build_mistral3(tokenizer, spec, seed: int = 0):
    """`(model, processor)`: Mistral 3 with `spec`'s sizes on `tokenizer` (which must hold `MISTRAL3_SPECIALS`):
    `spec.patch_size` px patches, 2x2 merged into one `[IMG]`, images resized to at most `spec.image_size` px on
    their longest edge (the demo images take 12 to 20 tokens with their breaks)."""
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessorPil

    from medllava.tiny_modern import set_generation_ids, chat_template

    merge, patch = 2, spec.patch_size
    image_processor = PixtralImageProcessorPil(size={"longest_edge": spec.image_size},
                                               patch_size={"height": patch * merge, "width": patch * merge})
    processor = pixtral_processor_class()(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                                          spatial_merge_size=merge, chat_template=chat_template("mistral3"))
    ids = tokenizer.convert_tokens_to_ids
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=spec.hidden,
                         intermediate_size=spec.hidden * 2, num_hidden_layers=spec.layers,
                         num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                         head_dim=spec.hidden // spec.heads, max_position_embeddings=spec.max_positions,
                         sliding_window=None, initializer_range=spec.init_std, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(model_type="pixtral", hidden_size=spec.vision_hidden,
                           intermediate_size=spec.vision_hidden * 2, num_hidden_layers=spec.vision_layers,
                           num_attention_heads=2, head_dim=spec.vision_hidden // 2, patch_size=patch,
                           image_size=spec.image_size),
        image_token_index=ids("[IMG]"), spatial_merge_size=merge, vision_feature_layer=-1, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config)
    set_generation_ids(model, tokenizer, stop=[tokenizer.eos_token_id])
    return model.eval(), processor
