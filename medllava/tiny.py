"""Named small configurations with random weights, built offline, for tests and the demo.

The tokenizer is a real byte-level BPE trained on the fly (deterministically) on a shipped corpus
of medical sentences, so it round-trips any text and has the special tokens a llava-hf checkpoint
has (`<s>`, `</s>`, `<unk>`, `<pad>`, `<image>`). Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from medllava.records import IMAGE_PLACEHOLDER

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_PLACEHOLDER]

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
    """The architecture (medllava.families): llava, or llava_next with `grid` tiles."""
    grid: tuple[tuple[int, int], ...] = ()
    """LLaVA-NeXT's image_grid_pinpoints, (height, width) in pixels: multiples of image_size."""


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
}


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the shipped corpus, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = resources.files("medllava").joinpath("assets/tiny_corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
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


def build_tiny(name: str, seed: int = 0):
    """Build `(model, processor)` for a named spec with random weights (seeded)."""
    import torch
    import transformers

    from medllava.families import get_family

    if name not in TINY_SPECS:
        raise ValueError(f"unknown named model {name!r}; choose one of {', '.join(TINY_SPECS)} or a checkpoint folder")
    spec = TINY_SPECS[name]
    family = get_family(spec.family)
    tokenizer = build_tokenizer(spec.vocab_size)
    processor = getattr(transformers, family.processor_class)(
        image_processor=_image_processor(spec),
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    config = getattr(transformers, family.model_class).config_class(**_config_fields(spec, tokenizer))
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval(), processor


def _image_processor(spec: TinySpec):
    """CLIP's preprocessing at the spec's size; with a grid, LLaVA-NeXT's tiling on top of it."""
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor

    size = spec.image_size
    common = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}, "do_center_crop": True}
    if spec.grid:
        return LlavaNextImageProcessor(**common, image_grid_pinpoints=[list(hw) for hw in spec.grid])
    return CLIPImageProcessor(**common)


def _config_fields(spec: TinySpec, tokenizer) -> dict:
    """The model config of the spec: a CLIP tower, a LLaMA language model and the family's own fields."""
    from transformers import CLIPVisionConfig, LlamaConfig

    size = spec.image_size
    fields = dict(
        vision_config=CLIPVisionConfig(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 2,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=2,
            image_size=size,
            patch_size=spec.patch_size,
            projection_dim=spec.vision_hidden,
        ),
        text_config=LlamaConfig(
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
    if spec.grid:
        fields["image_grid_pinpoints"] = [list(hw) for hw in spec.grid]
    else:
        fields["image_seq_length"] = (size // spec.patch_size) ** 2
    return fields


def demo_data() -> tuple[Path, Path]:
    """The embedded demo conversations and their image folder (real VQA-RAD rows, CC0)."""
    root = Path(str(resources.files("medllava").joinpath("assets/demo")))
    return root / "conversations.jsonl", root / "images"
