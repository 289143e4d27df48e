"""`medllava convert`: an original LLaVA / LLaVA-Med checkpoint to a llava-hf checkpoint folder.

The output is a folder of one of `medllava.families`, which `medllava.model.build_model` loads:
`LlavaForConditionalGeneration` + `LlavaProcessor`, or, for LLaVA-NeXT's tiling (`image_aspect_ratio:
anyres`), `LlavaNextForConditionalGeneration` + `LlavaNextProcessor`. Reading and checking the original
layout, and renaming its tensors, is `medllava.commands.original_layout`; this file builds the llava-hf side
from it (config, tokenizer, processor with a chat template) and writes the folder:

    original                              llava-hf
    mm_vision_select_layer                vision_feature_layer
    mm_vision_select_feature patch|cls_patch   vision_feature_select_strategy default|full
    mm_projector_type mlp2x_gelu|linear   projector_hidden_act gelu|linear
    image_aspect_ratio pad                LlavaImageProcessor do_pad (pad to square with the mean colour)
    image_aspect_ratio anyres             llava_next: LlavaNextConfig + LlavaNextImageProcessor
      + mm_patch_merge_type spatial_unpad   (what LlavaNext's pack_image_features does; nothing to set)
    image_grid_pinpoints [[w, h], ...]    image_grid_pinpoints [[h, w], ...], in the config and the image
                                          processor (do_pad there pads the tile count for batching)
    CLIP size / crop_size                 the image size (llava); anyres: the squashed base view's size
                                          and the tile size

`<image>` is added to the tokenizer and the vocabulary padded to a multiple of 64, new rows set to the
mean of the trained ones.

The image processor is written as transformers' Llava(Next)ImageProcessor; loading picks its backend, the
torchvision one when torchvision is installed, whose bicubic resize differs slightly from the PIL resize
of the CLIPImageProcessor LLaVA trained with (the PIL backend reproduces it).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medllava.commands.original_layout import (
    PROJECTORS, SELECT_FEATURE, ConvertError, Source, check_grid, load_weights, map_weights, read_source,
    resolve_vision,
)
from medllava.families import FAMILIES
from medllava.records import IMAGE_PLACEHOLDER
from medllava.templates import get_template

log = logging.getLogger(__name__)

VOCAB_MULTIPLE = 64
# Fields of the original config that belong to LLaVA's wrapper, not to the language model.
LLAVA_FIELDS = {"architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype",
                "use_mm_proj", "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length",
                "tokenizer_padding_side", "max_length"}
LLAVA_PREFIXES = ("mm_", "tune_mm", "freeze_mm", "unfreeze_mm")
BICUBIC = 3  # PIL's resampling code, as preprocessor_config.json writes it
# llava-hf family -> its image processor: the PIL backend, which resizes as the CLIPImageProcessor that LLaVA
# trained with did, else the one class of releases before the backend split.
IMAGE_PROCESSORS = {"llava": ("LlavaImageProcessorPil", "LlavaImageProcessor"),
                    "llava_next": ("LlavaNextImageProcessorPil", "LlavaNextImageProcessor")}


def image_processor_kwargs(preprocessor: dict, image_size: int, pad: bool,
                           grid: list[list[int]] | None = None) -> dict:
    """Image processor settings from a CLIP preprocessor_config.json (older files give sizes as ints).

    With `grid` (anyres: [height, width] pairs) they are LlavaNextImageProcessor's: CLIP's size is the
    base view's, its crop the tile's, and do_pad pads the tile count for batching (never the image).
    """
    size = preprocessor.get("size", image_size)
    crop = preprocessor.get("crop_size", image_size)
    kwargs = {
        "size": {"shortest_edge": size} if isinstance(size, int) else size,
        "crop_size": {"height": crop, "width": crop} if isinstance(crop, int) else crop,
        "do_pad": pad,
    }
    for key in ("image_mean", "image_std", "resample", "do_center_crop", "rescale_factor"):
        if key in preprocessor:
            kwargs[key] = preprocessor[key]
    final = kwargs["crop_size"] if kwargs.get("do_center_crop", True) else kwargs["size"]
    side = final.get("height", final.get("shortest_edge"))
    if side != image_size:
        raise ConvertError(f"preprocessing yields {side}px images but the vision tower takes {image_size}px")
    if grid is not None:
        # The original resizes into the grid and squashes the base view with PIL's default, bicubic;
        # LlavaNextImageProcessor uses the one `resample` for those and for CLIP's resize.
        if kwargs.get("resample", BICUBIC) != BICUBIC:
            raise ConvertError(f"preprocessor resample {kwargs['resample']} with image_aspect_ratio 'anyres': the "
                               f"original tiles with bicubic ({BICUBIC}), LlavaNext with the one resample for all")
        kwargs.update(image_grid_pinpoints=grid, do_pad=True)
    return kwargs


def pad_vocab(weights: dict, rows: int) -> int:
    """Grow the embedding and LM head to `rows`, new rows set to the mean of the trained ones.

    A mean row gives a new token an ordinary embedding and an average logit, so the model is not pushed
    to generate `<image>`. Returns the old row count.
    """
    import torch

    old = weights["model.language_model.embed_tokens.weight"].shape[0]
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key in weights and rows > old:
            w = weights[key]
            mean = w.float().mean(dim=0, keepdim=True).to(w.dtype)
            weights[key] = torch.cat([w, mean.expand(rows - old, -1)])
    return old


def text_config(source: Source, vocab_size: int, tokenizer):
    """The language model's config: the original config without LLaVA's wrapper fields."""
    from transformers import AutoConfig

    fields = {k: v for k, v in source.config.items() if k not in LLAVA_FIELDS and not k.startswith(LLAVA_PREFIXES)}
    if fields.get("rope_scaling", 0) is None:  # absent and null mean the same; null only draws a deprecation warning
        del fields["rope_scaling"]
    fields.update(vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id)
    return AutoConfig.for_model(source.family, **fields)


def prepare_tokenizer(source: Source):
    """The source tokenizer with `<image>` added and a pad token (LLaVA trained with pad = unk)."""
    from transformers import AddedToken, AutoConfig, AutoTokenizer

    cfg = source.config
    try:
        # The language model's config, not config.json, which transformers would misread as a llava-hf one.
        tokenizer = AutoTokenizer.from_pretrained(source.path, config=AutoConfig.for_model(source.family))
    except Exception as e:  # transformers raises many types for unreadable tokenizer files
        raise ConvertError(f"{source.path}: tokenizer files could not be loaded ({type(e).__name__}: {e})") from None
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if cfg.get("tokenizer_model_max_length"):
        tokenizer.model_max_length = cfg["tokenizer_model_max_length"]
    return tokenizer


def build_processor(source: Source, tokenizer, vision_cfg, image_kwargs: dict, strategy: str):
    """The family's processor with the source's preprocessing and the chat template of its conversation style."""
    import transformers

    pil, fallback = IMAGE_PROCESSORS[source.architecture]
    image_processor = getattr(transformers, pil, None) or getattr(transformers, fallback)
    return getattr(transformers, FAMILIES[source.architecture].processor_class)(
        image_processor=image_processor(**image_kwargs),
        tokenizer=tokenizer,
        patch_size=vision_cfg.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=get_template(source.template).jinja,
    )


def _dtype_of(source: Source, name: str | None):
    import torch

    table = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    name = name or source.config.get("torch_dtype") or source.config.get("dtype")
    return table.get(name, torch.float16)


def _assemble(model_class, config, weights: dict):
    """`model_class` (the family's) holding `weights`, for saving.

    The skeleton is built on the meta device and the converted tensors are moved in, so a 7B model is
    never held twice. Its derived buffers (rotary frequencies, position ids) stay on meta: they are not
    saved, and loading the saved folder recomputes them.
    """
    import torch

    with torch.device("meta"):
        model = model_class(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ConvertError(f"{len(missing)} llava-hf weights have no source tensor (first: {missing[:3]}) and "
                           f"{len(unexpected)} source tensors have no place (first: {unexpected[:3]})")
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:  # shape mismatches between the weights and the config
        raise ConvertError(f"the weights do not fit the converted config: {e}") from None
    return model.eval()


def convert(src: str | Path, out: str | Path, vision_tower: str | Path | None = None,
            dtype: str | None = None) -> dict:
    """Convert the original-layout checkpoint `src` into the llava-hf folder `out`; returns a summary.

    `dtype` (float16, bfloat16, float32) defaults to the source's torch_dtype, else float16.
    """
    import math

    import transformers

    from medllava.model import check_checkpoint_dir, save_model

    source = read_source(Path(src))
    target_dtype = _dtype_of(source, dtype)
    # The tokenizer fixes the vocabulary size and the image token id that the weights and config need.
    tokenizer = prepare_tokenizer(source)
    weights = load_weights(source.weight_files, target_dtype)
    vision_cfg, preprocessor, vision = resolve_vision(
        source, weights, Path(vision_tower) if vision_tower else None, target_dtype)
    pad = source.config.get("image_aspect_ratio") == "pad"
    check_grid(source, vision_cfg.image_size)
    image_kwargs = image_processor_kwargs(preprocessor, vision_cfg.image_size, pad, source.grid_pinpoints)
    projector = source.config.get("mm_projector_type", "linear")
    weights = map_weights(weights, vision, source, target_dtype)
    rows = len(weights["model.language_model.embed_tokens.weight"])
    rows = math.ceil(max(len(tokenizer), rows) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    old_rows = pad_vocab(weights, rows)

    strategy = SELECT_FEATURE[source.config.get("mm_vision_select_feature", "patch")]
    text = text_config(source, rows, tokenizer)
    model_class = getattr(transformers, FAMILIES[source.architecture].model_class)
    grid = {"image_grid_pinpoints": source.grid_pinpoints} if source.grid_pinpoints else {}
    config = model_class.config_class(
        vision_config=vision_cfg,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        image_seq_length=(vision_cfg.image_size // vision_cfg.patch_size) ** 2 + (strategy == "full"),
        vision_feature_layer=source.config["mm_vision_select_layer"],
        vision_feature_select_strategy=strategy,
        projector_hidden_act=PROJECTORS[projector],
        multimodal_projector_bias="model.multi_modal_projector.linear_1.bias" in weights,
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        **grid,
    )
    model = _assemble(model_class, config, weights)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))

    processor = build_processor(source, tokenizer, vision_cfg, image_kwargs, strategy)
    log.info("writing %s", out)
    save_model(model, processor, out)
    check_checkpoint_dir(Path(out))
    return {
        "out": str(out), "architecture": source.architecture, "family": source.family, "template": source.template,
        "dtype": str(target_dtype).removeprefix("torch."),
        "projector": projector, "vision_feature_select_strategy": strategy, "pad_to_square": pad,
        "vocab": f"{old_rows} -> {rows}", "image_token_index": config.image_token_index,
        "image_seq_length": config.image_seq_length, **grid,
    }


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert an original LLaVA / LLaVA-Med checkpoint to llava-hf format",
        description=(
            "Convert a checkpoint in the original LLaVA layout (config.json model_type llava, or llava_mistral "
            "for LLaVA-Med v1.5; safetensors weights; tokenizer files) into a llava-hf folder "
            "(LlavaForConditionalGeneration + LlavaProcessor with the matching chat template, or "
            "LlavaNextForConditionalGeneration + LlavaNextProcessor for LLaVA-NeXT's image_aspect_ratio anyres) "
            "that every medllava command loads. Pickle (.bin) weights are refused: convert them to safetensors first."
        ),
    )
    p.add_argument("--src", type=Path, required=True, metavar="DIR", help="original-layout checkpoint folder")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="llava-hf checkpoint folder to write")
    p.add_argument("--vision-tower", type=Path, metavar="DIR",
                   help="local CLIP folder (config.json, preprocessor_config.json, safetensors): needed when the "
                        "checkpoint did not save its vision tower, as LLaVA-1.5 releases do not")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                   help="weight dtype of the output (default: the source's torch_dtype, else float16)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    if args.out.exists() and args.out.resolve() == args.src.resolve():
        raise ConvertError(f"--out {args.out} is the source folder; write the conversion elsewhere")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise ConvertError(f"{args.out} exists and is not empty; pass --overwrite to replace it")
    summary = convert(args.src, args.out, args.vision_tower, args.dtype)
    width = max(map(len, summary))
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    return 0
