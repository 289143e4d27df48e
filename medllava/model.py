"""Model assembly on transformers' own classes (the family's, `medllava.families`) and `AutoProcessor`.

`build_model(cfg)` loads a local checkpoint folder of a supported family or builds a named random-weight
model. Weights load from safetensors only (never pickle), and remote code stays off unless asked for.
`TRAINABLE` is the one table of what each curriculum stage trains; a family's connector (the projector,
and LLaVA-NeXT's `image_newline`) stands for `multi_modal_projector` in it. `ModelConfig.grid_pinpoints`
turns a LLaVA-1.5 model into LLaVA-1.5-HD, a llava_next model, as it loads (medllava.hd).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from medllava.config import ConfigError
from medllava.families import (FAMILIES, Family, UnsupportedModelError, checkpoint_model_type, get_family,
                               load_processor, model_family)
from medllava.hd import GRID_FIELD, check_pinpoints, to_hd
from medllava.io import atomic_dir
from medllava.tiny import TINY_SPECS, build_tiny

# What each stage trains, by top-level module. Everything else is frozen.
TRAINABLE: dict[str, tuple[str, ...]] = {
    "align": ("multi_modal_projector",),
    "instruct": ("multi_modal_projector", "language_model", "lm_head"),
    "finetune": ("multi_modal_projector", "language_model", "lm_head"),
}
# model_types of the original LLaVA / LLaVA-Med layout that `medllava convert` reads (the original "llava"
# shares its name with llava-hf's and is told apart by its files: see medllava.commands.original_layout).
ORIGINAL_LAYOUTS = ("llava_llama", "llava_mistral")
MODULES = FAMILIES["llava"].modules
"""LLaVA-1.5's top-level modules; another family's are its `Family.modules`."""


class CheckpointError(ValueError):
    """A folder that is not a loadable checkpoint of a supported family."""


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"
    """A checkpoint folder of a supported family (config.json + *.safetensors + processor files; see
    medllava.families), or a named random-weight model: `tiny` (tests), `small` (CPU demos), `tiny-next`
    (LLaVA-NeXT's tile grid on the tiny sizes)."""

    dtype: str = "float32"
    """Weight dtype: float32, bfloat16 or float16."""

    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa, eager, flex_attention (PyTorch's own; with packing it keeps
    attention inside each packed example without a dense mask; trains on CUDA only) or flash_attention_2 (where
    installed)."""

    trust_remote_code: bool = False
    """Allow code shipped inside the checkpoint folder to run. Off: llava-hf checkpoints need none."""

    seed: int = 0
    """Seed for the random weights of a named model, and for the new image_newline of a grid_pinpoints
    conversion."""

    grid_pinpoints: list[list[int]] = field(default_factory=list)
    """LLaVA-1.5-HD: tile a llava (LLaVA-1.5) model's images on the best of these grids, [height, width] in
    pixels, e.g. [[336, 672], [672, 336], [672, 672]]. Each side must be a multiple of the base resolution,
    the checkpoint's own image size (vision_config.image_size: 336 for llava-1.5). The model loads as a
    llava_next one: its weights unchanged, plus an image_newline drawn from `seed` (docs/training.md). Empty:
    the model as saved. On a llava_next model it must equal the model's own grid (its saved stage models
    included)."""


def build_model(cfg: ModelConfig, quantize_4bit: bool = False):
    """Return `(model, processor)` for `cfg`; the model is in eval mode.

    `quantize_4bit` loads the language model's linear layers in 4-bit NF4 (QLoRA); it needs a CUDA GPU
    and bitsandbytes, and leaves the vision tower and projector unquantised. With `cfg.grid_pinpoints` on a
    llava model, the model and processor returned are its LLaVA-1.5-HD (llava_next) conversion.
    """
    grid = grid_to_add(cfg)
    if grid and quantize_4bit:
        raise ConfigError(f"{GRID_FIELD}: the grid conversion needs unquantised weights, and QLoRA loads them in"
                          " 4 bits; train stage 1 (align) without it: its saved model is a llava_next checkpoint"
                          " that stage 2 loads with QLoRA")
    model, processor = _load(cfg, quantize_4bit)
    if grid:
        model, processor = to_hd(model, processor, grid, seed=cfg.seed)
        model.set_attn_implementation(cfg.attn_implementation)
    return model.eval(), processor


def _load(cfg: ModelConfig, quantize_4bit: bool):
    """The model and processor `cfg` names, as saved (or as its named spec builds them)."""
    dtype = _dtype(cfg.dtype)
    if cfg.name_or_path in TINY_SPECS:
        if quantize_4bit:
            raise ValueError("4-bit loading needs a checkpoint folder; save the named model first")
        model, processor = build_tiny(cfg.name_or_path, seed=cfg.seed)
        model.set_attn_implementation(cfg.attn_implementation)
        return model.to(dtype), processor
    path = Path(cfg.name_or_path)
    family = check_checkpoint_dir(path)
    import transformers

    model = getattr(transformers, family.model_class).from_pretrained(
        path,
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
        quantization_config=_nf4_config(dtype, family) if quantize_4bit else None,
    )
    processor = load_processor(path, family, trust_remote_code=cfg.trust_remote_code)
    return model, processor


def family_of(cfg: ModelConfig) -> Family:
    """The family of the model `cfg` names, known before anything loads (llava_next for a llava model that
    `grid_pinpoints` converts)."""
    if grid_to_add(cfg):
        return FAMILIES["llava_next"]
    if cfg.name_or_path in TINY_SPECS:
        return get_family(TINY_SPECS[cfg.name_or_path].family)
    return check_checkpoint_dir(Path(cfg.name_or_path))


def grid_to_add(cfg: ModelConfig) -> list[list[int]]:
    """The tile grid `build_model` converts the model `cfg` names to (LLaVA-1.5-HD, medllava.hd), checked
    against the model before anything loads; empty when there is nothing to convert: no grid set, or a grid
    model's own grid. A one-line ConfigError naming `model.grid_pinpoints` otherwise."""
    if not cfg.grid_pinpoints:
        return []
    family, base, own = _image_geometry(cfg)
    pinpoints = check_pinpoints(cfg.grid_pinpoints, base)
    if own:
        if pinpoints == own:
            return []
        raise ConfigError(f"{GRID_FIELD}: {cfg.name_or_path} is a {family.model_type} model with its own grid {own};"
                          f" leave {GRID_FIELD} empty (or set it to that grid)")
    if family.model_type != "llava":
        raise ConfigError(f"{GRID_FIELD}: converts llava (LLaVA-1.5) models only; {cfg.name_or_path} is"
                          f" {family.model_type}")
    return pinpoints


def _image_geometry(cfg: ModelConfig) -> tuple[Family, int, list[list[int]]]:
    """The family of the model `cfg` names, its image size (the tile size of a grid) and its own grid
    (`image_grid_pinpoints`; empty for a single-view model), read from its spec or config.json only."""
    if cfg.name_or_path in TINY_SPECS:
        spec = TINY_SPECS[cfg.name_or_path]
        return get_family(spec.family), spec.image_size, [list(p) for p in spec.grid]
    family = check_checkpoint_dir(Path(cfg.name_or_path))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    own = getattr(config, "image_grid_pinpoints", None) or []
    return family, config.vision_config.image_size, [list(p) for p in own]


def _nf4_config(compute_dtype, family: Family):
    """QLoRA's quantisation: NF4 with double quantisation, the vision side kept in full precision."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise ValueError("4-bit (QLoRA) training needs a CUDA GPU; use LoRA (lora.quantize_4bit=false) on this machine")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("4-bit (QLoRA) training needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(family.nf4_skip),
    )


def _dtype(name: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(table)}")
    return table[name]


def check_checkpoint_dir(path: Path) -> Family:
    """The family of the checkpoint folder `path`; CheckpointError unless it looks complete and loadable."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (and not a named model: {', '.join(TINY_SPECS)})")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a checkpoint folder: config.json is missing")
    if not list(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickled)}: pickle files are not loaded; convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"{path}: no *.safetensors weights{hint}")
    try:
        model_type = checkpoint_model_type(path)
    except UnsupportedModelError as e:
        raise CheckpointError(str(e)) from None
    if model_type in ORIGINAL_LAYOUTS:
        raise CheckpointError(f"{path}: model_type {model_type!r} is the original LLaVA layout; convert it to"
                              " llava-hf format first (medllava convert)")
    try:
        return get_family(model_type, str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def save_model(model, processor, out_dir: str | os.PathLike) -> Path:
    """Save model (safetensors) and processor to `out_dir` atomically: everything is written into a
    temporary sibling folder renamed into place at the end, so an interrupted save never leaves a
    folder that looks complete."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)


def module_of(param_name: str, modules: tuple[str, ...] = MODULES, saved_prefixes: tuple[tuple[str, str], ...] = ()) -> str:
    """The top-level module a parameter belongs to (one of `modules`, its family's): the innermost of them
    among the first three parts of its name (Qwen's `model.visual.merger` is the merger, not the tower), else
    by the family's `saved_prefixes` for a name as a saved checkpoint holds it."""
    parts = param_name.split(".")
    for part in reversed(parts[:3]):
        if part in modules:
            return part
    for prefix, module in saved_prefixes:
        if param_name.startswith(prefix):
            return module
    raise ValueError(f"parameter {param_name!r} is in none of {modules}")


def set_trainable(model, modules: tuple[str, ...] | list[str] | str) -> list[str]:
    """Freeze every parameter except those in `modules` (names from the model family's modules, or a
    stage name: that stage's TRAINABLE entry, the family's connector for the projector).

    Returns the names of the trainable parameters.
    """
    family = model_family(model)
    if isinstance(modules, str):
        if modules not in TRAINABLE:
            raise ValueError(f"unknown stage {modules!r}; choose one of {', '.join(TRAINABLE)}")
        modules = family.trainable(TRAINABLE[modules])
    unknown = set(modules) - set(family.modules)
    if unknown:
        raise ValueError(f"unknown modules {sorted(unknown)}; choose from {', '.join(family.modules)}")
    trainable = []
    for name, param in model.named_parameters():
        # 4-bit weights (QLoRA) are stored as integers: they cannot take gradients, adapters train instead.
        param.requires_grad = (module_of(name, family.modules, family.saved_prefixes) in modules
                               and (param.is_floating_point() or param.is_complex()))
        if param.requires_grad:
            trainable.append(name)
    return trainable
