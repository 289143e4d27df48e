"""Model shapes the benchmarks measure, as transformers configs (no weights).

`llava-7b` is LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 image tokens, features from the second-to-last
layer), a 32-layer 4096-wide Llama with a 32064-token vocabulary, and the two-layer MLP projector.
`tiny` and `small` are medllava's named random-weight models. `random_7b_processor` is the processor the
random 7B checkpoints carry: CLIP's 336 px preprocessing and medllava's small byte-level BPE tokenizer
(no download; it splits biomedical text into more tokens than LLaMA's tokenizer does).
"""

from __future__ import annotations

SHAPES = ("llava-7b", "tiny", "small")


def llava_7b_config(tokenizer=None, layers: int | None = None):
    """LLaVA-1.5-7B's LlavaConfig; with `tokenizer`, its special and `<image>` token ids are used.
    `layers` shrinks the language model (to try the code path on a small machine)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    ids = {} if tokenizer is None else {key: getattr(tokenizer, key)
                                        for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                                num_hidden_layers=layers or 32, num_attention_heads=32, num_key_value_heads=32,
                                max_position_embeddings=4096, **ids),
        image_token_index=32000 if tokenizer is None else tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def random_7b_processor():
    """A LlavaProcessor for the llava-7b shape: 336 px CLIP preprocessing (576 image tokens) and the
    stand-in tokenizer (medllava's byte-level BPE, trained on its shipped corpus)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from medllava.tiny import CHAT_TEMPLATE, build_tokenizer

    return LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=build_tokenizer(32000), patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def shape_config(name: str):
    """The LlavaConfig of a shape in SHAPES."""
    if name == "llava-7b":
        return llava_7b_config()
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    from medllava.tiny import build_tiny

    return build_tiny(name)[0].config  # the named models are a few MB: built to read back their config


def meta_model(config):
    """`LlavaForConditionalGeneration(config)` on the meta device: every parameter has its shape and
    none has memory, so a 7B model is counted in a second."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)
