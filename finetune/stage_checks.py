"""The settings checks a stage runs before anything is loaded (`finetune.stages.plan_stage`): what the stage
trains, for its model's family; options that cannot work together, with the model, or under the run's DeepSpeed
config, each refused in one line."""

from __future__ import annotations

from pathlib import Path

from medllava.families import FAMILIES, Family
from medllava.finetune.config import STAGE_DEFINITIONS, RunSettings, StageConfig, StageDefinition
from medllava.model import ModelConfig


def stage_modules(name: str, stage: StageConfig, definition: StageDefinition, family: Family) -> tuple[str, ...]:
    """The top-level modules the stage trains: its config's `train_modules`, checked against the family's
    modules, else the stage's default with the family's connector for the projector. Under LoRA the default
    leaves out the family's bare parameters (LLaVA-NeXT's image_newline), which PEFT cannot train."""
    if stage.train_modules:
        unknown = [m for m in stage.train_modules if m not in family.modules]
        if unknown:
            raise ValueError(f"stage {name}: train_modules names {', '.join(unknown)}, which {family.model_type}"
                             f" models do not have; choose from {', '.join(family.modules)}")
        bare = [m for m in stage.train_modules if m in family.bare_parameters]
        if bare and stage.lora.enabled:
            raise ValueError(f"stage {name}: train_modules names {', '.join(bare)}, a single parameter, which LoRA"
                             " cannot train (adapters and whole modules only); leave it out or set lora.enabled=false")
        return tuple(stage.train_modules)
    modules = family.trainable(definition.trains)
    if not modules:
        raise ValueError(f"stage {name}: train_modules is empty and {name} is none of the stages"
                         f" {', '.join(STAGE_DEFINITIONS)}; name the modules to train")
    return family.lora_trainable(modules) if stage.lora.enabled else modules


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



def check_speed_options(name: str, stage: StageConfig, modules: tuple[str, ...], run: RunSettings,
                        family: Family = FAMILIES["llava"]) -> None:
    """Refuse speed options that cannot work with the rest of the stage's config or the model's `family`."""
    if stage.compile_layers and stage.torch_compile:
        raise ValueError(f"stage {name}: compile_layers compiles each decoder layer and torch_compile the whole model;"
                         " turn one of them off")
    if stage.gradient_checkpointing == "auto" and run.deepspeed:
        raise ValueError(f"stage {name}: gradient_checkpointing=auto tries a micro-batch before DeepSpeed takes the"
                         f" model ({run.deepspeed}); set gradient_checkpointing to true or false")
    if stage.group_by_length and stage.packing:
        raise ValueError(f"stage {name}: group_by_length shortens padding, and packed rows have none;"
                         " turn one of group_by_length and packing off")
    if stage.packing and family.packing:
        raise ValueError(f"stage {name}: packing does not apply to {family.model_type} models: {family.packing};"
                         " set packing=false")
    if stage.cache_vision_features == "none":
        return
    if family.feature_cache:
        raise ValueError(f"stage {name}: cache_vision_features does not apply to {family.model_type} models:"
                         f" {family.feature_cache}; set cache_vision_features=none")
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
