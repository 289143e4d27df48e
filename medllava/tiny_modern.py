"""Random-weight models of the families whose processors are not LLaVA's: Qwen2.5-VL and Gemma 3.

Each is the family's own transformers classes at test sizes, its processor built from parts (a tokenizer,
the family's PIL image processor, the chat template its checkpoints ship, in `assets/chat_templates/`),
so the processor is the one inference uses, without torchvision. The tokenizer is given (tests pass the
real Qwen2 and Gemma vocabularies; the named models pass a byte-level BPE trained on the shipped corpus
with the family's special tokens, `medllava.tiny.build_tokenizer`).
"""

from __future__ import annotations

from importlib import resources

QWEN2_VL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                     "<|image_pad|>", "<|video_pad|>")
"""The special tokens of a Qwen2-VL tokenizer that a Qwen2.5-VL model reads (ids 151643-151656 in the real
vocabulary, with others between)."""
GEMMA3_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>")
"""Gemma 3's special tokens (pad 0, eos 1, bos 2, unk 3, turns 105/106, image 255999/256000/262144 in the
real vocabulary)."""
GEMMA3_TOKEN_ATTRIBUTES = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                           "image_token": "<image_soft_token>"}
"""The names Gemma 3's processor reads its image tokens by, as its tokenizer config declares them."""


def chat_template(name: str) -> str:
    """The chat template a family's checkpoints ship (`qwen2_vl`: Qwen2-VL and Qwen2.5-VL; `gemma3`)."""
    return resources.files("medllava").joinpath(f"assets/chat_templates/{name}.jinja").read_text(encoding="utf-8")


def build_qwen2_5_vl(tokenizer, spec, seed: int = 0):
    """`(model, processor)`: Qwen2.5-VL with `spec`'s sizes on `tokenizer` (which must hold
    `QWEN2_VL_SPECIALS`). Images are cut into `spec.patch_size` patches, 2x2 of which the merger joins into
    one token, between 4 and 64 tokens an image (min/max pixels)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    merge, patch = 2, spec.patch_size
    unit = patch * merge
    processor = qwen_vl_processor("qwen2_5_vl", "qwen2_vl", tokenizer, spec)
    ids = tokenizer.convert_tokens_to_ids
    head_dim = spec.hidden // spec.heads
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.hidden * 2,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_positions,
                         initializer_range=spec.init_std, eos_token_id=ids("<|im_end|>"),
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": _mrope_section(head_dim)}),
        vision_config=dict(depth=spec.vision_layers, hidden_size=spec.vision_hidden,
                           intermediate_size=spec.vision_hidden * 2, num_heads=2, out_hidden_size=spec.hidden,
                           patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2, window_size=2 * unit,
                           fullatt_block_indexes=[spec.vision_layers - 1]),
        **qwen_vl_token_ids(tokenizer), tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    set_generation_ids(model, tokenizer, stop=[ids("<|im_end|>"), ids("<|endoftext|>")])
    return model.eval(), processor


def qwen_vl_processor(family: str, template: str, tokenizer, spec, **image_settings):
    """A Qwen-VL family's processor built from parts, without torchvision: the Qwen2-VL PIL image processor on
    `spec.patch_size` patches, 2x2 merged into a token, 4 to 64 tokens an image (min/max pixels), with the
    family's own `image_settings` (Qwen3-VL's mean and std), and the chat template `template`."""
    from transformers import Qwen2VLImageProcessorPil
    from transformers.video_processing_utils import BaseVideoProcessor

    from medllava.families import FAMILIES, new_processor

    unit = spec.patch_size * 2
    image_processor = Qwen2VLImageProcessorPil(patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2,
                                               min_pixels=4 * unit * unit, max_pixels=64 * unit * unit,
                                               **image_settings)
    return new_processor(FAMILIES[family], image_processor=image_processor, tokenizer=tokenizer,
                         video_processor=BaseVideoProcessor(), chat_template=chat_template(template))


def qwen_vl_token_ids(tokenizer) -> dict[str, int]:
    """A Qwen-VL config's vision token ids, as `tokenizer` holds the tokens."""
    ids = tokenizer.convert_tokens_to_ids
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen's split of the rotary frequencies between time, height and width (16/24/24 of 64 in the real
    models), scaled to `head_dim // 2`."""
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_gemma3(tokenizer, spec, seed: int = 0):
    """`(model, processor)`: Gemma 3 with `spec`'s sizes on `tokenizer` (which must hold `GEMMA3_SPECIALS`
    and declare `GEMMA3_TOKEN_ATTRIBUTES`): a SigLIP tower on `spec.image_size` px images whose patches the
    projector average-pools to 16 tokens an image, as the real one pools 4,096 patches to 256."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil
    from transformers import SiglipVisionConfig

    from medllava.families import FAMILIES, new_processor

    size, tokens = spec.image_size, 16
    image_processor = Gemma3ImageProcessorPil(size={"height": size, "width": size})
    processor = new_processor(FAMILIES["gemma3"], image_processor=image_processor, tokenizer=tokenizer,
                              chat_template=chat_template("gemma3"), image_seq_length=tokens)
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.hidden * 2,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.kv_heads, head_dim=spec.hidden // spec.heads,
                         query_pre_attn_scalar=spec.hidden // spec.heads, max_position_embeddings=spec.max_positions,
                         sliding_window=64, layer_types=["sliding_attention"] * (spec.layers - 1) + ["full_attention"],
                         initializer_range=spec.init_std, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, ids("<end_of_turn>")]),
        vision_config=SiglipVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2,
                                         num_hidden_layers=spec.vision_layers, num_attention_heads=2, image_size=size,
                                         patch_size=spec.patch_size, vision_use_head=False),
        mm_tokens_per_image=tokens, boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    set_generation_ids(model, tokenizer, stop=[tokenizer.eos_token_id, ids("<end_of_turn>")])
    return model.eval(), processor


def set_generation_ids(model, tokenizer, stop: list[int]) -> None:
    """Stop where the chat template ends a turn, as the family's instruction-tuned checkpoints do."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = stop
    model.generation_config.bos_token_id = tokenizer.bos_token_id
