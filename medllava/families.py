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
import inspect
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
    """Packages transformers' `AutoProcessor` needs to build this family's processor (its video processor
    imports torchvision). Where one is missing, a checkpoint folder's processor is built from its parts
    instead (`load_processor`): the tokenizer, the family's PIL image processor and the chat template."""
    image_processor_pil: str = ""
    """The family's PIL-backed image processor class, used where `processor_needs` is missing."""
    placeholder: str = "image_token"
    """The processor attribute naming the text it expands into an image's tokens (`image_token`; Gemma 3's
    processor expands `boi_token`, `<start_of_image>`)."""
    image_markup: str = ""
    """What the family's chat template writes for one image, which the hand-written templates write in its
    place (Qwen's `<|vision_start|><|image_pad|><|vision_end|>`); empty: the placeholder alone."""
    pixel_layout: str = "tiles"
    """How examples' image inputs join into a batch: `tiles` (one row per image, tiles zero-padded to the
    batch's most: the LLaVA families) or `rows` (every key concatenated along its first dimension: Qwen's
    patch rows and grid sizes, Gemma 3's images) or `images` (each image `(1, tiles, ...)`, one example's images
    joined along the tiles into one row; rows zero-padded to the batch's most tiles, which Idefics3 and SmolVLM
    drop as all-zero images) or `padded` (one row per image, each zero-padded to the largest height and width,
    as Pixtral's processor pads: Mistral 3)."""
    packing: str = ""
    """Why packing does not apply; empty where packed training is verified equal to padded training."""
    saved_prefixes: tuple[tuple[str, str], ...] = ()
    """`(prefix, module)` for the names a saved checkpoint gives parameters that hold none of `modules`
    (transformers saves Qwen2.5-VL in its hub layout: `model.layers...` is the language model,
    `visual.merger...` the merger); the first prefix that matches decides."""
    rope_3d: bool = False
    """The model computes its own (3-D, multimodal) position ids from each row's image tokens: callers
    never pass position ids, and packing cannot give it per-example ones."""

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


_SPLIT_IMAGE = dict(
    modules=("vision_model", "connector", "language_model", "lm_head"), connector=("connector",),
    decoder_layers="model.text_model.layers", nf4_skip=("model.vision_model", "model.connector", "lm_head"),
    saved_prefixes=(("model.text_model.", "language_model"),), pixel_keys=("pixel_values", "pixel_attention_mask"),
    fixed_image_tokens=False, default_template="chat_template", pixel_layout="images",
    feature_cache="medllava caches the LLaVA families' selected vision-tower layer per grid tile; the tiles of a "
                  "split image and its global image are not keyed or cached")
"""What Idefics3 and SmolVLM (the same architecture on another language model) share."""

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
           default_template="chat_template", processor_needs=("torchvision",),
           image_processor_pil="LlavaOnevisionImageProcessorPil"),
    Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
           "Qwen2.5-VL (Lingshu, HuatuoGPT-Vision-Qwen2.5): a native-resolution ViT whose merger joins 2x2 patches, "
           "3-D rope positions",
           modules=("visual", "merger", "language_model", "lm_head"), connector=("merger",),
           nf4_skip=("model.visual", "lm_head"), pixel_keys=("pixel_values", "image_grid_thw"),
           fixed_image_tokens=False, default_template="chat_template", processor_needs=("torchvision",),
           image_processor_pil="Qwen2VLImageProcessorPil", image_markup="<|vision_start|><|image_pad|><|vision_end|>",
           pixel_layout="rows", rope_3d=True,
           saved_prefixes=(("visual.merger.", "merger"), ("visual.", "visual"), ("model.", "language_model")),
           feature_cache="its merger (what stage 1 trains) is the vision tower's last block, so there is no frozen "
                         "output to cache",
           packing="the model computes 3-D rope positions from each row's image tokens, one sequence per row"),
    Family("gemma3", "Gemma3ForConditionalGeneration", "Gemma3Processor",
           "Gemma 3 and MedGemma: a SigLIP tower at 896 px pooled to 256 tokens per image, "
           "bidirectional attention over them",
           modules=("vision_tower", "multi_modal_projector", "language_model", "lm_head"),
           image_processor_pil="Gemma3ImageProcessorPil", placeholder="boi_token", pixel_layout="rows",
           fixed_image_tokens=False, default_template="chat_template",
           feature_cache="medllava caches the LLaVA families' selected vision-tower layer; Gemma 3's pooled tower "
                         "output is not cached",
           packing="its image tokens attend to each other both ways through a mask built from token_type_ids; "
                   "packed rows are not verified to keep that mask inside each example"),
    Family("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor",
           "Qwen3-VL: a native-resolution ViT on 16-px patches whose merger joins 2x2 of them, DeepStack mergers "
           "feeding the first decoder layers, interleaved 3-D rope positions",
           modules=("visual", "merger", "deepstack_merger_list", "language_model", "lm_head"),
           connector=("merger", "deepstack_merger_list"), nf4_skip=("model.visual", "lm_head"),
           pixel_keys=("pixel_values", "image_grid_thw"), fixed_image_tokens=False,
           default_template="chat_template", processor_needs=("torchvision",),
           image_processor_pil="Qwen2VLImageProcessorPil", image_markup="<|vision_start|><|image_pad|><|vision_end|>",
           pixel_layout="rows", rope_3d=True,
           feature_cache="stage 1 trains its merger and DeepStack mergers, which sit inside the vision tower and "
                         "read the hidden states of several of its layers; medllava caches one tower output",
           packing="the model computes 3-D rope positions from each row's image tokens, one sequence per row"),
    Family("idefics3", "Idefics3ForConditionalGeneration", "Idefics3Processor",
           "Idefics3: a SigLIP tower on the image split into tiles plus the whole (global) image, a pixel-shuffle "
           "connector, Llama 3",
           image_processor_pil="Idefics3ImageProcessorPil", **_SPLIT_IMAGE),
    Family("smolvlm", "SmolVLMForConditionalGeneration", "SmolVLMProcessor",
           "SmolVLM and SmolVLM2: Idefics3's split image, global image and pixel-shuffle connector on SmolLM2",
           image_processor_pil="SmolVLMImageProcessorPil", processor_needs=("torchvision",), **_SPLIT_IMAGE),
    Family("mistral3", "Mistral3ForConditionalGeneration", "PixtralProcessor",
           "Mistral Small 3.1 (Mistral 3): a Pixtral tower at native resolution, 2x2 patches merged in the projector, "
           "rows of [IMG] tokens ended by [IMG_BREAK] and [IMG_END]",
           pixel_keys=("pixel_values", "image_sizes"), fixed_image_tokens=False, default_template="chat_template",
           processor_needs=("torchvision",), image_processor_pil="PixtralImageProcessorPil", pixel_layout="padded",
           feature_cache="medllava caches the LLaVA families' selected vision-tower layer per image or grid tile; "
                         "Pixtral's tower runs a batch's images of different sizes as one sequence, which is not "
                         "keyed or cached"),
)}
"""Every supported family, by model_type."""


class UnsupportedModelError(ValueError):
    """A checkpoint whose architecture medllava does not train."""


def get_family(model_type: str, where: str = "") -> Family:
    """The family of `model_type`; an error naming `where` (the checkpoint) and the supported families."""
    prefix = f"{where}: " if where else ""
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{prefix}model_type {model_type!r} is not supported; supported families: "
            + "; ".join(f"{f.model_type} ({f.summary})" for f in FAMILIES.values()))
    return FAMILIES[model_type]


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
    processor: it exports the video processors' base class (`VideoProcessorMixin` in 5.25,
    `BaseVideoProcessor` in 5.17) only with torchvision, and `ProcessorMixin.__init__` looks the class up by
    that name, so the constructor fails even though images never touch torchvision. There the constructor
    runs with that one check done here instead (the video processor must still be an instance of that base
    class); every other part is checked and set by the constructor as usual.
    """
    import transformers

    cls = getattr(transformers, family.processor_class)
    if not family.missing_packages():
        return cls(**parts)
    from transformers import video_processing_utils

    base = getattr(video_processing_utils, "VideoProcessorMixin", video_processing_utils.BaseVideoProcessor)
    video = parts.get("video_processor")
    if not isinstance(video, base):
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


def load_processor(path: str | Path, family: Family, trust_remote_code: bool = False):
    """The processor saved in the checkpoint folder `path`: `AutoProcessor`'s, or where a package of the
    family's `processor_needs` is missing (torchvision, which only its video processor needs), the same
    processor built from its saved parts: the tokenizer, the family's PIL image processor (same settings,
    the same resizing and normalisation for images), the chat template and the processor's own settings
    (`processor_config.json`), with an empty video processor that nothing here calls."""
    from transformers import AutoProcessor, AutoTokenizer

    if not family.missing_packages():
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    import transformers
    from transformers.video_processing_utils import BaseVideoProcessor

    folder = Path(path)
    settings = _json(folder / "processor_config.json")
    chat_template = settings.pop("chat_template", None)
    if (folder / "chat_template.jinja").is_file():
        chat_template = (folder / "chat_template.jinja").read_text()
    elif (folder / "chat_template.json").is_file():
        chat_template = _json(folder / "chat_template.json").get("chat_template")
    cls = getattr(transformers, family.processor_class)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "image_processor", "tokenizer",
                                                                   "video_processor", "chat_template"}
    return new_processor(family, tokenizer=AutoTokenizer.from_pretrained(folder),
                         image_processor=getattr(transformers, family.image_processor_pil).from_pretrained(folder),
                         video_processor=BaseVideoProcessor(), chat_template=chat_template,
                         **{k: v for k, v in settings.items() if k in accepted})


def _json(path: Path) -> dict:
    """A JSON object file's contents; empty when the file is absent."""
    return json.loads(path.read_text()) if path.is_file() else {}


def processor_family(processor) -> Family:
    """The family whose processor class `processor` is."""
    name = type(processor).__name__
    for family in FAMILIES.values():
        if family.processor_class == name:
            return family
    raise UnsupportedModelError(f"processor {name} belongs to none of the supported families "
                                f"({', '.join(FAMILIES)})")


def image_placeholder(processor) -> str:
    """The text the processor expands into one image's tokens (`<image>`, `<|image_pad|>`, `<start_of_image>`)."""
    return getattr(processor, processor_family(processor).placeholder)


def image_markup(processor) -> str:
    """What a hand-written template writes for one image: the family's chat-template markup around the
    placeholder (Qwen's vision start and end tokens), or the placeholder alone."""
    return processor_family(processor).image_markup or image_placeholder(processor)


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
    """The most tokens one image can take: the fixed count, or that of the largest image the processor
    keeps (a grid family: the shape filling its largest grid; Qwen: a square of its max_pixels)."""
    family = processor_family(processor)
    if family.fixed_image_tokens:
        return fixed_image_token_count(processor)
    return max(image_tokens_for_size(processor, w, h) for w, h in largest_images(processor))


def largest_images(processor) -> list[tuple[int, int]]:
    """`(width, height)` of the images that take the most tokens under `processor`'s resizing rules."""
    ip = processor.image_processor
    if pinpoints := getattr(ip, "image_grid_pinpoints", None):
        return [(w, h) for h, w in pinpoints]
    size = dict(getattr(ip, "size", None) or {})
    if "longest_edge" in size and hasattr(ip, "merge_size"):  # Qwen: longest_edge is max_pixels
        side = int(size["longest_edge"] ** 0.5)
        return [(side, side)]
    if "height" in size:
        return [(size["width"], size["height"])]
    side = size.get("longest_edge") or size.get("shortest_edge") or 336
    return [(side, side)]


def image_tokens_for_size(processor, width: int, height: int) -> int:
    """Tokens an image of `width` x `height` pixels takes (its markup included where the processor
    expands the placeholder into more than image tokens, as Gemma 3's start and end of image): the
    processor's own expansion of a blank image of that size gives it."""
    from PIL import Image

    return image_inputs(processor, [Image.new("RGB", (width, height))]).counts[0]


@dataclass
class ImageInputs:
    """The model inputs that carry some images and the text each image's placeholder expands to."""

    pixels: dict
    """`pixel_values` and the family's other pixel keys, batched image by image."""
    texts: list[str]
    """What the processor writes in place of each image's placeholder."""
    counts: list[int]
    """Tokens of each of `texts`."""


def image_inputs(processor, images: list) -> ImageInputs:
    """The model inputs that carry `images` and what each image's placeholder expands to, exactly as
    inference with this processor gives them.

    A fixed-resolution family needs only the image processor. A grid family's processor is run on a text
    holding one image token per image and the tokens of each image are counted there. Otherwise
    (`pixel_layout` rows) the processor runs on each image with its placeholder alone, and the expansion
    is read back from the tokens it wrote; it must tokenise back to the same tokens.
    """
    family = processor_family(processor)
    token = processor.image_token
    if family.fixed_image_tokens:
        pixels = processor.image_processor(images=images, return_tensors="pt")
        n = fixed_image_token_count(processor)
        return ImageInputs({"pixel_values": pixels["pixel_values"]}, [token * n] * len(images), [n] * len(images))
    if family.pixel_layout == "tiles":
        batch = processor(text=["\n".join([token] * len(images))], images=images, return_tensors="pt")
        counts = _runs(batch["input_ids"][0].tolist(), processor.tokenizer.convert_tokens_to_ids(token))
        if len(counts) != len(images):
            raise ValueError(f"the processor expanded {len(images)} images into {len(counts)} image-token runs")
        return ImageInputs({key: batch[key] for key in family.pixel_keys}, [token * n for n in counts], counts)
    parts = [_one_image(processor, family, image) for image in images]
    pixels = {key: [p[0][key] for p in parts] for key in family.pixel_keys}
    return ImageInputs(concat_pixels(family, pixels), [p[1] for p in parts], [p[2] for p in parts])


def _one_image(processor, family: Family, image) -> tuple[dict, str, int]:
    """`(pixel inputs, expansion text, its token count)` of one image, from the processor's own call."""
    tokenizer = processor.tokenizer
    batch = processor(text=[image_placeholder(processor)], images=[image], return_tensors="pt",
                      add_special_tokens=False)
    ids = batch["input_ids"][0].tolist()
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
        raise ValueError(f"{family.processor_class}: an image's tokens do not read back as text; this tokenizer "
                         "cannot be used for training")
    return {key: batch[key] for key in family.pixel_keys}, text, len(ids)


def concat_pixels(family: Family, pixels: dict[str, list]) -> dict:
    """Join per-example (or per-image) pixel inputs, key by key, as `family.pixel_layout` says."""
    import torch

    if family.pixel_layout == "rows":
        return {key: torch.cat(tensors, dim=0) for key, tensors in pixels.items() if tensors}
    if family.pixel_layout == "images":  # each image (1, tiles, ...): one row holding every image's tiles
        return {key: torch.cat(tensors, dim=1) for key, tensors in pixels.items() if tensors}
    # tiles (LLaVA's grids) or padded (Pixtral's sizes): zero-padded to the largest
    return {key: pad_and_concat(tensors) for key, tensors in pixels.items() if tensors}


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
    """Concatenate image tensors along the first dimension, zero-padding every other dimension at its end to
    the largest: a grid model's tile count (LLaVA-NeXT, whose model reads each image's real tiles from
    `image_sizes`), SmolVLM's tiles, or Pixtral's height and width (as its image processor pads a batch's
    images `(n, 3, H, W)`; the model reads each image's own size from `image_sizes`)."""
    import torch

    if len({t.shape[1:] for t in tensors}) <= 1:
        return torch.cat(tensors, dim=0)
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        out = t.new_zeros((t.shape[0], *shape))
        out[tuple(slice(0, n) for n in t.shape)] = t
        padded.append(out)
    return torch.cat(padded, dim=0)
