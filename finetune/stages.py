"""One curriculum stage, top to bottom: load the starting model, freeze, add adapters, read the
data, train (resuming if a checkpoint exists), save, mark the stage done.

Stage folder layout (`<run_dir>/<stage>/`):
    checkpoints/checkpoint-N/   resumable Trainer checkpoints (with a completion marker; trained weights only)
    model/                      full llava-hf checkpoint (stage 2 with LoRA: only if merge is on)
    adapter/                    LoRA adapter (+ projector) when LoRA is on
    projector.safetensors       the projector alone (stage 1), small enough to share
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
import os
from dataclasses import dataclass, replace
from pathlib import Path

from medllava.finetune.compilation import allow_checkpointed_side_effects, compile_decoder_layers, watch_compilation
from medllava.finetune.config import DataConfig, LoraConfig, StageConfig
from medllava.finetune.memory_probe import describe as describe_probe
from medllava.finetune.trainer import (InputWait, build_trainer, checkpoint_step, complete_checkpoints, is_main_process,
                              training_arguments, world_size)
from medllava.io import atomic_write_json, write_jsonl
from medllava.model import TRAINABLE, ModelConfig, build_model, save_model, set_trainable

log = logging.getLogger(__name__)

STAGE_DONE = "stage_complete.json"


@dataclass
class RunSettings:
    """Run-wide settings a stage needs besides its own config."""

    seed: int = 42
    bf16: bool = True
    deepspeed: str | None = None
    report_to: tuple[str, ...] = ("tensorboard",)


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

    `val_data` (task heads): a validation set evaluated at every save; the checkpoint with the lowest
    validation loss is the one saved.
    """
    from transformers import set_seed

    done = stage_done(out_dir)
    if done is not None:
        log.info("stage %s already complete in %s; not redone", name, out_dir)
        return done
    set_seed(run.seed)
    if stage.lora.merge and _zero_stage(run.deepspeed) == 3:
        raise ValueError(f"stage {name}: lora.merge needs whole weights, which ZeRO-3 shards; use ZeRO-2 or merge after the run")
    modules = tuple(stage.train_modules) or TRAINABLE[name]
    check_speed_options(name, stage, modules, run)
    auto_checkpointing = stage.gradient_checkpointing == "auto"
    # Arguments before the model: under ZeRO-3 they make from_pretrained load only this rank's shard.
    args = training_arguments(replace(stage, gradient_checkpointing=False) if auto_checkpointing else stage, out_dir,
                              run, evaluate=val_data is not None)
    # The model before the data: the processor it brings decides tokenisation and image size.
    if stage.lora.quantize_4bit and not stage.lora.enabled:
        raise ValueError(f"stage {name}: lora.quantize_4bit needs lora.enabled (QLoRA trains adapters on a 4-bit model)")
    if start.attn_implementation == "flex_attention":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"stage {name}: model.attn_implementation=flex_attention trains on a CUDA GPU only (torch's"
                             " flex attention has no backward pass on a CPU); set model.attn_implementation=sdpa")
    model, processor = build_model(start, quantize_4bit=stage.lora.quantize_4bit)
    set_trainable(model, modules)
    if stage.lora.quantize_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=stage.gradient_checkpointing is True)
        set_trainable(model, modules)
    if stage.lora.enabled:
        model = apply_lora(model, stage.lora, modules, autocast=args.bf16 or args.fp16)
    # The watch before the memory probe: graphs compiled there serve training, and count.
    compile_watch = watch_compilation(name, stage)
    if stage.compile_layers:
        compile_decoder_layers(model)
    elif stage.torch_compile:
        allow_checkpointed_side_effects()
    dataset, data_report = prepare_dataset(stage, processor, out_dir)
    if len(dataset) == 0:
        raise ValueError(f"stage {name}: no usable examples in {stage.data.path}\n{data_report['summary']}")
    val_dataset = prepare_dataset(stage, processor, out_dir, data=val_data)[0] if val_data else None
    from medllava.data import Collator
    from medllava.loss import supervised_loss

    lengths = dataset.lengths() if stage.group_by_length or auto_checkpointing else None
    checkpointing = {"setting": stage.gradient_checkpointing, "used": stage.gradient_checkpointing is True}
    if auto_checkpointing:
        result = probe_checkpointing(model, processor, dataset, lengths, stage, args)
        checkpointing.update(used=result.checkpointing, probe=result.as_dict())
        if result.checkpointing:
            args = training_arguments(replace(stage, gradient_checkpointing=True), out_dir, run,
                                      evaluate=val_data is not None)
        if is_main_process():
            print(f"[{name}] {describe_probe(result)}", flush=True)
    cache = _vision_cache(name, stage, model, out_dir, len(dataset))
    collator = Collator(processor.tokenizer.pad_token_id, pack=stage.packing, sparse_logits=stage.sparse_logits,
                        image_keys=cache is not None)
    input_wait = InputWait()
    trainer, trace = build_trainer(
        model, processor, dataset, collator, args, out_dir, eval_dataset=val_dataset,
        loss_func=supervised_loss if stage.sparse_logits else None,
        lengths=lengths if stage.group_by_length else None, vision_cache=cache, input_wait=input_wait,
        compile_watch=compile_watch,
    )
    accumulation = args.gradient_accumulation_steps
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if is_main_process():
        print(
            f"[{name}] {len(dataset)} examples; effective global batch {stage.per_device_batch_size} per device"
            f" x {world_size()} processes x {accumulation} accumulation = {stage.global_batch_size};"
            f" training {', '.join(modules)}{' with LoRA' if stage.lora.enabled else ''}:"
            f" {trainable:,} of {total:,} parameters",
            flush=True,
        )
    checkpoints = complete_checkpoints(out_dir / "checkpoints")
    resume = str(checkpoints[-1]) if checkpoints else None
    if resume and is_main_process():
        print(f"[{name}] resuming from {resume}", flush=True)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        if cache is not None:
            cache.detach()
    skip_counts, skip_examples = trace.summary()
    record = {
        "stage": name,
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        # The Trainer's train_loss is the mean over the steps this process ran: after a resume, not all.
        "train_loss_steps": [checkpoint_step(resume) + 1 if resume else 1, trainer.state.global_step],
        "examples": len(dataset),
        "data": data_report,
        "skipped_in_batches": dict(skip_counts),
        "skipped_examples": skip_examples,
        "trained_modules": list(modules),
        "lora": stage.lora.enabled,
        "input_wait": input_wait.summary(stage.dataloader_workers),
        "activation_checkpointing": checkpointing,
    }
    if compile_watch is not None:
        record["compilation"] = compile_watch.as_dict()
    if is_main_process():
        print(f"[{name}] {describe_input_wait(record['input_wait'])}", flush=True)
    if cache is not None:
        record["vision_cache"] = cache.stats()
    if val_dataset is not None:
        record["validation"] = {
            "examples": len(val_dataset),
            "best_eval_loss": trainer.state.best_metric,
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "eval_losses": [(h["step"], h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h],
        }
    save_outputs(name, trainer, processor, stage.lora, out_dir)
    if is_main_process():
        atomic_write_json(out_dir / STAGE_DONE, record)
    _barrier()
    return record


def probe_checkpointing(model, processor, dataset, lengths: list[int], stage: StageConfig, args):
    """gradient_checkpointing=auto: try the heaviest micro-batch without it (finetune/memory_probe.py)."""
    import torch

    from medllava.finetune.memory_probe import probe
    from medllava.data import Collator
    from medllava.loss import supervised_loss

    collator = Collator(processor.tokenizer.pad_token_id, pack=stage.packing, sparse_logits=stage.sparse_logits)
    autocast = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    return probe(model, dataset, collator, lengths, stage.per_device_batch_size,
                 loss_func=supervised_loss if stage.sparse_logits else None, autocast_dtype=autocast, device=args.device)


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
    if _zero_stage(run.deepspeed) == 3:
        # Each ZeRO-3 forward gathers weights from every rank; a rank that skips the tower would hang the rest.
        raise ValueError(f"stage {name}: cache_vision_features does not work under ZeRO-3 ({run.deepspeed});"
                         " use ZeRO-2 or cache_vision_features=none")


def _vision_cache(name: str, stage: StageConfig, model, out_dir: Path, n_examples: int):
    """The stage's attached vision feature cache, or None when caching is off."""
    if stage.cache_vision_features == "none":
        return None
    from medllava.finetune.vision_cache import VisionFeatureCache

    folder = out_dir / "vision_features" if stage.cache_vision_features == "disk" else None
    cache = VisionFeatureCache(model, folder).attach()
    if is_main_process():
        size = cache.bytes_per_image()
        print(f"[{name}] caching vision features in {cache.folder or 'host memory'}: {size / 2**20:.3g} MiB per image,"
              f" at most {size * n_examples / 2**30:.3g} GiB for {n_examples} examples", flush=True)
    return cache


def _zero_stage(deepspeed_config: str | None) -> int | None:
    if not deepspeed_config:
        return None
    import json

    return json.loads(Path(deepspeed_config).read_text()).get("zero_optimization", {}).get("stage")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def apply_lora(model, lora: LoraConfig, modules: tuple[str, ...], autocast: bool = False, fold_dropout: bool = True):
    """Wrap the language model's linear layers with LoRA adapters; other trained modules
    (the projector) are trained in full and saved with the adapter.

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
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # Only the language model's projections: the vision tower has layers with the same names.
        target_modules=rf".*language_model.*\.({layers})$",
        modules_to_save=[m for m in modules if m not in ("language_model", "lm_head")] or None,
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


def prepare_dataset(stage: StageConfig, processor, out_dir: Path, data: DataConfig | None = None):
    """Read the stage's records (or those of `data`, a validation set) into Arrow, drop those whose
    images are missing (counted and reported with the first few paths), and wrap them for lazy encoding."""
    from medllava.data import EncodedDataset, Encoder
    from medllava.records import ReadReport, load_records
    from medllava.templates import template_problem

    data = data or stage.data
    if not data.path:
        raise ValueError("data.path is not set: name the conversation file of this stage")
    image_root = Path(data.image_root or Path(data.path).parent)
    read = ReadReport()
    rank = os.environ.get("RANK", "0")
    records = load_records(data.path, cache_dir=out_dir / ".cache" / f"rank{rank}", skip_bad=True, report=read)
    missing: list[str] = []
    unusable: list[str] = []

    def usable(rec) -> bool:
        if problem := template_problem(rec["conversations"], data.template):
            unusable.append(f"{data.path}: record {rec['id']}: {problem}")
            return False
        absent = [p for p in rec["images"] if not (image_root / p).is_file()]
        missing.extend(str(image_root / p) for p in absent)
        return not absent

    records = records.filter(usable, load_from_cache_file=False, desc="checking records")
    report = {
        "records_read": read.read,
        "records_invalid": len(read.skipped),
        "invalid_examples": read.skipped[:5],
        "unusable_for_template": len(unusable),
        "unusable_examples": unusable[:5],
        "missing_images": len(missing),
        "missing_image_examples": missing[:5],
        "usable": len(records),
    }
    report["summary"] = (
        f"{read.read} records read, {len(read.skipped)} invalid, "
        + (f"{len(unusable)} unusable with template {data.template}, " if unusable else "")
        + f"{len(missing)} with missing images, {len(records)} usable"
        + "".join(f"\n  {m}" for m in (read.skipped[:3] + unusable[:3] + missing[:3]))
    )
    if is_main_process():
        print(f"[data] {data.path}: {report['summary']}", flush=True)
        # Every record left out before training, for the people who fix the data.
        listed = out_dir / f"skipped_{Path(data.path).stem}.jsonl"
        write_jsonl(listed, [{"reason": "invalid record", "detail": m} for m in read.skipped]
                    + [{"reason": "unusable conversation", "detail": m} for m in unusable]
                    + [{"reason": "missing image", "detail": m} for m in missing])
        report["skipped_list"] = str(listed)
    encoder = Encoder(processor, template=data.template, image_root=image_root, max_length=data.max_length,
                      image_options={"exclude_burned_in": True} if data.exclude_burned_in else {})
    return EncodedDataset(records, encoder), report


def save_outputs(name: str, trainer, processor, lora: LoraConfig, out_dir: Path) -> None:
    """Save what the stage produced (see the module docstring for the layout), each atomically.

    Called on every rank: under ZeRO-3 the Trainer's save gathers the sharded weights, and only the
    main process writes. Weights go to a staging folder first and are renamed into place whole.
    """
    from safetensors import safe_open
    from safetensors.torch import save

    from medllava.io import atomic_open, replace_dir

    target = out_dir / ("adapter" if lora.enabled else "model")
    staging = out_dir / f".{target.name}.staging"
    trainer.save_final_model(str(staging))  # the model, or the PEFT adapter (+ modules to save)
    if is_main_process():
        if not lora.enabled:
            processor.save_pretrained(staging)
        replace_dir(staging, target)
    _barrier()
    if lora.enabled and lora.merge and is_main_process():
        save_model(trainer.model.merge_and_unload(), processor, out_dir / "model")
    if name == "align" and not lora.enabled and is_main_process():
        # The projector on its own, read back from the saved (gathered) weights.
        with safe_open(str(target / "model.safetensors"), "pt") as f:
            projector = {k: f.get_tensor(k) for k in f.keys() if "multi_modal_projector" in k}
        with atomic_open(out_dir / "projector.safetensors", "wb") as f:
            f.write(save(projector))
