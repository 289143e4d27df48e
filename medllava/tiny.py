"""Named small configurations with random weights, built offline, for tests and the demo.

The tokenizer is a real byte-level BPE trained on the fly (deterministically) on a shipped corpus
of medical sentences, so it round-trips any text and has the special tokens a llava-hf checkpoint
has (`<s>`, `</s>`, `<unk>`, `<pad>`, `<image>`; a Qwen2-based one, LLaVA-OneVision: `<|endoftext|>`,
`<|im_start|>`, `<|im_end|>`, `<image>`, `<video>` and no BOS). Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from medllava.records import IMAGE_PLACEHOLDER

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_PLACEHOLDER]
QWEN2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_PLACEHOLDER, "<video>"]

# A llava-hf style chat template over structured content, ending each reply with the EOS token.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# llava-hf's LLaVA-OneVision template (transformers' convert_llava_onevision_weights_to_hf.py): Qwen2's
# ChatML, images first in a user turn, each reply ending `<|im_end|>` (the EOS) and a newline.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a named random-weight LLaVA."""

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vision_hidden: int
    vision_layers: int
    image_size: int
    patch_size: int
    max_positions: int
    init_std: float = 0.02
    family: str = "llava"
    """The architecture (medllava.families): llava, or llava_next / llava_onevision with `grid` tiles."""
    grid: tuple[tuple[int, int], ...] = ()
    """LLaVA-NeXT's image_grid_pinpoints, (height, width) in pixels: multiples of image_size."""
    max_tiles: int = 0
    """LLaVA-OneVision's `anyres_max_N`: a grid's features are shrunk (bilinear) to about N tiles' worth."""
    qwen2: bool = False
    """As LLaVA-OneVision: a SigLIP tower (no CLS, every patch kept), a Qwen2 language model and its ChatML
    tokens; otherwise a CLIP tower (CLS dropped) and a LLaMA language model."""

    @property
    def builder(self):
        """The function building a family whose processor is not LLaVA's (medllava.tiny_modern), or None."""
        from medllava import tiny_mistral3, tiny_modern, tiny_qwen3_vl, tiny_smolvlm

        return {"qwen2_5_vl": tiny_modern.build_qwen2_5_vl, "gemma3": tiny_modern.build_gemma3,
                "qwen3_vl": tiny_qwen3_vl.build_qwen3_vl,
                "smolvlm": tiny_smolvlm.build_smolvlm, "idefics3": tiny_smolvlm.build_idefics3,
                "mistral3": tiny_mistral3.build_mistral3}.get(self.family)


# `tiny` is for unit tests and the demo (16 image tokens); `small` learns something in minutes on a CPU
# (64 image tokens); `tiny-next` is `tiny` as LLaVA-NeXT, 16-px tiles in grids of up to 2x2 (36 to 88 image
# tokens, by the image's shape). tiny's language model is initialised wider (std 1/sqrt(hidden)) so that, like a
# pretrained model and unlike a 32-wide one at std 0.02, its frozen LM head can express confident
# predictions: otherwise LoRA heads on it could never move its loss off ln(vocabulary).
TINY_SPECS = {
    "tiny": TinySpec(512, 32, 2, 4, 2, 32, 2, 16, 4, 1024, init_std=32**-0.5),
    "small": TinySpec(2048, 128, 4, 4, 4, 64, 2, 64, 8, 2048),
    "tiny-next": TinySpec(512, 32, 2, 4, 2, 32, 2, 16, 4, 1024, init_std=32**-0.5, family="llava_next",
                          grid=((16, 32), (32, 16), (32, 32))),
    # `tiny` as LLaVA-OneVision: 16-px tiles in grids of up to 3x3, whose features shrink past 4 tiles'
    # worth (anyres_max_4): the demo images take 76 to 88 image tokens by their shape.
    "tiny-onevision": TinySpec(512, 32, 2, 4, 2, 32, 2, 16, 4, 1024, init_std=32**-0.5, family="llava_onevision",
                               grid=tuple((16 * h, 16 * w) for h in (1, 2, 3) for w in (1, 2, 3)), max_tiles=4,
                               qwen2=True),
    # `tiny` as Qwen2.5-VL: 4-px patches, 2x2 merged into a token, 4 to 64 tokens an image by its size (the
    # demo images take 64); and as Gemma 3: 32-px images, 8x8 patches pooled to 16 tokens.
    "tiny-qwen2.5-vl": TinySpec(512, 32, 2, 4, 2, 32, 2, 32, 4, 1024, init_std=32**-0.5, family="qwen2_5_vl"),
    "tiny-gemma3": TinySpec(512, 32, 2, 4, 2, 32, 2, 32, 4, 1024, init_std=32**-0.5, family="gemma3"),
    # `tiny` as SmolVLM and Idefics3: images split into 16-px tiles (up to 2x2) plus the global image, 16 tokens each.
    "tiny-smolvlm": TinySpec(512, 32, 2, 4, 2, 32, 2, 16, 2, 1024, init_std=32**-0.5, family="smolvlm"),
    "tiny-idefics3": TinySpec(512, 32, 2, 4, 2, 32, 2, 16, 2, 1024, init_std=32**-0.5, family="idefics3"),
    # `tiny` as Qwen3-VL: the real 16-px patches, 2x2 merged into a token, 4 to 64 tokens an image by its size.
    "tiny-qwen3-vl": TinySpec(512, 32, 2, 4, 2, 32, 2, 32, 16, 1024, init_std=32**-0.5, family="qwen3_vl"),
    # `tiny` as Mistral 3: 4-px patches, 2x2 merged into an [IMG], images at most 32 px a side (up to 4 rows of 4).
    "tiny-mistral3": TinySpec(512, 32, 2, 4, 2, 32, 2, 32, 4, 1024, init_std=32**-0.5, family="mistral3"),
}


def build_tokenizer(vocab_size: int, qwen2: bool = False, family: str = "llava"):
    """A byte-level BPE tokenizer trained on the shipped corpus, as a transformers fast tokenizer; with
    `qwen2`, Qwen2's special tokens and no BOS, as LLaVA-OneVision's tokenizer; for `family` qwen2_5_vl or
    gemma3, that family's special tokens (medllava.tiny_modern)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family in ("qwen2_5_vl", "qwen3_vl", "gemma3", "smolvlm", "idefics3", "mistral3"):
        return _modern_tokenizer(vocab_size, family)
    corpus = resources.files("medllava").joinpath("assets/tiny_corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN2_SPECIAL_TOKENS if qwen2 else SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    if qwen2:
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            additional_special_tokens=QWEN2_SPECIAL_TOKENS[1:], padding_side="right", model_max_length=4096)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=[IMAGE_PLACEHOLDER],
        padding_side="right",
        model_max_length=4096,
    )


def _trained_bpe(vocab_size: int, specials: list[str]):
    """The byte-level BPE trained on the shipped corpus with `specials` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = resources.files("medllava").joinpath("assets/tiny_corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return tok


def _modern_tokenizer(vocab_size: int, family: str):
    """The trained BPE with a Qwen2-VL tokenizer's special tokens (no BOS, `<|im_end|>` ends a turn) or
    Gemma 3's (BOS written by the chat template, image tokens declared by name)."""
    from transformers import PreTrainedTokenizerFast

    from medllava.tiny_modern import GEMMA3_SPECIALS, GEMMA3_TOKEN_ATTRIBUTES, QWEN2_VL_SPECIALS
    from medllava.tiny_smolvlm import smolvlm_tokenizer

    if family == "mistral3":
        from medllava.tiny_mistral3 import tiny_tokenizer
        return tiny_tokenizer(vocab_size)
    if family in ("smolvlm", "idefics3"):  # medllava.tiny_smolvlm
        return smolvlm_tokenizer(_trained_bpe, vocab_size, family)
    if family in ("qwen2_5_vl", "qwen3_vl"):
        return PreTrainedTokenizerFast(
            tokenizer_object=_trained_bpe(vocab_size, list(QWEN2_VL_SPECIALS)), eos_token="<|im_end|>",
            pad_token="<|endoftext|>", additional_special_tokens=list(QWEN2_VL_SPECIALS[1:]), padding_side="right",
            model_max_length=4096)
    return PreTrainedTokenizerFast(
        tokenizer_object=_trained_bpe(vocab_size, list(GEMMA3_SPECIALS)), bos_token="<bos>", eos_token="<eos>",
        pad_token="<pad>", unk_token="<unk>", additional_special_tokens=list(GEMMA3_SPECIALS[4:]),
        extra_special_tokens=GEMMA3_TOKEN_ATTRIBUTES, padding_side="right", model_max_length=4096)


def build_tiny(name: str, seed: int = 0):
    """Build `(model, processor)` for a named spec with random weights (seeded)."""
    import torch
    import transformers

    from medllava.families import get_family, new_processor

    if name not in TINY_SPECS:
        raise ValueError(f"unknown named model {name!r}; choose one of {', '.join(TINY_SPECS)} or a checkpoint folder")
    spec = TINY_SPECS[name]
    if spec.builder is not None:
        return spec.builder(build_tokenizer(spec.vocab_size, family=spec.family), spec, seed=seed)
    family = get_family(spec.family)
    tokenizer = build_tokenizer(spec.vocab_size, qwen2=spec.qwen2)
    processor = new_processor(family, tokenizer=tokenizer, **_processor_parts(spec))
    config = getattr(transformers, family.model_class).config_class(**_config_fields(spec, tokenizer))
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval(), processor


def _processor_parts(spec: TinySpec) -> dict:
    """The processor's parts and settings other than the tokenizer: LLaVA-OneVision's (tiles resized to a
    square, a video processor that medllava never calls), or CLIP's preprocessing with, given a grid,
    LLaVA-NeXT's tiling on top of it."""
    size = spec.image_size
    pinpoints = [list(hw) for hw in spec.grid]
    if spec.qwen2:
        # The video processor comes from its module: transformers exports it only with torchvision, which it
        # needs for videos, never for images.
        from transformers import LlavaOnevisionImageProcessorPil
        from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

        square = {"height": size, "width": size}
        return dict(image_processor=LlavaOnevisionImageProcessorPil(size=square, image_grid_pinpoints=pinpoints),
                    video_processor=LlavaOnevisionVideoProcessor(size=square),
                    num_image_tokens=(size // spec.patch_size) ** 2, vision_feature_select_strategy="full",
                    vision_aspect_ratio=f"anyres_max_{spec.max_tiles}", chat_template=CHATML_TEMPLATE)
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor

    common = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}, "do_center_crop": True}
    image_processor = (LlavaNextImageProcessor(**common, image_grid_pinpoints=pinpoints) if spec.grid
                       else CLIPImageProcessor(**common))
    return dict(image_processor=image_processor, patch_size=spec.patch_size, vision_feature_select_strategy="default",
                num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def _config_fields(spec: TinySpec, tokenizer) -> dict:
    """The model config of the spec: a CLIP tower and a LLaMA language model (or SigLIP and Qwen2) and the
    family's own fields."""
    from transformers import CLIPVisionConfig, LlamaConfig, Qwen2Config, SiglipVisionConfig

    size = spec.image_size
    tower = dict(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2,
                 num_hidden_layers=spec.vision_layers, num_attention_heads=2, image_size=size, patch_size=spec.patch_size)
    fields = dict(
        vision_config=(SiglipVisionConfig(**tower, vision_use_head=False) if spec.qwen2
                       else CLIPVisionConfig(**tower, projection_dim=spec.vision_hidden)),
        text_config=(Qwen2Config if spec.qwen2 else LlamaConfig)(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden,
            intermediate_size=spec.hidden * 2,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            max_position_embeddings=spec.max_positions,
            initializer_range=spec.init_std,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    if spec.qwen2:  # OneVision's choice: the last layer's every patch
        fields.update(vision_feature_layer=-1, vision_feature_select_strategy="full",
                      video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                      vision_aspect_ratio=f"anyres_max_{spec.max_tiles}")
    if spec.grid:
        fields["image_grid_pinpoints"] = [list(hw) for hw in spec.grid]
    else:
        fields["image_seq_length"] = (size // spec.patch_size) ** 2
    return fields


def demo_data() -> tuple[Path, Path]:
    """The embedded demo conversations and their image folder (real VQA-RAD rows, CC0)."""
    root = Path(str(resources.files("medllava").joinpath("assets/demo")))
    return root / "conversations.jsonl", root / "images"
