"""Model assembly on transformers' `LlavaForConditionalGeneration` and `AutoProcessor`.

`build_model(cfg)` loads a local llava-hf checkpoint folder or builds a named random-weight model.
Weights load from safetensors only (never pickle), and remote code stays off unless asked for.
`TRAINABLE` is the one table of what each curriculum stage trains.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from medllava.io import atomic_dir
from medllava.tiny import TINY_SPECS, build_tiny

# What each stage trains, by top-level module of LlavaForConditionalGeneration. Everything else is frozen.
TRAINABLE: dict[str, tuple[str, ...]] = {
    "align": ("multi_modal_projector",),
    "instruct": ("multi_modal_projector", "language_model", "lm_head"),
    "finetune": ("multi_modal_projector", "language_model", "lm_head"),
}
MODULES = ("vision_tower", "multi_modal_projector", "language_model", "lm_head")


class CheckpointError(ValueError):
    """A folder that is not a loadable llava-hf checkpoint."""


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"
    """A llava-hf checkpoint folder (config.json + *.safetensors + processor files), or a named
    random-weight model: `tiny` (tests) or `small` (CPU demos)."""

    dtype: str = "float32"
    """Weight dtype: float32, bfloat16 or float16."""

    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa, eager, flex_attention (PyTorch's own; with packing it keeps
    attention inside each packed example without a dense mask; trains on CUDA only) or flash_attention_2 (where
    installed)."""

    trust_remote_code: bool = False
    """Allow code shipped inside the checkpoint folder to run. Off: llava-hf checkpoints need none."""

    seed: int = 0
    """Seed for the random weights of a named model."""


def build_model(cfg: ModelConfig, quantize_4bit: bool = False):
    """Return `(model, processor)` for `cfg`; the model is in eval mode.

    `quantize_4bit` loads the language model's linear layers in 4-bit NF4 (QLoRA); it needs a CUDA GPU
    and bitsandbytes, and leaves the vision tower and projector unquantised.
    """
    dtype = _dtype(cfg.dtype)
    quantization = _nf4_config(dtype) if quantize_4bit else None
    if cfg.name_or_path in TINY_SPECS:
        if quantization is not None:
            raise ValueError("4-bit loading needs a checkpoint folder; save the named model first")
        model, processor = build_tiny(cfg.name_or_path, seed=cfg.seed)
        model.set_attn_implementation(cfg.attn_implementation)
        return model.to(dtype), processor
    path = Path(cfg.name_or_path)
    check_checkpoint_dir(path)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(
        path,
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
        quantization_config=quantization,
    )
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    return model.eval(), processor


# Modules QLoRA keeps unquantised, as transformers 5 matches them: from the start of the full module name
# (LlavaForConditionalGeneration holds model.vision_tower, model.multi_modal_projector, model.language_model
# and lm_head), so a bare "vision_tower" would match nothing and the vision side would go to 4-bit.
NF4_SKIP_MODULES = ("model.vision_tower", "model.multi_modal_projector", "lm_head")


def _nf4_config(compute_dtype):
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
        llm_int8_skip_modules=list(NF4_SKIP_MODULES),
    )


def _dtype(name: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(table)}")
    return table[name]


def check_checkpoint_dir(path: Path) -> None:
    """Raise CheckpointError unless `path` looks like a complete llava-hf checkpoint folder."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (and not a named model: {', '.join(TINY_SPECS)})")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a checkpoint folder: config.json is missing")
    if not list(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickled)}: pickle files are not loaded; convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"{path}: no *.safetensors weights{hint}")
    import json

    try:
        model_type = json.loads((path / "config.json").read_text())["model_type"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}/config.json: unreadable or without model_type ({e})") from None
    if model_type != "llava":
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not a llava-hf checkpoint"
            " (original LLaVA / LLaVA-Med layouts need converting to llava-hf format first)"
        )


def save_model(model, processor, out_dir: str | os.PathLike) -> Path:
    """Save model (safetensors) and processor to `out_dir` atomically: everything is written into a
    temporary sibling folder renamed into place at the end, so an interrupted save never leaves a
    folder that looks complete."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)


def module_of(param_name: str) -> str:
    """The top-level Llava module a parameter belongs to (one of MODULES)."""
    parts = param_name.split(".")
    for part in parts[:3]:
        if part in MODULES:
            return part
    raise ValueError(f"parameter {param_name!r} is in none of {MODULES}")


def set_trainable(model, modules: tuple[str, ...] | list[str] | str) -> list[str]:
    """Freeze every parameter except those in `modules` (names from MODULES, or a stage name).

    Returns the names of the trainable parameters.
    """
    if isinstance(modules, str):
        if modules not in TRAINABLE:
            raise ValueError(f"unknown stage {modules!r}; choose one of {', '.join(TRAINABLE)}")
        modules = TRAINABLE[modules]
    unknown = set(modules) - set(MODULES)
    if unknown:
        raise ValueError(f"unknown modules {sorted(unknown)}; choose from {', '.join(MODULES)}")
    trainable = []
    for name, param in model.named_parameters():
        # 4-bit weights (QLoRA) are stored as integers: they cannot take gradients, adapters train instead.
        param.requires_grad = module_of(name) in modules and (param.is_floating_point() or param.is_complex())
        if param.requires_grad:
            trainable.append(name)
    return trainable


def num_image_tokens(processor) -> int:
    """Image tokens one `<image>` expands to, computed as transformers' Llava processor does.

    (H // patch) * (W // patch) patches of the processed image, plus the vision tower's extra tokens
    (CLS), minus one when the `default` feature strategy drops CLS.
    """
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
