"""Model shapes the benchmarks measure, as transformers configs (no weights).

`llava-7b` is LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 image tokens, features from the second-to-last
layer), a 32-layer 4096-wide Llama with a 32064-token vocabulary, and the two-layer MLP projector.
`llava-next-7b` is LLaVA-NeXT-7B (llava-v1.6-mistral-7b-hf) at 672 px: the same CLIP tower on 336-px tiles
laid out by the pinpoints [[336,672],[672,336],[672,672],[1008,336],[336,1008]] (up to 2928 image tokens per
image, by its size), a 32-layer 4096-wide Mistral (8 key-value heads, 14336 intermediate, rope theta 1e6) with
a 32064-token vocabulary, the MLP projector and image_newline.
`tiny` and `small` are medllava's named random-weight models. `random_7b_processor` is the
processor the random 7B checkpoints carry: CLIP's 336 px preprocessing (LLaVA-NeXT's tiling on top for
llava-next-7b) and medllava's small byte-level BPE tokenizer (no download; it splits biomedical text into
more tokens than LLaMA's tokenizer does).
"""

from __future__ import annotations

RANDOM_7B = ("llava-7b", "llava-next-7b")
"""The 7B shapes built with random weights (no download)."""
SHAPES = ("llava-7b", "tiny", "small")
"""The shapes benchmarks/zero3_memory.py counts (LLaVA-1.5 modules only); `shape_config` builds llava-next-7b too."""
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
"""llava-v1.6-mistral-7b-hf's image_grid_pinpoints, (height, width): transformers' LlavaNextConfig default."""


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


def llava_next_7b_config(tokenizer=None, layers: int | None = None):
    """LLaVA-NeXT-7B's (Mistral, 672 px) LlavaNextConfig; `tokenizer` and `layers` as `llava_7b_config`."""
    from transformers import LlavaNextConfig, MistralConfig

    llava = llava_7b_config(tokenizer, layers)  # the same CLIP tower, <image> id and feature settings
    ids = {key: getattr(llava.text_config, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    text = MistralConfig(vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers or 32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                         rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None, **ids)
    return LlavaNextConfig(vision_config=llava.vision_config, text_config=text,
                           image_token_index=llava.image_token_index, image_grid_pinpoints=NEXT_PINPOINTS,
                           image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default",
                           projector_hidden_act="gelu")


def random_7b_processor(shape: str = "llava-7b"):
    """The processor of a random 7B shape: 336 px CLIP preprocessing (576 image tokens; llava-next-7b: tiles
    of it on NEXT_PINPOINTS) and the stand-in tokenizer (medllava's byte-level BPE, trained on its shipped
    corpus)."""
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    from medllava.tiny import CHAT_TEMPLATE, build_tokenizer

    common = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
    if shape == "llava-next-7b":
        cls, images = LlavaNextProcessor, LlavaNextImageProcessor(**common, image_grid_pinpoints=NEXT_PINPOINTS)
    else:
        cls, images = LlavaProcessor, CLIPImageProcessor(**common)
    return cls(image_processor=images, tokenizer=build_tokenizer(32000), patch_size=14,
               vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def random_7b_config(shape: str, tokenizer=None, layers: int | None = None):
    """The config of a shape in RANDOM_7B."""
    return (llava_next_7b_config if shape == "llava-next-7b" else llava_7b_config)(tokenizer, layers)


def shape_config(name: str):
    """The config of a shape in SHAPES or RANDOM_7B."""
    if name in RANDOM_7B:
        return random_7b_config(name)
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(dict.fromkeys((*RANDOM_7B, *SHAPES)))}")
    from medllava.tiny import build_tiny

    return build_tiny(name)[0].config  # the named models are a few MB: built to read back their config


def model_class(config):
    """The transformers class of `config`'s family (medllava.families)."""
    import transformers

    from medllava.families import get_family

    return getattr(transformers, get_family(config.model_type).model_class)


def meta_model(config):
    """The model of `config` on the meta device: every parameter has its shape and none has memory, so a
    7B model is counted in a second."""
    import torch

    with torch.device("meta"):
        return model_class(config)(config)
