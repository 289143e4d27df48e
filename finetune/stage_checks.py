"""The settings checks a stage runs before anything is loaded (`finetune.stages.plan_stage`): options
that cannot work together, with the model, or under the run's DeepSpeed config, each refused in one line."""

from __future__ import annotations

from pathlib import Path

from medllava.finetune.config import RunSettings, StageConfig
from medllava.model import ModelConfig


def check_lora_options(name: str, stage: StageConfig, run: RunSettings) -> None:
    """Refuse LoRA options that cannot work with the rest of the stage's config."""
    if stage.lora.merge and zero_stage(run.deepspeed) == 3:
        raise ValueError(f"stage {name}: lora.merge needs whole weights, which ZeRO-3 shards; use ZeRO-2 or merge after the run")
    if stage.lora.quantize_4bit and not stage.lora.enabled:
        raise ValueError(f"stage {name}: lora.quantize_4bit needs lora.enabled (QLoRA trains adapters on a 4-bit model)")



def check_data_options(name: str, stage: StageConfig) -> None:
    """Refuse a conversation template the registry does not know (medllava.templates.TEMPLATES)."""
    from medllava.templates import get_template

    try:
        get_template(stage.data.template)
    except ValueError as e:
        raise ValueError(f"stage {name}: data.template: {e}") from None


def check_model_options(name: str, stage: StageConfig, start: ModelConfig) -> None:
    """Refuse a model setting the training machine cannot train with."""
    if start.attn_implementation != "flex_attention":
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"stage {name}: model.attn_implementation=flex_attention trains on a CUDA GPU only (torch's"
                         " flex attention has no backward pass on a CPU); set model.attn_implementation=sdpa")



def check_speed_options(name: str, stage: StageConfig, modules: tuple[str, ...], run: RunSettings) -> None:
    """Refuse speed options that cannot work with the rest of the stage's config."""
    if stage.compile_layers and stage.torch_compile:
        raise ValueError(f"stage {name}: compile_layers compiles each decoder layer and torch_compile the whole model;"
                         " turn one of them off")
    if stage.gradient_checkpointing == "auto" and run.deepspeed:
        raise ValueError(f"stage {name}: gradient_checkpointing=auto tries a micro-batch before DeepSpeed takes the"
                         f" model ({run.deepspeed}); set gradient_checkpointing to true or false")
    if stage.group_by_length and stage.packing:
        raise ValueError(f"stage {name}: group_by_length shortens padding, and packed rows have none;"
                         " turn one of group_by_length and packing off")
    if stage.cache_vision_features == "none":
        return
    if "vision_tower" in modules:
        raise ValueError(f"stage {name}: cache_vision_features needs a frozen vision tower, but the stage trains"
                         f" {', '.join(modules)}; set cache_vision_features=none or leave vision_tower out")
    if zero_stage(run.deepspeed) == 3:
        # Each ZeRO-3 forward gathers weights from every rank; a rank that skips the tower would hang the rest.
        raise ValueError(f"stage {name}: cache_vision_features does not work under ZeRO-3 ({run.deepspeed});"
                         " use ZeRO-2 or cache_vision_features=none")



def zero_stage(deepspeed_config: str | None) -> int | None:
    """The ZeRO stage of the DeepSpeed config file, or None without DeepSpeed."""
    if not deepspeed_config:
        return None
    import json

    return json.loads(Path(deepspeed_config).read_text()).get("zero_optimization", {}).get("stage")
