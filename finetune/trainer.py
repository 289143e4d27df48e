"""The one training wrapper every stage and task head uses: `transformers.Trainer` + PEFT + DeepSpeed.

`training_arguments` turns a StageConfig into TrainingArguments and `build_trainer` makes a Trainer
(medllava.finetune.stage_trainer.StageTrainer, the one file that relies on the Trainer's internals, with its
`Bookkeeping` callback) whose only addition is bookkeeping: each batch carries the ids of its examples and of the examples that were
skipped (missing or unreadable images, too long); the trainer strips them before the forward pass, records
which examples every optimizer step saw (`data_order.jsonl`, written by rank 0 with every rank's
shard), and counts what was skipped. Checkpoints get a completion marker once the Trainer's save
has returned, so a run killed mid-save never resumes from a half-written checkpoint. Without PEFT
(whose adapters load back as saved), a checkpoint's weights are the trained parameters only
(`trained_weights.safetensors`, under the model's own names), loaded back exactly on resume and when
the best checkpoint is restored; the frozen ones come from the start checkpoint, as they did. Under
DeepSpeed they are in DeepSpeed's own checkpoint (`global_step*/`), which is what it resumes from.

With an evaluation set (task heads with a validation split), the model is evaluated at every save
and the checkpoint with the lowest validation loss is the one loaded at the end of training.

`InputWait` times how long the loop waited for data (logged as `data_wait`, summed in the stage record).

Speed options: `lengths` batches examples of similar length together (`length_grouped_sampler`,
seeded per epoch so a resumed run replays the same order), and `vision_cache` serves a frozen vision
tower's features from a `medllava.finetune.vision_cache.VisionFeatureCache`. The optimizer is fused AdamW on
CUDA, and `StageConfig.torch_compile` compiles the model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path

from medllava.finetune.config import StageConfig
from medllava.io import JsonlLog

log = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
TRAINED_WEIGHTS = "trained_weights.safetensors"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def gradient_accumulation(stage: StageConfig, n_processes: int) -> int:
    """Accumulation steps that make `global_batch_size` from the per-device batch and the process count."""
    per_step = stage.per_device_batch_size * n_processes
    if stage.global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size {stage.global_batch_size} is not a multiple of per_device_batch_size "
            f"{stage.per_device_batch_size} x {n_processes} processes"
        )
    return stage.global_batch_size // per_step


def checkpoint_step(path: str | Path) -> int:
    """The global step of a Trainer checkpoint folder `checkpoint-N`."""
    return int(Path(path).name.split("-")[-1])


def complete_checkpoints(folder: Path) -> list[Path]:
    """Resumable checkpoints under `folder`, oldest first. Incomplete ones (killed mid-save) are
    removed by the main process, so the Trainer's own rotation never counts them."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("checkpoint-*"):
        if not path.is_dir() or not path.name.split("-")[-1].isdigit():
            continue
        if (path / COMPLETE_MARKER).is_file():
            found.append(path)
        elif is_main_process():
            log.warning("removing incomplete checkpoint %s (the run was stopped while saving it)", path)
            shutil.rmtree(path, ignore_errors=True)
    return sorted(found, key=checkpoint_step)


def trained_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def trained_state(model) -> dict:
    """The parameters `model` trains, under its own state-dict names (detached, contiguous)."""
    names = trained_names(model)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in names}


def save_trained_state(model, folder: str | Path) -> None:
    """Write the trained parameters of `model` to `folder/trained_weights.safetensors`: a checkpoint
    needs no copy of the frozen ones, which the run rebuilds from its start checkpoint."""
    from safetensors.torch import save_file

    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file(trained_state(model), str(Path(folder) / TRAINED_WEIGHTS), metadata={"format": "pt"})


def load_trained_state(model, path: Path) -> None:
    """Load weights written by `save_trained_state` into `model`, which must train exactly those."""
    from safetensors.torch import load_file

    state = load_file(str(path), device="cpu")
    expected = trained_names(model)
    if set(state) != expected:
        extra, absent = sorted(set(state) - expected), sorted(expected - set(state))
        raise ValueError(f"{path}: the checkpoint's trained weights do not match what this run trains"
                         f" (in the checkpoint only: {extra[:3]}; trained but not in it: {absent[:3]})")
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # names were checked against the model's own


class StepTrace:
    """What each optimizer step saw and skipped, gathered from every rank and written by rank 0:
    `data_order.jsonl` (example ids per step) and `skipped.jsonl` (every example dropped from a batch,
    with the step and the reason)."""

    def __init__(self, path: Path):
        self.path = path
        self.skipped_path = path.with_name("skipped.jsonl")
        self.ids: list[str] = []
        self.skips: list[tuple[str, str]] = []

    def add(self, ids: list[str], skipped: list[tuple[str, str]]) -> None:
        self.ids.extend(ids)
        self.skips.extend(skipped)

    def flush(self, step: int) -> None:
        """Write the step's ids and skips from every rank (gathered to rank 0), then start the next step."""
        shards = self._gather()
        if is_main_process():
            self._write(step, shards)
        self.ids, self.skips = [], []

    def _gather(self) -> list[tuple[list[str], list[tuple[str, str]]]]:
        """(ids, skips) of this step from every rank, in rank order; this rank's alone when not distributed."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return [(self.ids, self.skips)]
        shards = [None] * dist.get_world_size()
        dist.all_gather_object(shards, (self.ids, self.skips))
        return shards

    def _write(self, step: int, shards: list[tuple[list[str], list[tuple[str, str]]]]) -> None:
        """Append the step's line to data_order.jsonl and its skips, if any, to skipped.jsonl."""
        ids = [shard_ids for shard_ids, _ in shards]
        with JsonlLog(self.path) as trace:
            trace.append({"step": step, "ids": ids[0] if len(ids) == 1 else ids})
        skipped = [skip for _, shard_skips in shards for skip in shard_skips]
        if skipped:
            with JsonlLog(self.skipped_path) as log_file:
                for reason, detail in skipped:
                    log_file.append({"step": step, "reason": reason, "detail": detail})

    def summary(self) -> tuple[Counter, list[str]]:
        """Skip counts by reason and the first few skipped examples, over the whole stage (a step
        written again after a resume counts once)."""
        rows: dict[tuple, dict] = {}
        if self.skipped_path.is_file():
            for line in self.skipped_path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    rows[(row["step"], row["reason"], row["detail"])] = row
        counts = Counter(row["reason"] for row in rows.values())
        return counts, [f"{r['reason']}: {r['detail']}" for r in list(rows.values())[:20]]


class InputWait:
    """How long the training loop waited for its next batches: dataloader workers reading and decoding
    images, collating, and the copy to the device. The host may wait while the GPU still runs queued work,
    so this bounds the GPU time lost to input from above: near zero, data loading is off the critical path.
    Trainer logs get `data_wait` (the share of the time since the previous log); `summary()` covers the
    whole run of this process."""

    def __init__(self):
        self.waited = self.longest = 0.0
        self.started: float | None = None
        self.ended: float | None = None
        self._window_start = 0.0
        self._window_waited = 0.0

    def add(self, start: float, end: float) -> None:
        """One fetch of batches, from `start` to `end` (time.perf_counter)."""
        if self.started is None:
            self.started = self._window_start = start
        self.waited += end - start
        self._window_waited += end - start
        self.longest = max(self.longest, end - start)

    def window_share(self) -> float | None:
        """Share of the wall time spent waiting since the previous call (or the first fetch); None before it."""
        if self.started is None:
            return None
        now = time.perf_counter()
        share = self._window_waited / max(now - self._window_start, 1e-9)
        self._window_start, self._window_waited = now, 0.0
        return share

    def finish(self) -> None:
        self.ended = time.perf_counter()

    def summary(self, workers: int) -> dict:
        wall = ((self.ended or time.perf_counter()) - self.started) if self.started is not None else 0.0
        return {
            "waited_s": round(self.waited, 3),
            "training_s": round(wall, 3),
            "share": round(self.waited / wall, 4) if wall > 0 else 0.0,
            "longest_wait_s": round(self.longest, 3),
            "dataloader_workers": workers,
        }


def read_trace(path: Path) -> dict[int, list]:
    """The data-order trace: optimizer step -> example ids (a list per rank when distributed).
    A step written again after a resume replaces the earlier line."""
    order: dict[int, list] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                order[row["step"]] = row["ids"]
    return order


def optimizer_name(on_gpu: bool) -> str:
    """AdamW as one fused kernel per step on CUDA; the plain loop elsewhere."""
    return "adamw_torch_fused" if on_gpu else "adamw_torch"


def checkpointing_arguments(enabled: bool) -> dict:
    """TrainingArguments for activation (gradient) checkpointing, non-reentrant, under the name the
    installed transformers takes: `activation_checkpointing` where it exists (the old name warns
    there), `gradient_checkpointing` in older 5.x releases."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def training_arguments(stage: StageConfig, out_dir: Path, run, evaluate: bool = False):
    """TrainingArguments of one stage. Create them before the model is loaded: under DeepSpeed ZeRO-3
    they register the config that makes `from_pretrained` load each rank's shard only. A stage whose
    `gradient_checkpointing` is `auto` gets it off here (medllava.finetune.stages decides after a trial pass)."""
    import torch
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=stage.per_device_batch_size,
        gradient_accumulation_steps=gradient_accumulation(stage, world_size()),
        learning_rate=stage.learning_rate,
        num_train_epochs=stage.epochs,
        max_steps=stage.max_steps,
        warmup_steps=stage.warmup_ratio,
        lr_scheduler_type=stage.lr_scheduler,
        weight_decay=stage.weight_decay,
        optim=optimizer_name(on_gpu),
        torch_compile=bool(stage.torch_compile),
        bf16=run.bf16 and (not on_gpu or torch.cuda.is_bf16_supported()),
        **checkpointing_arguments(stage.gradient_checkpointing is True),
        save_strategy="steps",
        save_steps=stage.save_steps,
        save_total_limit=stage.save_total_limit,
        logging_steps=stage.logging_steps,
        logging_first_step=True,
        report_to=list(run.report_to),
        seed=run.seed,
        data_seed=run.seed,
        dataloader_num_workers=stage.dataloader_workers,
        # Workers live for the whole run: started afresh each epoch, they cost a wait per epoch, which
        # on a small in-house set trained for many epochs is a good part of every epoch.
        dataloader_persistent_workers=stage.dataloader_workers > 0,
        remove_unused_columns=False,
        deepspeed=run.deepspeed,
        ddp_backend="gloo" if world_size() > 1 and not on_gpu else None,
        ddp_find_unused_parameters=False,
        use_cpu=not on_gpu,
        **_evaluation_arguments(stage, evaluate),
    )


def length_grouped_sampler(lengths: list[int], group_size: int, seed: int):
    """A sampler that shuffles, then sorts each run of 50 groups (fewer on small data) by length, so
    that each `group_size` slice holds examples of similar length (transformers' own grouping). The
    shuffle is seeded by `seed` and the epoch, which the Trainer sets: every example once per epoch,
    a new order each epoch, and the same order again when a run resumes mid-epoch."""
    from medllava.finetune.stage_trainer import LengthGroupedEpochSampler

    return LengthGroupedEpochSampler(lengths, group_size, seed)


def build_trainer(model, processor, train_dataset, collator, args, out_dir: Path, eval_dataset=None, loss_func=None,
                  lengths: list[int] | None = None, vision_cache=None, input_wait: InputWait | None = None,
                  compile_watch=None):
    """A Trainer for one stage with `args` from `training_arguments`, and the StepTrace it writes.

    With `eval_dataset`, the validation loss is computed at every save (`save_steps`) and the best
    checkpoint by that loss is restored when training ends. `loss_func` replaces the model's own loss
    (`medllava.loss.supervised_loss` with a sparse-logits collator). `lengths` (one per training
    example) groups batches by length; `vision_cache` (attached, with a collator that adds
    `image_keys`) answers the vision tower from its cache. `input_wait` times every fetch of batches.
    `compile_watch` (medllava.finetune.compilation) checks after the first step that the compiled model ran compiled.
    """
    from medllava.finetune.stage_trainer import Bookkeeping, StageTrainer

    trace = StepTrace(out_dir / "data_order.jsonl")
    trainer = StageTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        compute_loss_func=loss_func,
        callbacks=[Bookkeeping(trace, input_wait, compile_watch)],
        trace=trace, input_wait=input_wait, vision_cache=vision_cache, lengths=lengths,
    )
    return trainer, trace


def _evaluation_arguments(stage: StageConfig, evaluate: bool) -> dict:
    """TrainingArguments that evaluate at every save and keep the checkpoint with the lowest
    validation loss (only the loss is gathered: the logits of a validation set do not fit in memory)."""
    if not evaluate:
        return {}
    return {
        "eval_strategy": "steps",
        "eval_steps": stage.save_steps,
        "per_device_eval_batch_size": stage.per_device_batch_size,
        "prediction_loss_only": True,
        "load_best_model_at_end": True,
        "metric_for_best_model": "eval_loss",
        "greater_is_better": False,
    }
