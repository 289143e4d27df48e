"""LLaVA-1.5-HD: a LLaVA-1.5 model turned into a tile-grid model, the paper's own high-resolution variant.

transformers implements LLaVA-1.5-HD as LLaVA-NeXT (`anyres`): the image is cut into tiles of the CLIP
tower's own resolution on the best of a list of grids (`image_grid_pinpoints`), each tile is encoded by the
same tower and projector, the tiles' feature maps are merged into one with `image_newline` closing each
row, and a view of the whole image resized to the base resolution comes first. Every weight a LLaVA-1.5
model has keeps its meaning there, so `to_hd` carries the CLIP tower, projector, language model and LM head
over unchanged and adds only `image_newline`, initialised as transformers initialises it.

`medllava.model.build_model` calls `to_hd` when `ModelConfig.grid_pinpoints` is set on a llava model.
"""

from __future__ import annotations

import copy
import math

from medllava.config import ConfigError

GRID_FIELD = "model.grid_pinpoints"
# LlavaConfig fields LlavaNextConfig shares with the same meaning (both define exactly these besides the
# sub-configs; LlavaNext adds image_grid_pinpoints).
SHARED_CONFIG_FIELDS = ("image_token_index", "image_seq_length", "projector_hidden_act",
                        "vision_feature_select_strategy", "vision_feature_layer", "multimodal_projector_bias",
                        "tie_word_embeddings")
# CLIP preprocessing settings the tile processor keeps: every tile, and the whole-image view, is prepared
# as LLaVA-1.5 prepared its one view.
IMAGE_SETTINGS = ("size", "crop_size", "do_resize", "do_center_crop", "resample", "do_rescale", "rescale_factor",
                  "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def check_pinpoints(pinpoints, base: int, field: str = GRID_FIELD) -> list[list[int]]:
    """`pinpoints` as a list of [height, width] pairs; a one-line ConfigError naming the entry unless each
    is two positive pixel sizes, both multiples of `base` (the model's image size: its tiles' size)."""
    if not pinpoints:
        raise ConfigError(f"{field}: empty; give [height, width] pixel sizes such as [[{base}, {2 * base}]]")
    checked = []
    for i, pair in enumerate(pinpoints):
        where = f"{field}[{i}]"
        values = list(pair) if isinstance(pair, (list, tuple)) else pair
        if (not isinstance(values, list) or len(values) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)):
            raise ConfigError(f"{where}: expected [height, width], two positive pixel sizes, got {values!r}")
        if values[0] % base or values[1] % base:
            raise ConfigError(f"{where}: {values} is not a multiple of the model's image size {base} on both"
                              f" sides (each tile is {base}x{base} px), e.g. [{base}, {2 * base}]")
        checked.append(values)
    return checked


def parse_grid(text: str, field: str = "--grid") -> list[list[int]]:
    """'336x672,672x336' (height x width per grid, comma-separated) as [[336, 672], [672, 336]]."""
    pinpoints = []
    for part in text.split(","):
        try:
            height, width = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise ConfigError(f"{field}: {part.strip()!r} is not HEIGHTxWIDTH in pixels, e.g. 336x672") from None
        pinpoints.append([height, width])
    return pinpoints


def to_hd(model, processor, pinpoints: list[list[int]], seed: int = 0):
    """Turn a LlavaForConditionalGeneration and its LlavaProcessor into a LlavaNextForConditionalGeneration
    and LlavaNextProcessor tiling images on `pinpoints` ([height, width] pixel sizes, multiples of the
    model's image size). The source is consumed: the returned model holds the source's own tensors (no
    copy of a 7B model's weights); only `image_newline` is new (`init_image_newline(seed)`)."""
    if model.config.model_type != "llava":
        raise ValueError(f"{GRID_FIELD} turns llava (LLaVA-1.5) models into grid models; this one is"
                         f" {model.config.model_type}")
    import torch
    import transformers

    config = hd_config(model.config, pinpoints)
    # Built on the meta device: nothing is allocated or randomly initialised for weights the source supplies.
    with torch.device("meta"):
        hd = transformers.LlavaNextForConditionalGeneration(config)
    _carry_weights(model, hd)
    hidden = config.text_config.hidden_size
    hd.model.image_newline = torch.nn.Parameter(init_image_newline(hidden, seed).to(model.dtype))
    hd.tie_weights()
    hd.generation_config = copy.deepcopy(model.generation_config)
    return hd.eval(), hd_processor(processor, pinpoints, model.config)


def hd_config(config, pinpoints: list[list[int]]):
    """The LlavaNextConfig of a LlavaConfig: the same vision and text configs and shared settings, with the grid."""
    from transformers import LlavaNextConfig

    shared = {name: getattr(config, name) for name in SHARED_CONFIG_FIELDS}
    hd = LlavaNextConfig(vision_config=copy.deepcopy(config.vision_config),
                         text_config=copy.deepcopy(config.text_config),
                         image_grid_pinpoints=[list(p) for p in pinpoints], **shared)
    hd.dtype = config.dtype
    return hd


def init_image_newline(hidden_size: int, seed: int):
    """`image_newline`: (hidden_size,) float32, drawn as transformers' LlavaNextModel draws it (standard normal
    times 1/sqrt(hidden_size)), from a generator seeded with `seed` so a conversion is reproducible."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randn(hidden_size, generator=generator) / math.sqrt(hidden_size)


def hd_processor(processor, pinpoints: list[list[int]], config=None):
    """A LlavaNextProcessor tiling on `pinpoints`, with the LlavaProcessor's tokenizer, chat template, image
    token, patch size, feature strategy and extra tokens, and its CLIP preprocessing for every tile.

    The image processor is transformers' PIL one (`LlavaNextImageProcessorPil`), the class transformers 5
    gives for `LlavaNextImageProcessor` where torchvision is not installed; both read the same settings.
    """
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    settings = processor.image_processor.to_dict()
    image_processor = LlavaNextImageProcessorPil(**{k: settings[k] for k in IMAGE_SETTINGS if k in settings},
                                                 image_grid_pinpoints=[list(p) for p in pinpoints])
    fallback = config.vision_feature_select_strategy if config is not None else None
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        patch_size=processor.patch_size or (config.vision_config.patch_size if config is not None else None),
        vision_feature_select_strategy=processor.vision_feature_select_strategy or fallback,
        chat_template=processor.chat_template,
        image_token=processor.image_token,
        num_additional_image_tokens=processor.num_additional_image_tokens,
    )


def _carry_weights(source, target) -> None:
    """Give `target` (on the meta device) the source's parameters and buffers under the same names; an error
    naming them unless the names match exactly, besides `image_newline`, which only the target has."""
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False, assign=True)
    if unexpected or missing != ["model.image_newline"]:
        raise RuntimeError(f"LLaVA-1.5 and LLaVA-NeXT weight names differ: {len(unexpected)} only in the source"
                           f" ({', '.join(unexpected[:3])}), {len(missing)} only in the grid model"
                           f" ({', '.join(missing[:3])}); expected only model.image_newline")
    # Buffers outside the state dict (rotary frequencies, position ids) are carried by name as well.
    buffers = dict(source.named_buffers())
    target_buffers = [name for name, _ in target.named_buffers()]
    if sorted(target_buffers) != sorted(buffers):
        raise RuntimeError(f"LLaVA-1.5 and LLaVA-NeXT buffers differ: {sorted(set(target_buffers) ^ set(buffers))}")
    for name in target_buffers:
        owner, _, attribute = name.rpartition(".")
        setattr(target.get_submodule(owner), attribute, buffers[name])
