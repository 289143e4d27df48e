"""Random-weight SmolVLM (SmolVLM, SmolVLM2) and Idefics3 models: the family's own transformers classes at test
sizes, with image splitting on, as the checkpoints ship it.

An image is resized so its longest edge is `2 * spec.image_size` (the checkpoints: 4 x 364 or 4 x 512), cut
into tiles of `spec.image_size` px (up to 2 x 2), and followed by the whole image at tile size (the global
image); each tile takes `(image_size / patch_size)^2 / scale_factor^2` image tokens, written as the processor
writes them: `<fake_token_around_image><row_1_col_1><image>*N ...\\n\\n<fake_token_around_image><global-img>
<image>*N<fake_token_around_image>`. The processor is built from parts (a tokenizer with the family's special
tokens, the family's PIL image processor, the chat template its checkpoints ship, in
`assets/chat_templates/`): SmolVLM's imports torchvision only for its video processor, so it gets
transformers' base video processor, which nothing here calls.
"""

from __future__ import annotations

from medllava.tiny_modern import set_generation_ids, chat_template

ROW_COL_TOKENS = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
"""The tile-position tokens both processors write (up to a 6 x 6 grid)."""
IMAGE_SPECIALS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *ROW_COL_TOKENS)
"""The image and turn tokens of both families' tokenizers."""
SMOLVLM_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *IMAGE_SPECIALS)
"""SmolVLM's (SmolLM2's) tokenizer: unk `<|endoftext|>`, BOS `<|im_start|>` (written by the chat template, never
added by the tokenizer), pad `<|im_end|>`, EOS `<end_of_utterance>`."""
IDEFICS3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", *IMAGE_SPECIALS)
"""Idefics3-8B-Llama3's tokenizer: Llama 3's BOS (added by the tokenizer and written by the chat template) and
EOS, a pad token, and the image tokens."""
SCALE_FACTOR = 2
"""The connector's pixel shuffle: 2 x 2 patches become one token (the checkpoints: 3 for SmolVLM-Instruct,
4 for SmolVLM2-256M/500M, 2 for Idefics3)."""


def build_smolvlm(tokenizer, spec, seed: int = 0):
    """`(model, processor)`: SmolVLM with `spec`'s sizes on `tokenizer` (which must hold `SMOLVLM_SPECIALS`)."""
    return _build("smolvlm", tokenizer, spec, seed)


def build_idefics3(tokenizer, spec, seed: int = 0):
    """`(model, processor)`: Idefics3 with `spec`'s sizes on `tokenizer` (which must hold `IDEFICS3_SPECIALS`)."""
    return _build("idefics3", tokenizer, spec, seed)


def _build(family_name: str, tokenizer, spec, seed: int):
    import torch
    import transformers
    from transformers import LlamaConfig

    from medllava.families import FAMILIES, new_processor

    family = FAMILIES[family_name]
    tile = spec.image_size
    image_processor = getattr(transformers, family.image_processor_pil)(
        do_image_splitting=True, size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile})
    seq_len = (tile // spec.patch_size) ** 2 // SCALE_FACTOR**2
    parts = dict(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len,
                 chat_template=chat_template(family_name))
    if family_name == "smolvlm":
        from transformers.video_processing_utils import BaseVideoProcessor

        parts["video_processor"] = BaseVideoProcessor()
    processor = new_processor(family, **parts)
    ids = tokenizer.convert_tokens_to_ids
    model_class = getattr(transformers, family.model_class)
    config = model_class.config_class(
        vision_config=dict(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2,
                           num_hidden_layers=spec.vision_layers, num_attention_heads=2, image_size=tile,
                           patch_size=spec.patch_size),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.hidden * 2,
                                num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                                num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_positions,
                                initializer_range=spec.init_std, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_id=ids("<image>"), scale_factor=SCALE_FACTOR, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    stop = [ids("<end_of_utterance>"), tokenizer.eos_token_id]
    set_generation_ids(model, tokenizer, stop=list(dict.fromkeys(stop)))
    return model.eval(), processor


def smolvlm_tokenizer(trained_bpe, vocab_size: int, family: str):
    """The trained BPE (`trained_bpe(vocab_size, specials)`, medllava.tiny's) with SmolVLM's special tokens
    (`SMOLVLM_SPECIALS`) or Idefics3's (`IDEFICS3_SPECIALS`, BOS added as Llama 3's tokenizer adds it)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if family == "smolvlm":
        return PreTrainedTokenizerFast(
            tokenizer_object=trained_bpe(vocab_size, list(SMOLVLM_SPECIALS)), bos_token="<|im_start|>",
            eos_token="<end_of_utterance>", pad_token="<|im_end|>", unk_token="<|endoftext|>",
            additional_special_tokens=list(IMAGE_SPECIALS), padding_side="right", model_max_length=8192)
    tok = trained_bpe(vocab_size, list(IDEFICS3_SPECIALS))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>", additional_special_tokens=list(IMAGE_SPECIALS),
        padding_side="right", model_max_length=8192)
