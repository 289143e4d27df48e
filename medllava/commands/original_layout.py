"""The original LLaVA / LLaVA-Med checkpoint layout: reading and checking a checkpoint, and renaming
its tensors to the names `LlavaForConditionalGeneration` uses. `medllava.commands.convert` builds the rest of
the llava-hf folder (config, tokenizer, processor) and writes it.

The original layout (haotian-liu/LLaVA, microsoft/LLaVA-Med) is one causal LM whose config.json also
carries the vision settings (`mm_*` fields) and whose state dict holds the language model
(`model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`), the projector (`model.mm_projector.*`)
and, when it was saved, the CLIP tower (`model.vision_tower.vision_tower.vision_model.*`):

    original                              llava-hf
    model.layers.* / model.norm / ...     model.language_model.*
    lm_head                               lm_head
    model.mm_projector.0 / .2             model.multi_modal_projector.linear_1 / linear_2  (mlp2x_gelu)
    model.mm_projector                    linear_1, with act `linear` and linear_2 = identity (linear)
    model.vision_tower.vision_tower.*     model.vision_tower.*
    model.image_newline                   model.image_newline  (anyres: LlavaNextModel's row separator)

The image path decides the llava-hf family. `image_aspect_ratio: anyres` with `mm_patch_merge_type:
spatial_unpad` is LLaVA-NeXT's tiling, which LlavaNext implements; every other aspect ratio (pad, square)
is one image per `<image>`, Llava's, where the original never reads mm_patch_merge_type. The original
lists `image_grid_pinpoints` as [width, height] (its select_best_resolution unpacks `width, height`
and compares them with PIL's `image.size`); transformers' as [height, width]: each pair is swapped.

Weights are read from safetensors only; pickle files are refused, never loaded. What llava-hf cannot
represent is refused by name: `<im_start>/<im_end>` tokens (mm_use_im_start_end), deeper MLP
projectors, anyres tiles merged other than by spatial_unpad, capped tilings (anyres_max_N), unmerged LoRA
adapters.
"""

from __future__ import annotations

import ast
import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Original model_type -> (language model family, conversation template it was trained with).
ORIGINAL_TYPES = {
    "llava": ("llama", "vicuna_v1"),
    "llava_llama": ("llama", "vicuna_v1"),
    "llava_mistral": ("mistral", "mistral_instruct"),
}
# mm_projector_type -> llava-hf projector_hidden_act. LlavaMultiModalProjector is always
# linear_1 -> act -> linear_2, so a single linear layer becomes linear_1 with an identity act and linear_2.
PROJECTORS = {"mlp2x_gelu": "gelu", "linear": "linear"}
MLP_LAYERS = {"0": "linear_1", "2": "linear_2"}
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
# The one way of merging anyres tiles that LlavaNext implements (its pack_image_features): the tile grid's
# features unpadded back to the image's aspect ratio, image_newline after each row.
ANYRES_MERGE = "spatial_unpad"
NEWLINE = "model.image_newline"
VISION_PREFIX = "model.vision_tower.vision_tower."
# Buffers that some transformers versions saved; they are recomputed from the config, not weights.
DERIVED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
# Towers LLaVA releases name in mm_vision_tower; only their shapes are needed when the weights are saved.
KNOWN_VISION_TOWERS = {
    "openai/clip-vit-large-patch14-336": {"image_size": 336},
    "openai/clip-vit-large-patch14": {"image_size": 224},
}
CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)


class ConvertError(ValueError):
    """A source checkpoint that cannot be converted; the message names the file and the field."""


@dataclass
class Source:
    """An original-layout checkpoint folder, checked."""

    path: Path
    config: dict
    family: str
    """Language model family: llama or mistral."""
    template: str
    """Conversation template the checkpoint was trained with."""
    weight_files: list[Path]
    architecture: str = "llava"
    """The llava-hf family it converts to: llava, or llava_next for anyres tiling."""
    grid_pinpoints: list[list[int]] | None = None
    """anyres only: the tile grid resolutions in pixels, [height, width] as transformers reads them."""
    ignored: tuple[str, ...] = ()
    """Tensors the original forward never reads with this config; they are dropped, not converted."""


def read_source(src: Path) -> Source:
    """Read and check `src/config.json` and find the safetensors weights; refuse what cannot be converted."""
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{src}: not a checkpoint folder: config.json is missing")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConvertError(f"{cfg_path}: not valid JSON ({e})") from None
    model_type = cfg.get("model_type")
    if model_type == "llava" and "text_config" in cfg:
        raise ConvertError(f"{cfg_path}: already a llava-hf checkpoint (it has text_config); use it as it is")
    if model_type not in ORIGINAL_TYPES:
        raise ConvertError(f"{cfg_path}: model_type {model_type!r} is not an original LLaVA checkpoint "
                           f"(supported: {', '.join(ORIGINAL_TYPES)})")
    if (src / "adapter_config.json").exists():
        raise ConvertError(f"{src}: holds LoRA adapter weights; merge them into the base model first")
    if cfg.get("mm_use_im_start_end"):
        raise ConvertError(f"{cfg_path}: mm_use_im_start_end is true: the model was trained with <im_start>/<im_end>"
                           " tokens around each image, which llava-hf's Llava classes have no place for")
    projector = cfg.get("mm_projector_type", "linear")
    if projector not in PROJECTORS:
        raise ConvertError(f"{cfg_path}: mm_projector_type {projector!r} cannot be represented by llava-hf's "
                           f"LlavaMultiModalProjector (linear -> act -> linear); supported: {', '.join(PROJECTORS)}")
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURE:
        raise ConvertError(f"{cfg_path}: mm_vision_select_feature {feature!r}; supported: {', '.join(SELECT_FEATURE)}")
    if not isinstance(cfg.get("mm_vision_select_layer"), int):
        raise ConvertError(f"{cfg_path}: mm_vision_select_layer is missing or not an integer")
    architecture, grid = image_layout(cfg, cfg_path)
    # The original builds image_newline whenever the merge type unpads, and reads it only on the anyres path.
    unused_newline = architecture == "llava" and "unpad" in str(cfg.get("mm_patch_merge_type", "flat"))
    family, template = ORIGINAL_TYPES[model_type]
    return Source(src, cfg, family, template, _weight_files(src), architecture, grid,
                  (NEWLINE,) if unused_newline else ())


def image_layout(cfg: dict, where: Path) -> tuple[str, list[list[int]] | None]:
    """The llava-hf family of the original image path, and for anyres its grid as [height, width] pairs."""
    aspect = cfg.get("image_aspect_ratio", "square")
    if not str(aspect).startswith("anyres"):
        return "llava", None  # one image tensor per <image>: the original never reads mm_patch_merge_type
    if aspect != "anyres":
        raise ConvertError(f"{where}: image_aspect_ratio {aspect!r} is not LLaVA-NeXT's anyres tiling (LLaVA-OneVision's "
                           "anyres_max_N shrinks the feature grid past N tiles); LlavaNext implements only 'anyres'")
    merge = cfg.get("mm_patch_merge_type", "flat")
    if merge != ANYRES_MERGE:
        raise ConvertError(f"{where}: mm_patch_merge_type {merge!r} with image_aspect_ratio 'anyres': LlavaNext merges "
                           f"tiles only as {ANYRES_MERGE!r} (grid unpadded, image_newline after each row)")
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise ConvertError(f"{where}: mm_vision_select_feature {feature!r} with image_aspect_ratio 'anyres': the "
                           "original merge asserts one feature per patch of each tile (no CLS); only 'patch' ran")
    return "llava_next", [[h, w] for w, h in _pinpoints(cfg.get("image_grid_pinpoints"), where)]


def _pinpoints(raw, where: Path) -> list[list[int]]:
    """image_grid_pinpoints as the original reads it: a list, or its string form (ast.literal_eval)."""
    value = raw
    if isinstance(raw, str):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = None
    pairs = isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) and x > 0 for x in p) for p in value)
    if not pairs:
        raise ConvertError(f"{where}: image_grid_pinpoints {raw!r} is not a list of [width, height] pixel pairs, "
                           "which image_aspect_ratio 'anyres' needs")
    return [list(p) for p in value]


def check_grid(source: Source, tile: int) -> None:
    """Refuse grid resolutions that are not whole tiles of the vision tower's `tile` px input (the
    original cuts such a grid into more tiles than its feature reshape expects, and fails)."""
    for h, w in source.grid_pinpoints or ():
        if h % tile or w % tile:
            raise ConvertError(f"{source.path / 'config.json'}: image_grid_pinpoints [{w}, {h}] is not a whole number "
                               f"of the vision tower's {tile}px tiles")


def _weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ConvertError(f"{index}: unreadable shard index ({e})") from None
        files = [src / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConvertError(f"{index}: {len(missing)} shard(s) listed but missing: {', '.join(missing[:3])}")
        return files
    files = sorted(src.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth") for p in src.glob(ext))
        found = f"found {', '.join(pickled[:4])}: pickle files, which are never loaded; " if pickled else ""
        raise ConvertError(f"{src}: no *.safetensors weights ({found}convert them to safetensors first with a "
                           "trusted tool, in an environment you trust)")
    return files


def load_weights(files: list[Path], dtype) -> dict:
    """All tensors of `files` in one dict, floating point ones cast to `dtype`; derived buffers dropped."""
    from safetensors.torch import load_file

    tensors = {}
    for f in files:
        log.info("reading %s", f.name)
        for key, t in load_file(f).items():
            if not key.endswith(DERIVED_SUFFIXES):
                tensors[key] = t.to(dtype) if t.is_floating_point() else t
    return tensors


def resolve_vision(source: Source, weights: dict, vision_tower: Path | None, dtype):
    """Return `(CLIPVisionConfig, preprocessor settings, CLIP-layout vision weights)`.

    Weights saved in the checkpoint win (the original code loads them over the named tower); otherwise
    they come from the CLIP folder: `--vision-tower`, or `mm_vision_tower` when that is an absolute path
    to a local folder (the original code loads either a hub name or a path from there).
    """
    from transformers import CLIPVisionConfig

    name = str(source.config.get("mm_vision_tower", ""))
    saved = {k[len(VISION_PREFIX):]: weights.pop(k) for k in [k for k in weights if k.startswith(VISION_PREFIX)]}
    folder = vision_tower
    if folder is None and Path(name).is_absolute() and (Path(name) / "config.json").is_file():
        folder = Path(name)
    if folder is not None:
        cfg, preprocessor = _read_clip_folder(folder)
        vision = saved or _clip_folder_weights(folder, dtype)
    elif saved and name in KNOWN_VISION_TOWERS:
        cfg = CLIPVisionConfig(**CLIP_L14, **KNOWN_VISION_TOWERS[name])
        vision, preprocessor = saved, {}
    else:
        where = "the checkpoint saves its vision tower weights" if saved else "no vision tower weights are saved"
        raise ConvertError(
            f"{source.path}: mm_vision_tower is {name or 'unset'!r} and {where}; pass --vision-tower DIR "
            "(a local CLIP folder) or use a checkpoint with the vision tower saved "
            f"(model.vision_tower.vision_tower.*) of a known tower ({', '.join(KNOWN_VISION_TOWERS)})")
    clean = {k.removeprefix("vision_model."): v for k, v in vision.items()}
    return cfg, preprocessor, clean


def _read_clip_folder(folder: Path):
    from transformers import CLIPVisionConfig

    path = folder / "config.json"
    if not path.is_file():
        raise ConvertError(f"{folder}: not a CLIP folder: config.json is missing")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("model_type") not in ("clip", "clip_vision_model"):
        raise ConvertError(f"{path}: model_type {cfg.get('model_type')!r} is not a CLIP model")
    cfg = cfg.get("vision_config", cfg)
    pre_path = folder / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text(encoding="utf-8")) if pre_path.is_file() else {}
    return CLIPVisionConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")}), pre


def _clip_folder_weights(folder: Path, dtype) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        _weight_files(folder)  # raises, naming any pickle files found
    weights = load_weights(files, dtype)
    return {k: v for k, v in weights.items() if not k.startswith(("text_model.", "text_projection",
                                                                   "visual_projection", "logit_scale"))}


def map_weights(weights: dict, vision: dict, source: Source, dtype) -> dict:
    """Rename original-layout tensors to the parameter names of the llava-hf family's model class
    (Llava- or LlavaNextForConditionalGeneration: the same names, and LlavaNext's `model.image_newline`)."""
    import torch

    projector = source.config.get("mm_projector_type", "linear")
    out = {f"model.vision_tower.{k}": v for k, v in vision.items()}
    for key, t in weights.items():
        if key in source.ignored:
            log.info("dropping %s: the original forward never reads it with image_aspect_ratio %r", key,
                     source.config.get("image_aspect_ratio"))
        elif key == NEWLINE:
            out[key] = t  # LlavaNextModel.image_newline: the same name; for llava-hf Llava it has no place
        elif key.startswith("model.mm_projector."):
            rest = key[len("model.mm_projector."):]
            if projector == "mlp2x_gelu":  # nn.Sequential(Linear, GELU, Linear): layers 0 and 2
                index, _, param = rest.partition(".")
                rest = f"{MLP_LAYERS.get(index, index)}.{param}"
            else:
                rest = "linear_1." + rest
            out[f"model.multi_modal_projector.{rest}"] = t
        elif key.startswith("model."):
            out["model.language_model." + key[len("model."):]] = t
        else:
            out[key] = t
    if not any(k.startswith("model.multi_modal_projector.") for k in out):
        raise ConvertError("no model.mm_projector.* weights in the safetensors files (a projector saved on its own, "
                           "as mm_projector.bin, is not merged by this command)")
    if source.architecture == "llava_next" and NEWLINE not in out:
        raise ConvertError(f"{source.path}: image_aspect_ratio 'anyres' with {ANYRES_MERGE} but no {NEWLINE} tensor "
                           "in the safetensors files")
    if projector == "linear":
        hidden = out["model.multi_modal_projector.linear_1.weight"].shape[0]
        out["model.multi_modal_projector.linear_2.weight"] = torch.eye(hidden, dtype=dtype)
        out["model.multi_modal_projector.linear_2.bias"] = torch.zeros(hidden, dtype=dtype)
    return out
