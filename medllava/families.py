"""Model families: the one table of what differs between the vision-language architectures medllava trains.

Every command asks the family of its checkpoint (read from `config.json`'s `model_type`, or the named
random-weight model's spec) instead of assuming LLaVA-1.5:

- which transformers classes load it;
- where its vision encoder, projector and language model live (the stage freeze table by top-level
  module), and what stage 1 trains;
- the decoder layers (`compile_layers`, activation checkpointing) and the LoRA target modules;
- the modules QLoRA keeps unquantised;
- how an image becomes tokens: a fixed count (LLaVA-1.5) or one that depends on the image's size (the
  anyres grid of LLaVA-NeXT), and which processor outputs travel with `pixel_values` (`image_sizes`);
- how many tiles of an image the vision tower sees (`tiles_per_image`: one in LLaVA-1.5, the anyres grid's
  count in the grid families, as transformers' own modeling module counts them), which the stage-1 vision
  feature cache keys its entries by;
- whether the stage-1 vision feature cache and packing apply, and why not where they do not;
- the default conversation template;
- the Python packages its processor needs beyond transformers (LLaVA-OneVision's imports torchvision).

Adding a family is one entry in `FAMILIES` plus its tests.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medllava.templates import DEFAULT_TEMPLATE


@dataclass(frozen=True)
class Family:
    """One architecture, as every command needs to know it."""

    model_type: str
    """`config.json`'s model_type."""
    model_class: str
    """The transformers class that loads it."""
    processor_class: str
    """The transformers processor class that prepares its inputs."""
    summary: str
    """One line for errors and docs."""
    modules: tuple[str, ...] = ("vision_tower", "multi_modal_projector", "language_model", "lm_head")
    """Top-level modules, the names stage configs' `train_modules` use. A parameter belongs to the first
    of them found among the first three parts of its name."""
    connector: tuple[str, ...] = ("multi_modal_projector",)
    """What stage 1 (alignment) trains: the modules between the vision encoder and the language model."""
    bare_parameters: tuple[str, ...] = ()
    """Entries of `modules` that are a single `nn.Parameter` of the model, not a submodule. Full training
    trains them when listed; LoRA cannot (PEFT's `modules_to_save` wraps submodules only), so under LoRA
    they stay frozen."""
    decoder_layers: str = "model.language_model.layers"
    """Attribute path, from the bare model, of the language model's decoder layers (`compile_layers`)."""
    nf4_skip: tuple[str, ...] = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    """Modules QLoRA keeps in full precision, as transformers matches them: from the start of the full
    module name, so the vision side never goes to 4-bit."""
    pixel_keys: tuple[str, ...] = ("pixel_values",)
    """Processor outputs that describe the images of a batch, concatenated image by image."""
    fixed_image_tokens: bool = True
    """Every image becomes the same number of tokens (a fixed resolution); otherwise the count depends
    on the image's size and is read from the processor's own expansion."""
    feature_cache: str = ""
    """Why the stage-1 vision feature cache does not apply; empty where it does."""
    modeling_module: str = ""
    """The transformers module whose `image_size_to_num_patches` counts an image's tiles (grid families)."""
    default_template: str = DEFAULT_TEMPLATE
    """The conversation template (`medllava.templates`) used where neither a config nor a head names one."""
    processor_needs: tuple[str, ...] = ()
    """Packages transformers needs to build this family's processor (`AutoProcessor.from_pretrained`); a
    checkpoint folder of the family is refused, naming them, where one is missing."""

    def missing_packages(self) -> tuple[str, ...]:
        """The packages of `processor_needs` not installed here."""
        return tuple(p for p in self.processor_needs if importlib.util.find_spec(p) is None)

    def trainable(self, stage_modules: Sequence[str]) -> tuple[str, ...]:
        """A stage's default modules with this family's connector standing for the projector."""
        out: list[str] = []
        for module in stage_modules:
            for name in (self.connector if module == "multi_modal_projector" else (module,)):
                if name not in out:
                    out.append(name)
        return tuple(out)

    def tiles_per_image(self, config, image_sizes) -> list[int]:
        """The tiles the vision tower sees of each image of `image_sizes` `(N_images, 2)` (height, width), as
        the model's `get_image_features` counts them from `config` (grid pinpoints, tile size): the grid's
        tiles plus the downsampled view; one per image in a fixed-resolution family."""
        sizes = image_sizes.tolist() if hasattr(image_sizes, "tolist") else list(image_sizes)
        if self.fixed_image_tokens:
            return [1] * len(sizes)
        count = importlib.import_module(self.modeling_module).image_size_to_num_patches
        return [count(image_size=[int(h), int(w)], grid_pinpoints=config.image_grid_pinpoints,
                      patch_size=config.vision_config.image_size) for h, w in sizes]

    def max_tiles(self, config) -> int:
        """The most tiles one image can take: that of an image filling the largest grid (1 when fixed)."""
        if self.fixed_image_tokens:
            return 1
        return max(self.tiles_per_image(config, config.image_grid_pinpoints))

    def lora_trainable(self, modules: Sequence[str]) -> tuple[str, ...]:
        """`modules` without the bare parameters, which LoRA leaves frozen (see `bare_parameters`)."""
        return tuple(m for m in modules if m not in self.bare_parameters)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llava", "LlavaForConditionalGeneration", "LlavaProcessor",
           "LLaVA-1.5 and LLaVA-Med: one fixed-resolution image, a CLIP tower and an MLP projector"),
    Family("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextProcessor",
           "LLaVA-NeXT (LLaVA-1.6): the image as a grid of tiles plus a downsampled view",
           modules=("vision_tower", "multi_modal_projector", "image_newline", "language_model", "lm_head"),
           connector=("multi_modal_projector", "image_newline"), bare_parameters=("image_newline",),
           pixel_keys=("pixel_values", "image_sizes"), fixed_image_tokens=False,
           modeling_module="transformers.models.llava_next.modeling_llava_next"),
    Family("llava_onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor",
           "LLaVA-OneVision: a SigLIP tower and Qwen2, the image as tiles whose features shrink past anyres_max_N",
           modules=("vision_tower", "multi_modal_projector", "image_newline", "language_model", "lm_head"),
           connector=("multi_modal_projector", "image_newline"), bare_parameters=("image_newline",),
           pixel_keys=("pixel_values", "image_sizes"), fixed_image_tokens=False,
           modeling_module="transformers.models.llava_onevision.modeling_llava_onevision",
           default_template="chat_template", processor_needs=("torchvision",)),
)}
"""Every supported family, by model_type."""


class UnsupportedModelError(ValueError):
    """A checkpoint whose architecture medllava does not train."""


def get_family(model_type: str, where: str = "") -> Family:
    """The family of `model_type`; an error naming `where` (the checkpoint) and the supported families.

    With `where` (a checkpoint folder, about to be loaded), a family whose processor needs a package that
    is not installed is refused here, before anything loads, in one line naming the package."""
    prefix = f"{where}: " if where else ""
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{prefix}model_type {model_type!r} is not supported; supported families: "
            + "; ".join(f"{f.model_type} ({f.summary})" for f in FAMILIES.values()))
    family = FAMILIES[model_type]
    if where and (missing := family.missing_packages()):
        raise UnsupportedModelError(
            f"{prefix}loading a {model_type} checkpoint needs {' and '.join(missing)} (transformers' "
            f"{family.processor_class} imports it); install it, e.g. pip install {' '.join(missing)}")
    return family


def checkpoint_model_type(path: str | Path) -> str:
    """The `model_type` in the checkpoint folder `path`'s config.json."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text())["model_type"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UnsupportedModelError(f"{config}: unreadable or without model_type ({e})") from None


def checkpoint_family(path: str | Path) -> Family:
    """The family of the checkpoint folder `path`, from its config.json."""
    return get_family(checkpoint_model_type(path), str(path))


def model_family(model) -> Family:
    """The family of a loaded model (a PEFT wrapper included)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return get_family(base.config.model_type)


def new_processor(family: Family, **parts):
    """`family`'s processor from its parts (image processor, tokenizer, ...) and settings, built by its own
    constructor.

    Where a package of `processor_needs` is missing, transformers cannot check the class of a video
    processor: it exports `VideoProcessorMixin` only with torchvision, and `ProcessorMixin.__init__` looks
    the class up by that name, so the constructor fails even though images never touch torchvision. There
    the constructor runs with that one check done here instead (the video processor must still be a
    `VideoProcessorMixin`); every other part is checked and set by the constructor as usual.
    """
    import transformers

    cls = getattr(transformers, family.processor_class)
    if not family.missing_packages():
        return cls(**parts)
    from transformers.video_processing_utils import VideoProcessorMixin

    video = parts.get("video_processor")
    if not isinstance(video, VideoProcessorMixin):
        raise TypeError(f"{family.processor_class} needs a video processor, got {type(video).__name__}")
    processor = cls.__new__(cls)
    check = processor.check_argument_for_proper_class
    processor.check_argument_for_proper_class = (
        lambda name, arg: None if name == "video_processor" else check(name, arg))
    try:
        cls.__init__(processor, **parts)
    finally:
        del processor.check_argument_for_proper_class
    return processor


def processor_family(processor) -> Family:
    """The family whose processor class `processor` is."""
    name = type(processor).__name__
    for family in FAMILIES.values():
        if family.processor_class == name:
            return family
    raise UnsupportedModelError(f"processor {name} belongs to none of the supported families "
                                f"({', '.join(FAMILIES)})")


def fixed_image_token_count(processor) -> int:
    """Image tokens one `<image>` expands to in a fixed-resolution family, as transformers' Llava
    processor computes them: (H // patch) * (W // patch) patches of the processed image, plus the vision
    tower's extra tokens (CLS), minus one when the `default` feature strategy drops CLS."""
    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None) if getattr(ip, "do_center_crop", False) else None
    size = crop or ip.size
    if "height" in size:
        height, width = size["height"], size["width"]
    else:
        height = width = size["shortest_edge"]
    n = (height // processor.patch_size) * (width // processor.patch_size)
    n += processor.num_additional_image_tokens
    if processor.vision_feature_select_strategy == "default":
        n -= 1
    return n


def max_image_tokens(processor) -> int:
    """The most tokens one image can take: the fixed count, or in a grid family that of the image shape
    that fills its largest grid."""
    family = processor_family(processor)
    if family.fixed_image_tokens:
        return fixed_image_token_count(processor)
    shapes = processor.image_processor.image_grid_pinpoints
    return max(image_tokens_for_size(processor, w, h) for h, w in shapes)


def image_tokens_for_size(processor, width: int, height: int) -> int:
    """Tokens an image of `width` x `height` pixels takes: in a grid family the count depends on the size
    only, so the processor's own expansion of a blank image of that size gives it."""
    from PIL import Image

    return image_inputs(processor, [Image.new("RGB", (width, height))])[1][0]


def image_inputs(processor, images: list) -> tuple[dict, list[int]]:
    """The model inputs that carry `images` (`pixel_values` and the family's other pixel keys, batched
    image by image) and the number of tokens each image's `<image>` expands to.

    A fixed-resolution family needs only the image processor. Otherwise the processor's own expansion
    decides: it is run on a text holding one image token per image, and the tokens of each image are
    counted there, so the counts are exactly what inference with this processor gives.
    """
    family = processor_family(processor)
    if family.fixed_image_tokens:
        pixels = processor.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": pixels["pixel_values"]}, [fixed_image_token_count(processor)] * len(images)
    token = processor.image_token
    batch = processor(text=["\n".join([token] * len(images))], images=images, return_tensors="pt")
    counts = _runs(batch["input_ids"][0].tolist(), processor.tokenizer.convert_tokens_to_ids(token))
    if len(counts) != len(images):
        raise ValueError(f"the processor expanded {len(images)} images into {len(counts)} image-token runs")
    return {key: batch[key] for key in family.pixel_keys}, counts


def _runs(ids: list[int], token_id: int) -> list[int]:
    """Lengths of the maximal runs of `token_id` in `ids`, in order."""
    runs, length = [], 0
    for i in [*ids, None]:
        if i == token_id:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


def pad_and_concat(tensors: list) -> object:
    """Concatenate per-example image tensors along the first dimension, zero-padding the second (a grid
    model's tile count) to the longest: the model reads each image's real tiles from `image_sizes`."""
    import torch

    if len({t.shape[1:] for t in tensors}) <= 1:
        return torch.cat(tensors, dim=0)
    longest = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        pad = t.new_zeros((t.shape[0], longest - t.shape[1], *t.shape[2:]))
        padded.append(torch.cat([t, pad], dim=1))
    return torch.cat(padded, dim=0)
