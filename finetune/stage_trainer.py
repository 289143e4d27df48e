"""`StageTrainer`: transformers' Trainer with medllava's bookkeeping, and the one place that relies on the
Trainer's internals.

Most of what a stage adds goes through the Trainer's public extension points: callbacks
(`Bookkeeping` below), `compute_loss` (example ids, skipped examples, the vision cache),
`log` (`data_wait`) and `save_model` (what a checkpoint holds). Four things have no public hook, and
`PRIVATE_OVERRIDES` lists them with the parameters medllava's overrides expect:

- `_load_from_checkpoint`, `_load_best_model`: load a checkpoint's trained weights exactly (the Trainer's
  own loading goes through `load_state_dict(strict=False)`, which loaded nothing when names differed);
- `_get_train_sampler`: the length-grouped order seeded per epoch, replayed on resume
  (`LengthGroupedEpochSampler`);
- `get_batch_samples`: public by name, but an internal step of the training loop; it times the wait for data.

`check_trainer_internals` compares that table with the installed Trainer (each method present, its
parameters as expected, and still called by the Trainer's own code) and stops with a one-line error
naming the method and the transformers version when upstream has moved, before any training: an override
that is never called would otherwise train on without its behaviour, silently.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from medllava.finetune.trainer import (COMPLETE_MARKER, TRAINED_WEIGHTS, InputWait, StepTrace, is_main_process,
                                       load_trained_state, save_trained_state)
from medllava.io import atomic_write_json

# method -> the parameters (after self) the override below takes and passes on.
PRIVATE_OVERRIDES: dict[str, tuple[str, ...]] = {
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_load_best_model": (),
    "_get_train_sampler": ("train_dataset",),
    "get_batch_samples": ("epoch_iterator", "num_batches", "device"),
}


class TrainerInternalsChanged(RuntimeError):
    """The installed transformers no longer has a Trainer internal that medllava overrides."""


def internals_problems(trainer_cls: type = Trainer) -> list[str]:
    """What differs between `PRIVATE_OVERRIDES` and `trainer_cls`: one line per method, none when all match."""
    source = _source(trainer_cls)
    problems = []
    for name, expected in PRIVATE_OVERRIDES.items():
        method = getattr(trainer_cls, name, None)
        if method is None:
            problems.append(f"Trainer.{name} is gone")
            continue
        found = tuple(p for p in inspect.signature(method).parameters if p != "self")
        if found != expected:
            problems.append(f"Trainer.{name} takes ({', '.join(found)}), medllava's override ({', '.join(expected)})")
        elif f"self.{name}" not in source:
            problems.append(f"Trainer.{name} is no longer called by the Trainer")
    return problems


def _source(cls: type) -> str:
    """The source of `cls` and its bases, as far as it can be found."""
    parts = []
    for klass in cls.__mro__:
        with contextlib.suppress(OSError, TypeError):
            parts.append(inspect.getsource(klass))
    return "\n".join(parts)


@functools.cache
def check_trainer_internals() -> None:
    """Raise `TrainerInternalsChanged` when the installed Trainer differs from what medllava overrides."""
    import transformers

    problems = internals_problems(Trainer)
    if problems:
        raise TrainerInternalsChanged(
            f"transformers {transformers.__version__} changed Trainer internals medllava overrides"
            f" (finetune/stage_trainer.py): {'; '.join(problems)}. Install the versions in constraints.txt")


class StageTrainer(Trainer):
    """A Trainer that records the data order, skips what the collator dropped, saves checkpoints as the
    trained weights only, and loads them back exactly.

    `trace` gathers example ids per step; `input_wait` times every fetch of batches; `vision_cache` answers
    the vision tower from its cache; `lengths` (one per example) groups batches by length.
    """

    def __init__(self, *args, trace: StepTrace, input_wait: InputWait | None = None, vision_cache=None,
                 lengths: list[int] | None = None, **kwargs):
        check_trainer_internals()
        self.trace, self.input_wait, self.vision_cache, self.lengths = trace, input_wait, vision_cache, lengths
        self._saving_whole_model = False
        super().__init__(*args, **kwargs)

    # Public extension points.

    def save_final_model(self, output_dir: str) -> None:
        """Save the whole model (or the PEFT adapter), as `Trainer.save_model` does."""
        self._saving_whole_model = True
        try:
            self.save_model(output_dir)
        finally:
            self._saving_whole_model = False

    def save_model(self, output_dir=None, _internal_call=False):
        # Called by the Trainer for every checkpoint. Checkpoints of a model trained without PEFT hold only
        # its trained weights, under the model's own names: the Trainer's save_pretrained writes
        # transformers' on-disk names, which its resume loaded with strict=False into a model whose names
        # differ (LLaVA's `model.` prefix), so nothing was loaded; and stage 1 saved the whole 7B model
        # (14 GB) to keep a 40 MB projector. Under DeepSpeed the weights it resumes from are in its own
        # checkpoint, written with the optimizer's, so no second copy is gathered. PEFT keeps its adapters.
        if self._saving_whole_model or _is_peft(self.model):
            return super().save_model(output_dir, _internal_call)
        if self.args.should_save and not self.is_deepspeed_enabled:
            save_trained_state(self.accelerator.unwrap_model(self.model, keep_torch_compile=False), output_dir)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        image_keys = self._take_bookkeeping(model, inputs)
        if inputs["input_ids"].numel() == 0:
            # Every example of this micro-batch was skipped: a zero loss keeps all ranks in step.
            zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            return (zero, {}) if return_outputs else zero
        sizes = inputs.get("image_sizes")  # a grid family's images are tiled by their size
        with self.vision_cache.batch(image_keys, sizes) if self.vision_cache else contextlib.nullcontext():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _take_bookkeeping(self, model, inputs: dict) -> list | None:
        """Remove the collator's bookkeeping keys from `inputs`, record the training batch's example ids and
        skips in the trace; returns the batch's image keys for the vision cache (None without it)."""
        ids, skipped = inputs.pop("example_ids"), inputs.pop("skipped")
        image_keys = inputs.pop("image_keys", None)
        if model.training:  # evaluation batches are not part of the data order
            self.trace.add(ids, skipped)
        return image_keys

    def log(self, logs, *args, **kwargs):
        if self.input_wait is not None and "loss" in logs:  # training logs; evaluation logs carry eval_loss
            share = self.input_wait.window_share()
            if share is not None:
                logs["data_wait"] = round(share, 4)
        super().log(logs, *args, **kwargs)

    # Trainer internals (PRIVATE_OVERRIDES).

    def _load_own_format(self, folder, model=None) -> bool:
        path = Path(folder) / TRAINED_WEIGHTS
        found = path.is_file()
        if found:
            load_trained_state(self.accelerator.unwrap_model(model or self.model, keep_torch_compile=False), path)
        return found

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self._load_own_format(resume_from_checkpoint, model):
            return
        if not _is_peft(self.model) and (Path(resume_from_checkpoint) / "model.safetensors").is_file():
            raise ValueError(f"{resume_from_checkpoint} holds the whole model under transformers' checkpoint"
                             " names, as checkpoints of an earlier medllava did; the Trainer would load none of"
                             " it and go on from the start weights. Remove the stage's checkpoints/ folder to"
                             " train the stage again from its start")
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        if not self._load_own_format(self.state.best_model_checkpoint):
            super()._load_best_model()

    def _get_train_sampler(self, train_dataset=None):
        if self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        a = self.args
        group = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
        return LengthGroupedEpochSampler(self.lengths, group, a.data_seed if a.data_seed is not None else a.seed)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        start = time.perf_counter()
        try:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        finally:
            if self.input_wait is not None:
                self.input_wait.add(start, time.perf_counter())


class Bookkeeping(TrainerCallback):
    """Public Trainer hooks of a stage: write each step's trace, check compilation after the first step,
    stop the input-wait clock at the end, and mark every checkpoint complete once its save has returned."""

    def __init__(self, trace: StepTrace, input_wait: InputWait | None = None, compile_watch=None):
        self.trace, self.input_wait, self.compile_watch = trace, input_wait, compile_watch

    def on_step_end(self, args, state, control, **kwargs):
        self.trace.flush(state.global_step)
        self._check_compilation(state.global_step)

    def _check_compilation(self, step: int) -> None:
        """Once, after the first step: did the compiled model run compiled (medllava.finetune.compilation)."""
        watch = self.compile_watch
        if watch is None or watch.report.compiled is not None:
            return
        report = watch.check(step)
        if report.message and is_main_process():
            print(f"[{watch.stage}] warning: {report.message}", flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.input_wait is not None:
            self.input_wait.finish()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            atomic_write_json(ckpt / COMPLETE_MARKER, {"global_step": state.global_step})


class LengthGroupedEpochSampler(LengthGroupedSampler):
    """transformers' length grouping with its shuffle seeded by `seed` plus the epoch the Trainer sets
    (medllava.finetune.trainer.length_grouped_sampler)."""

    def __init__(self, lengths: list[int], group_size: int, seed: int):
        super().__init__(group_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import torch

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)
