"""One curriculum stage, top to bottom, as `run_stage` reads: `plan_stage` checks the settings (nothing is
loaded before a config error), `setup_stage` builds the stage's objects in dependency order (training
arguments, model with its trainable modules and adapters, data, the activation-checkpointing probe, the
vision feature cache, the Trainer), `train_stage` trains (resuming if a checkpoint exists), and
`completion_record` and `finish_stage` save what it made and mark the stage done.

What differs between stages comes from two tables in finetune/config.py: the stage's `StageConfig` and
its entry in `STAGE_DEFINITIONS`; nothing here branches on a stage's name.

Stage folder layout (`<run_dir>/<stage>/`):
    checkpoints/checkpoint-N/   resumable Trainer checkpoints (with a completion marker; trained weights only)
    model/                      full llava-hf checkpoint (stage 2 with LoRA: only if merge is on)
    adapter/                    LoRA adapter (+ projector) when LoRA is on
    projector.safetensors       the connector alone (stage 1: projector, LLaVA-NeXT's image_newline too)
    data_order.jsonl            which examples every optimizer step saw
    skipped.jsonl               every example dropped from a batch while training (unreadable image,
                                too long), with its step
    skipped_<data>.jsonl        every record left out before training (invalid, image missing)
    vision_features/<tower>/    cache_vision_features=disk: the frozen vision tower's features, one
                                safetensors file per image, under a fingerprint of the tower
    stage_complete.json         written last: a stage with it is never redone
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medllava.finetune.compilation import allow_checkpointed_side_effects, compile_decoder_layers, watch_compilation
from medllava.finetune.config import (DataConfig, LoraConfig, RunSettings, StageConfig, StageDefinition,
                                      stage_definition)
from medllava.finetune.memory_probe import describe as describe_probe
from medllava.finetune.stage_checks import (check_data_options, check_lora_options, check_model_options,
                                            check_speed_options, stage_modules)
from medllava.finetune.stage_data import prepare_dataset
from medllava.finetune.stage_outputs import barrier, save_outputs
from medllava.finetune.trainer import (InputWait, build_trainer, checkpoint_step, complete_checkpoints, is_main_process,
                              training_arguments, world_size)
from medllava.families import Family, model_family
from medllava.io import atomic_write_json
from medllava.model import ModelConfig, build_model, family_of, set_trainable

log = logging.getLogger(__name__)

STAGE_DONE = "stage_complete.json"


def stage_done(out_dir: Path) -> dict | None:
    """The completion record of a finished stage, or None."""
    import json

    marker = out_dir / STAGE_DONE
    return json.loads(marker.read_text()) if marker.is_file() else None


def run_stage(
    name: str, stage: StageConfig, start: ModelConfig, run: RunSettings, out_dir: Path,
    val_data: DataConfig | None = None,
) -> dict:
    """Train one stage from `start` into `out_dir`; returns the stage's completion record.

    `name` picks the stage's entry in finetune/config.py's STAGE_DEFINITIONS; `stage` is its config.
    `val_data` (task heads): a validation set evaluated at every save; the checkpoint with the lowest
    validation loss is the one saved.
    """
    from transformers import set_seed

    done = stage_done(out_dir)
    if done is not None:
        log.info("stage %s already complete in %s; not redone", name, out_dir)
        return done
    set_seed(run.seed)
    setup = setup_stage(plan_stage(name, stage, start, run, out_dir, val_data))
    result, resume = train_stage(setup)
    record = completion_record(setup, result, resume)
    finish_stage(setup, record)
    return record


@dataclass(frozen=True)
class StagePlan:
    """One stage's inputs after the settings checks: what it is, how it is set, where it writes."""

    name: str
    stage: StageConfig
    definition: StageDefinition
    family: Family
    """The start model's family (medllava.families), known before it loads."""
    modules: tuple[str, ...]
    """The top-level modules it trains (the family's `modules`)."""
    start: ModelConfig
    run: RunSettings
    out_dir: Path
    val_data: DataConfig | None = None


@dataclass
class StageData:
    """A stage's encoded training (and validation) examples."""

    train: Any
    """medllava.data.EncodedDataset of the training examples."""
    report: dict
    """What `prepare_dataset` read and left out."""
    validation: Any = None
    lengths: list[int] | None = None
    """Token length estimates, one per training example: for group_by_length and the memory probe."""


@dataclass
class StageSetup:
    """Everything `setup_stage` builds for one stage, ready to train."""

    plan: StagePlan
    model: Any
    processor: Any
    data: StageData
    checkpointing: dict
    """Activation checkpointing as set and as used (with the probe's result under `auto`)."""
    compile_watch: Any
    cache: Any
    """The attached medllava.finetune.vision_cache.VisionFeatureCache, or None."""
    input_wait: InputWait
    trainer: Any
    trace: Any
    """The trainer's medllava.finetune.trainer.StepTrace."""


def plan_stage(name: str, stage: StageConfig, start: ModelConfig, run: RunSettings, out_dir: Path,
               val_data: DataConfig | None = None) -> StagePlan:
    """Check the stage's settings against each other, the model and the run, before anything is loaded."""
    definition = stage_definition(name)
    check_lora_options(name, stage, run)
    family = family_of(start)
    modules = stage_modules(name, stage, definition, family)
    check_speed_options(name, stage, modules, run, family)
    check_model_options(name, stage, start)
    check_data_options(name, stage)
    return StagePlan(name, stage, definition, family, modules, start, run, out_dir, val_data)


def setup_stage(plan: StagePlan) -> StageSetup:
    """Build the stage's objects in the order each needs the ones before it."""
    # Arguments before the model: under ZeRO-3 they make from_pretrained load only this rank's shard.
    args = stage_arguments(plan, checkpointing=plan.stage.gradient_checkpointing is True)
    # The model before the data: the processor it brings decides tokenisation and image size.
    model, processor = build_stage_model(plan, args)
    # The watch before the memory probe: graphs compiled there serve training, and count.
    compile_watch = prepare_compilation(plan, model)
    data = load_stage_data(plan, processor)
    # The probe runs the model on the data's heaviest micro-batch; its answer changes the arguments.
    args, checkpointing = settle_checkpointing(plan, model, processor, data, args)
    # The cache wraps the model's vision tower before the Trainer takes the model.
    cache = stage_vision_cache(plan, model, len(data.train))
    input_wait = InputWait()
    trainer, trace = make_trainer(plan, model, processor, data, args, cache, input_wait, compile_watch)
    if is_main_process():
        print(f"[{plan.name}] {describe_stage(plan, model, len(data.train), args.gradient_accumulation_steps)}",
              flush=True)
    return StageSetup(plan, model, processor, data, checkpointing, compile_watch, cache, input_wait, trainer, trace)


def stage_arguments(plan: StagePlan, checkpointing: bool):
    """The stage's TrainingArguments with activation checkpointing on or off (`auto` is off until the probe)."""
    stage = replace(plan.stage, gradient_checkpointing=checkpointing)
    return training_arguments(stage, plan.out_dir, plan.run, evaluate=plan.val_data is not None)


def build_stage_model(plan: StagePlan, args) -> tuple[Any, Any]:
    """The start model and its processor, with the stage's modules trainable (through adapters with LoRA)."""
    stage, modules = plan.stage, plan.modules
    model, processor = build_model(plan.start, quantize_4bit=stage.lora.quantize_4bit)
    set_trainable(model, modules)
    if stage.lora.quantize_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=stage.gradient_checkpointing is True)
        set_trainable(model, modules)
    if stage.lora.enabled:
        model = apply_lora(model, stage.lora, modules, autocast=args.bf16 or args.fp16)
    return model, processor


def prepare_compilation(plan: StagePlan, model):
    """Compile the model's decoder layers (or ready it for torch_compile); returns the compile watch or None."""
    compile_watch = watch_compilation(plan.name, plan.stage)
    if plan.stage.compile_layers:
        compile_decoder_layers(model)
    elif plan.stage.torch_compile:
        allow_checkpointed_side_effects()
    return compile_watch


def load_stage_data(plan: StagePlan, processor) -> StageData:
    """The stage's training examples (refused when none is usable) and validation examples."""
    stage = plan.stage
    dataset, report = prepare_dataset(stage, processor, plan.out_dir)
    if len(dataset) == 0:
        raise ValueError(f"stage {plan.name}: no usable examples in {stage.data.path}\n{report['summary']}")
    validation = prepare_dataset(stage, processor, plan.out_dir, data=plan.val_data)[0] if plan.val_data else None
    needs_lengths = stage.group_by_length or stage.gradient_checkpointing == "auto"
    return StageData(dataset, report, validation, dataset.lengths() if needs_lengths else None)


def settle_checkpointing(plan: StagePlan, model, processor, data: StageData, args) -> tuple[Any, dict]:
    """gradient_checkpointing=auto: probe, and rebuild the arguments with checkpointing on when needed.
    Returns the arguments to train with and the record's `activation_checkpointing`."""
    setting = plan.stage.gradient_checkpointing
    checkpointing = {"setting": setting, "used": setting is True}
    if setting != "auto":
        return args, checkpointing
    from medllava.finetune.memory_probe import probe_stage

    result = probe_stage(model, processor, data.train, data.lengths, plan.stage, args)
    checkpointing.update(used=result.checkpointing, probe=result.as_dict())
    if result.checkpointing:
        args = stage_arguments(plan, checkpointing=True)
    if is_main_process():
        print(f"[{plan.name}] {describe_probe(result)}", flush=True)
    return args, checkpointing


def stage_vision_cache(plan: StagePlan, model, n_examples: int):
    """The stage's attached vision feature cache, or None when `cache_vision_features` is none."""
    if plan.stage.cache_vision_features == "none":
        return None
    from medllava.finetune.vision_cache import attach_stage_cache

    return attach_stage_cache(plan.name, plan.stage.cache_vision_features, model, plan.out_dir, n_examples)


def make_trainer(plan: StagePlan, model, processor, data: StageData, args, cache, input_wait: InputWait,
                 compile_watch) -> tuple[Any, Any]:
    """The stage's Trainer and its step trace, with the collator and loss the stage's options ask for."""
    from medllava.data import Collator
    from medllava.loss import supervised_loss

    stage = plan.stage
    collator = Collator(processor.tokenizer.pad_token_id, pack=stage.packing, sparse_logits=stage.sparse_logits,
                        image_keys=cache is not None)
    return build_trainer(
        model, processor, data.train, collator, args, plan.out_dir, eval_dataset=data.validation,
        loss_func=supervised_loss if stage.sparse_logits else None,
        lengths=data.lengths if stage.group_by_length else None, vision_cache=cache, input_wait=input_wait,
        compile_watch=compile_watch,
    )


def describe_stage(plan: StagePlan, model, examples: int, accumulation: int) -> str:
    """One line on the batch arithmetic and what trains, printed before training starts."""
    stage = plan.stage
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"{examples} examples; effective global batch {stage.per_device_batch_size} per device"
            f" x {world_size()} processes x {accumulation} accumulation = {stage.global_batch_size};"
            f" training {', '.join(plan.modules)}{' with LoRA' if stage.lora.enabled else ''}:"
            f" {trainable:,} of {total:,} parameters")


def train_stage(setup: StageSetup) -> tuple[Any, str | None]:
    """Train, from the latest complete checkpoint when there is one; returns the Trainer's result and that
    checkpoint (None for a fresh start)."""
    checkpoints = complete_checkpoints(setup.plan.out_dir / "checkpoints")
    resume = str(checkpoints[-1]) if checkpoints else None
    if resume and is_main_process():
        print(f"[{setup.plan.name}] resuming from {resume}", flush=True)
    try:
        result = setup.trainer.train(resume_from_checkpoint=resume)
    finally:
        if setup.cache is not None:
            setup.cache.detach()
    return result, resume


def completion_record(setup: StageSetup, result, resume: str | None) -> dict:
    """The stage's `stage_complete.json`: what it trained, on what, and how it went."""
    plan, state = setup.plan, setup.trainer.state
    skip_counts, skip_examples = setup.trace.summary()
    record = {
        "stage": plan.name,
        "steps": state.global_step,
        "train_loss": result.training_loss,
        # The Trainer's train_loss is the mean over the steps this process ran: after a resume, not all.
        "train_loss_steps": [checkpoint_step(resume) + 1 if resume else 1, state.global_step],
        "examples": len(setup.data.train),
        "data": setup.data.report,
        "skipped_in_batches": dict(skip_counts),
        "skipped_examples": skip_examples,
        "trained_modules": list(plan.modules),
        "lora": plan.stage.lora.enabled,
        "input_wait": setup.input_wait.summary(plan.stage.dataloader_workers),
        "activation_checkpointing": setup.checkpointing,
    }
    if setup.compile_watch is not None:
        record["compilation"] = setup.compile_watch.as_dict()
    if setup.cache is not None:
        record["vision_cache"] = setup.cache.stats()
    if setup.data.validation is not None:
        record["validation"] = validation_record(state, len(setup.data.validation))
    return record


def validation_record(state, examples: int) -> dict:
    """The record's `validation`: the best checkpoint by validation loss, and the loss at every save."""
    return {
        "examples": examples,
        "best_eval_loss": state.best_metric,
        "best_checkpoint": state.best_model_checkpoint,
        "eval_losses": [(h["step"], h["eval_loss"]) for h in state.log_history if "eval_loss" in h],
    }


def finish_stage(setup: StageSetup, record: dict) -> None:
    """Save what the stage produced, then its completion record, last: a stage with it is never redone."""
    plan = setup.plan
    if is_main_process():
        print(f"[{plan.name}] {describe_input_wait(record['input_wait'])}", flush=True)
    save_outputs(setup.trainer, setup.processor, plan.stage.lora, plan.out_dir,
                 plan.family if plan.definition.saves_projector else None)
    if is_main_process():
        atomic_write_json(plan.out_dir / STAGE_DONE, record)
    barrier()


def describe_train_loss(record: dict) -> str:
    """'train loss X' for a stage trained in one go; after a resume, the steps the mean covers."""
    first, last = record["train_loss_steps"]
    line = f"train loss {record['train_loss']:.4f}"
    return line if first == 1 else line + f" (mean of steps {first}-{last}, run after resuming)"


def describe_input_wait(wait: dict) -> str:
    """One line on how long training waited for data, with advice when input held it back."""
    line = (f"waited for data {wait['share']:.1%} of the training time ({wait['waited_s']:.1f} s of"
            f" {wait['training_s']:.1f} s, longest wait {wait['longest_wait_s']:.2f} s) with"
            f" {wait['dataloader_workers']} dataloader workers")
    if wait["share"] > 0.1:
        line += ("; loading data held training back: raise this stage's dataloader_workers (one process each, up to"
                 " the CPU cores free per GPU)")
    return line


def modules_to_save(model, modules: tuple[str, ...]) -> list[str]:
    """The modules of `modules` LoRA trains in full beside the adapters (PEFT's `modules_to_save`), by name:
    every one but the language model and lm_head; a module list (Qwen3-VL's DeepStack mergers) as its items,
    since PEFT wraps single modules only."""
    import torch

    out: list[str] = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last not in modules or last in ("language_model", "lm_head"):
            continue
        items = [f"{last}.{i}" for i in range(len(module))] if isinstance(module, torch.nn.ModuleList) else [last]
        out += [item for item in items if item not in out]
    return out


def apply_lora(model, lora: LoraConfig, modules: tuple[str, ...], autocast: bool = False, fold_dropout: bool = True):
    """Wrap the language model's linear layers with LoRA adapters; other trained modules
    (the projector) are trained in full and saved with the adapter. Only submodules can be: a name in
    `modules` that is a bare parameter (LLaVA-NeXT's image_newline) stays frozen, as PEFT freezes every
    weight outside the adapters and `modules_to_save`.

    The adapters are kept in float32. PEFT casts each layer's input to their dtype before the adapter
    runs; with `autocast` (the model trains under bf16/fp16 autocast, as Trainer's `bf16` does) the adapter
    matmuls run in half precision anyway, so that cast (a float32 copy of every adapted layer's input, and
    its dropout in float32) is skipped, as PEFT itself does for 4-bit layers under autocast.

    With `fold_dropout` each adapter's dropout runs inside its `lora_A` and keeps a 1-byte mask for the
    backward pass instead of a copy of the layer's input (finetune/lora_dropout.py): same numbers as PEFT's,
    about half the activation memory the adapters add (a 7B layer keeps 203 KiB per token instead of 270).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    layers = "|".join(lora.target_modules)
    decoder = re.escape(model_family(model).decoder_layers)
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # Only the language model's decoder layers (the family's): the vision tower has layers of the same names.
        target_modules=rf".*{decoder}\.\d+\..*\.({layers})$",
        modules_to_save=modules_to_save(model, modules) or None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_config)
    if autocast:
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    if fold_dropout:
        from medllava.finetune.lora_dropout import fold_lora_dropout

        fold_lora_dropout(model)
    return model


