"""A random-weight Qwen3-VL at test sizes: transformers' own `Qwen3VLForConditionalGeneration`, its processor
built from parts (the tokenizer, the Qwen2-VL PIL image processor with Qwen3-VL's settings, the chat template
the Qwen3-VL Instruct checkpoints ship), so the processor is the one inference uses, without torchvision.

Qwen3-VL differs from Qwen2.5-VL where medllava looks: 16-px patches (14 in Qwen2.5-VL), a learned position
embedding the vision tower resamples to each image's grid, DeepStack mergers that feed features of chosen
vision layers into the first decoder layers (`deepstack_merger_list`, trained with the merger), interleaved
3-D rope sections, and a chat template with no default system prompt.
"""

from __future__ import annotations


def build_qwen3_vl(tokenizer, spec, seed: int = 0):
    """`(model, processor)`: Qwen3-VL with `spec`'s sizes on `tokenizer` (which must hold the Qwen2-VL special
    tokens, `medllava.tiny_modern.QWEN2_VL_SPECIALS`). Images are cut into `spec.patch_size` patches (16 as in
    the real models), 2x2 of which the merger joins into one token, between 4 and 64 tokens an image (min/max
    pixels); each vision layer feeds one DeepStack merger, as the real tower's layers 8, 16 and 24 do."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from medllava.tiny_modern import qwen_vl_processor, qwen_vl_token_ids, set_generation_ids

    merge, patch = 2, spec.patch_size
    # Qwen3-VL's preprocessor_config.json: mean and std 0.5, temporal patches of 2 frames.
    processor = qwen_vl_processor("qwen3_vl", "qwen3_vl", tokenizer, spec, image_mean=[0.5, 0.5, 0.5],
                                  image_std=[0.5, 0.5, 0.5])
    ids = tokenizer.convert_tokens_to_ids
    head_dim = spec.hidden // spec.heads
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.hidden * 2,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads, head_dim=head_dim,
                         num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_positions,
                         initializer_range=spec.init_std, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=ids("<|im_end|>"),
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True,
                                          "mrope_section": mrope_section(head_dim)}),
        vision_config=dict(depth=spec.vision_layers, hidden_size=spec.vision_hidden,
                           intermediate_size=spec.vision_hidden * 2, num_heads=2, out_hidden_size=spec.hidden,
                           patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2,
                           num_position_embeddings=64, deepstack_visual_indexes=list(range(spec.vision_layers)),
                           initializer_range=spec.init_std),
        **qwen_vl_token_ids(tokenizer), tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    set_generation_ids(model, tokenizer, stop=[ids("<|im_end|>"), ids("<|endoftext|>")])
    return model.eval(), processor


def mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL's split of the rotary frequencies between time, height and width (24/20/20 of 64 in the real
    models, interleaved), scaled to `head_dim // 2`; height and width each keep at least one."""
    half = head_dim // 2
    h = max(1, round(half * 20 / 64))
    return [half - 2 * h, h, h]
