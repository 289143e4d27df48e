"""The Trainer internals medllava overrides are still there, with the parameters its overrides expect, and
still called by the Trainer: when transformers moves one, this fails, and so does building a trainer."""

from __future__ import annotations

import pytest
from transformers import Trainer

from medllava.finetune.stage_trainer import PRIVATE_OVERRIDES, StageTrainer, internals_problems


def test_the_installed_trainer_has_every_internal_medllava_overrides():
    assert internals_problems(Trainer) == []
    # Every private override of StageTrainer is listed, and nothing else private is overridden.
    private = {name for name in vars(StageTrainer) if name.startswith("_") and not name.startswith("__")
               and hasattr(Trainer, name)}
    assert private | {"get_batch_samples"} == set(PRIVATE_OVERRIDES)
    assert "get_batch_samples" in vars(StageTrainer)


def test_an_upstream_change_is_named_method_by_method():
    class Moved(Trainer):
        def _load_from_checkpoint(self, checkpoint_dir, model=None):  # a renamed parameter
            pass

        def _get_train_sampler(self):  # a dropped parameter
            pass

    del_best = type("NoBest", (Moved,), {"_load_best_model": None})
    problems = internals_problems(del_best)
    assert "Trainer._load_from_checkpoint takes (checkpoint_dir, model), medllava's override" \
           " (resume_from_checkpoint, model)" in problems
    assert "Trainer._get_train_sampler takes (), medllava's override (train_dataset)" in problems
    assert "Trainer._load_best_model is gone" in problems
    assert not any("get_batch_samples" in p for p in problems)


def test_an_internal_the_trainer_no_longer_calls_is_named(monkeypatch):
    import inspect

    source = inspect.getsource(Trainer).replace("self.get_batch_samples(", "self.fetch_batches(")
    monkeypatch.setattr(inspect, "getsource", lambda cls: source if cls is Trainer else "")
    assert internals_problems(Trainer) == ["Trainer.get_batch_samples is no longer called by the Trainer"]


def test_building_a_trainer_stops_before_training_when_upstream_moved(monkeypatch):
    import medllava.finetune.stage_trainer as seam

    seam.check_trainer_internals.cache_clear()
    monkeypatch.setattr(seam, "internals_problems", lambda cls: ["Trainer._load_best_model is gone"])
    try:
        with pytest.raises(seam.TrainerInternalsChanged, match=r"transformers \S+ changed Trainer internals"
                           r" medllava overrides \(finetune/stage_trainer.py\): Trainer._load_best_model is gone"):
            StageTrainer(trace=None)
    finally:
        seam.check_trainer_internals.cache_clear()
