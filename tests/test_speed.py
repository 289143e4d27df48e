"""Training speed options on the tiny model, on CPU: length-grouped batches pad less and still see every
example once per epoch (and replay the same order on resume); the vision feature cache gives the
uncached loss and gradients, skips the tower for images it has seen and reloads from safetensors; the
optimizer and compile settings reach TrainingArguments; the ZeRO-3 estimate runs on the tiny shape."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medllava.finetune.config import StageConfig
from medllava.finetune.stage_checks import check_speed_options
from medllava.finetune.stages import RunSettings, run_stage
from medllava.finetune.trainer import optimizer_name, read_trace, training_arguments
from medllava.finetune.vision_cache import VisionFeatureCache
from medllava.tiny import demo_data
from medllava.config import from_dict
from medllava.data import Collator, EncodedDataset, Encoder
from medllava.model import ModelConfig, build_model, set_trainable

REPO = Path(__file__).resolve().parents[1]
DATA, IMAGES = demo_data()
RUN = RunSettings(seed=3, bf16=False, report_to=("none",))
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models gain nothing from intra-op threads
WORDS = "the chest radiograph shows a right lower lobe opacity with a small pleural effusion and no pneumothorax".split()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """32 one-turn records over the 9 demo images with answers of 2 to 160 words."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    rng = random.Random(0)
    records = []
    for i in range(32):
        n = rng.choice([2, 4, 8, 40, 80, 120, 160])
        answer = " ".join(WORDS[j % len(WORDS)] for j in range(n))
        records.append({"id": f"r{i:02d}", "image": rows[i % len(rows)]["image"], "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": answer}]})
    path = tmp_path_factory.mktemp("mixed") / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def align_stage(path: Path, **overrides) -> StageConfig:
    cfg = {"data": {"path": str(path), "image_root": str(IMAGES), "template": "vicuna_v1"},
           "epochs": 2, "global_batch_size": 4, "per_device_batch_size": 2, "save_steps": 100, "logging_steps": 100,
           "dataloader_workers": 0, "gradient_checkpointing": False, "group_by_length": True,
           "cache_vision_features": "disk"}
    cfg.update(overrides)
    return from_dict(StageConfig, cfg)


@pytest.fixture(scope="module")
def reference(mixed, tmp_path_factory):
    """Stage 1 over the mixed records for 2 epochs, grouped by length, caching features on disk."""
    out = tmp_path_factory.mktemp("reference") / "align"
    record = run_stage("align", align_stage(mixed), ModelConfig(), RUN, out)
    return out, record


def encoded_lengths(path: Path, processor) -> dict[str, int]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    dataset = EncodedDataset(rows, Encoder(processor, image_root=IMAGES))
    return {rows[i]["id"]: len(dataset[i]["input_ids"]) for i in range(len(rows))}


def padding_fraction(micro_batches: list[list[int]]) -> float:
    padded = sum(max(b) * len(b) for b in micro_batches)
    return 1 - sum(sum(b) for b in micro_batches) / padded


def test_grouped_batches_pad_less_and_see_every_example_once_per_epoch(reference, mixed, tiny):
    out, record = reference
    lengths = encoded_lengths(mixed, tiny[1])
    order = read_trace(out / "data_order.jsonl")
    assert record["steps"] == len(order) == 16  # 32 examples, 4 per step, 2 epochs
    epochs = [[i for step in range(first, first + 8) for i in order[step]] for first in (1, 9)]
    for ids in epochs:
        assert sorted(ids) == sorted(lengths)  # each example exactly once per epoch
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    # Micro-batches are consecutive pairs of a step's ids (2 per device, 2 accumulation steps).
    grouped = [[lengths[i] for i in ids[k:k + 2]] for ids in epochs for k in range(0, 32, 2)]
    rng = random.Random(0)
    shuffled = []
    for _ in range(200):
        ids = rng.sample(sorted(lengths), len(lengths))
        shuffled.append(padding_fraction([[lengths[i] for i in ids[k:k + 2]] for k in range(0, 32, 2)]))
    assert padding_fraction(grouped) < 0.5 * sum(shuffled) / len(shuffled)


def test_second_epoch_reads_every_image_from_the_cache(reference):
    out, record = reference
    n_images = len(set(json.loads(line)["image"] for line in DATA.read_text().splitlines()))
    assert record["vision_cache"]["images_computed"] == n_images == 9
    assert record["vision_cache"]["images_served"] == 2 * 32 - 9
    files = list((out / "vision_features").rglob("*"))
    cached = [f for f in files if f.is_file()]
    assert len(cached) == 9 and all(f.suffix == ".safetensors" for f in cached)
    assert all(set(load_file(str(f))) == {"hidden_states.1"} for f in cached)  # tiny: 2 layers, layer -2


@pytest.mark.slow
def test_resumed_grouped_run_replays_the_order_and_reloads_cached_features(reference, mixed, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "align"
    # A run stopped after step 5 (mid-epoch) with a complete checkpoint, then started again.
    run_stage("align", align_stage(mixed, max_steps=5, save_steps=5), ModelConfig(), RUN, out)
    (out / "stage_complete.json").unlink()
    resumed = run_stage("align", align_stage(mixed), ModelConfig(), RUN, out)
    assert read_trace(out / "data_order.jsonl") == read_trace(ref_out / "data_order.jsonl")
    images = {json.loads(line)["id"]: json.loads(line)["image"] for line in mixed.read_text().splitlines()}
    seen = {images[i] for step in range(1, 6) for i in read_trace(out / "data_order.jsonl")[step]}
    assert resumed["vision_cache"]["images_computed"] == 9 - len(seen)  # the rest came back from disk


@pytest.fixture()
def batch(tiny):
    model, processor = tiny
    model = copy.deepcopy(model)
    set_trainable(model, "align")
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:3]
    dataset = EncodedDataset(rows, Encoder(processor, image_root=IMAGES))
    out = Collator(processor.tokenizer.pad_token_id, image_keys=True)([dataset[i] for i in range(3)])
    out.pop("example_ids"), out.pop("skipped")
    return model, out.pop("image_keys"), out


def loss_and_projector_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "multi_modal_projector" in n}


def test_cached_features_give_the_same_loss_and_projector_gradients(batch, tmp_path):
    model, keys, inputs = batch
    ref_loss, ref_grads = loss_and_projector_grads(model, inputs)
    tower_runs = []
    model.model.vision_tower.embeddings.register_forward_hook(lambda *_: tower_runs.append(1))
    for folder in (None, tmp_path / "features"):
        cache = VisionFeatureCache(model, folder).attach()
        for expected_runs in (1, 0):  # first pass computes, second is answered from the cache
            tower_runs.clear()
            with cache.batch(keys):
                loss, grads = loss_and_projector_grads(model, inputs)
            assert len(tower_runs) == expected_runs
            assert torch.allclose(loss, ref_loss, atol=1e-5)
            assert all(torch.allclose(grads[n], ref_grads[n], atol=1e-5) for n in ref_grads)
        cache.detach()
    # A new cache over the same folder (a resumed run) reads the safetensors files, never the tower.
    tower_runs.clear()
    reloaded = VisionFeatureCache(model, tmp_path / "features").attach()
    with reloaded.batch(keys):
        loss, _ = loss_and_projector_grads(model, inputs)
    assert not tower_runs and reloaded.stats()["images_served"] == 3 and torch.allclose(loss, ref_loss, atol=1e-5)
    assert {p.suffix for p in (tmp_path / "features").rglob("*") if p.is_file()} == {".safetensors"}
    with reloaded.batch(keys[:2]), pytest.raises(ValueError, match="3 images but 2 image keys"):
        model(**inputs)
    with pytest.raises(RuntimeError, match="names no images"):
        model(**inputs)
    reloaded.detach()
    assert "forward" not in vars(model.model.vision_tower)  # the class's forward is back


def test_cache_of_a_different_tower_is_not_read(batch, tmp_path):
    model, keys, inputs = batch
    first = VisionFeatureCache(model, tmp_path).attach()
    with first.batch(keys):
        model(**inputs)
    first.detach()
    with torch.no_grad():
        model.model.vision_tower.post_layernorm.weight.add_(1.0)
    assert VisionFeatureCache(model, tmp_path).folder != first.folder


def test_speed_options_that_cannot_work_are_refused():
    deepspeed3 = RunSettings(deepspeed=str(REPO / "finetune/configs/zero3.json"))
    cached = from_dict(StageConfig, {"cache_vision_features": "memory"})
    with pytest.raises(ValueError, match="needs a frozen vision tower"):
        check_speed_options("align", cached, ("vision_tower", "multi_modal_projector"), RunSettings())
    with pytest.raises(ValueError, match="does not work under ZeRO-3"):
        check_speed_options("align", cached, ("multi_modal_projector",), deepspeed3)
    with pytest.raises(ValueError, match="turn one of group_by_length and packing off"):
        check_speed_options("instruct", from_dict(StageConfig, {"group_by_length": True, "packing": True}),
                            ("language_model",), RunSettings())
    check_speed_options("align", cached, ("multi_modal_projector",), RunSettings())


def test_length_estimates_rank_examples_like_their_encodings(mixed, tiny):
    rows = [json.loads(line) for line in mixed.read_text().splitlines()]
    dataset = EncodedDataset(rows, Encoder(tiny[1], image_root=IMAGES))
    exact = encoded_lengths(mixed, tiny[1])
    estimated = dict(zip((r["id"] for r in rows), dataset.lengths(chunk=7)))
    by_estimate = sorted(exact, key=lambda i: (estimated[i], i))
    assert [exact[i] for i in by_estimate] == sorted(exact[i] for i in by_estimate)


def test_optimizer_and_compile_settings_reach_the_training_arguments(tmp_path):
    stage = from_dict(StageConfig, {"global_batch_size": 4, "per_device_batch_size": 2, "dataloader_workers": 0})
    args = training_arguments(stage, tmp_path, RUN)
    on_gpu = torch.cuda.is_available()
    assert args.optim == optimizer_name(on_gpu) == ("adamw_torch_fused" if on_gpu else "adamw_torch")
    assert args.torch_compile is False and args.bf16 is False
    assert optimizer_name(True) == "adamw_torch_fused"
    compiled = training_arguments(dataclasses.replace(stage, torch_compile=True), tmp_path, RUN)
    assert compiled.torch_compile is True
    assert args.dataloader_persistent_workers is False  # torch's DataLoader refuses it without workers
    assert training_arguments(dataclasses.replace(stage, dataloader_workers=2), tmp_path, RUN).dataloader_persistent_workers


def test_activation_checkpointing_is_non_reentrant_and_asked_for_without_a_deprecation_warning(tmp_path):
    import warnings

    stage = from_dict(StageConfig, {"global_batch_size": 4, "per_device_batch_size": 2, "dataloader_workers": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers warns when given the old name it renamed
        on = training_arguments(dataclasses.replace(stage, gradient_checkpointing=True), tmp_path, RUN)
        off = training_arguments(dataclasses.replace(stage, gradient_checkpointing=False), tmp_path, RUN)
    assert on.gradient_checkpointing is True and on.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert off.gradient_checkpointing is False


def test_zero3_estimate_counts_the_tiny_shape(capsys):
    pytest.importorskip("deepspeed")
    spec = importlib.util.spec_from_file_location("zero3_memory", REPO / "benchmarks" / "zero3_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--shape", "tiny", "--gpus", "8"]) == 0
    printed = capsys.readouterr().out
    model, _ = build_model(ModelConfig(name_or_path="tiny"))
    trained = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" not in n)
    assert f"{trained:,} trained parameters" in printed
    assert "HW: Setup with 1 node, 8 GPUs per node." in printed and "per GPU" in printed
    assert "offload_param=none, offload_optimizer=none, zero_init=1" in printed


def test_lora_under_autocast_skips_the_input_cast_and_learns_the_same(batch):
    # Adapters stay in float32 either way; under bf16 autocast their matmuls run in bf16, so PEFT's float32
    # copy of every adapted layer's input changes nothing but the memory traffic.
    from medllava.finetune.config import LoraConfig
    from medllava.finetune.stages import apply_lora

    _, _, inputs = batch
    results = {}
    for autocast in (False, True):
        model, _ = build_model(ModelConfig(name_or_path="tiny", dtype="bfloat16"))
        model = apply_lora(model, LoraConfig(enabled=True, r=8, alpha=16, dropout=0.0), ("multi_modal_projector",),
                           autocast=autocast)
        flags = {m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")}
        assert flags == {not autocast}
        torch.manual_seed(0)
        for name, p in model.named_parameters():  # B is zero at the start: give the adapters a signal both ways
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}).loss
        loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if "lora_A" in n}
        results[autocast] = (loss.detach().float(), grads)
    (loss0, grads0), (loss1, grads1) = results[False], results[True]
    assert torch.allclose(loss0, loss1, rtol=1e-2)
    for name, g in grads0.items():
        assert torch.allclose(grads1[name], g, rtol=0.05, atol=1e-3 * g.abs().max()), name


def test_time_spent_waiting_for_slow_images_is_counted_and_logged(mixed, tmp_path, monkeypatch):
    # Every image takes at least 50 ms to "decode", in the training process (no workers): the loop must
    # count at least that much waiting, log it as a share of the time, and say it was held back.
    import time

    from medllava import data

    encode = data.Encoder.__call__

    def slow(self, record):
        time.sleep(0.05)
        return encode(self, record)

    monkeypatch.setattr(data.Encoder, "__call__", slow)
    out = tmp_path / "align"
    stage = align_stage(mixed, epochs=1, max_steps=3, save_steps=3, logging_steps=1, group_by_length=False,
                        cache_vision_features="none")
    record = run_stage("align", stage, ModelConfig(), RUN, out)
    wait = record["input_wait"]
    assert wait["waited_s"] >= 3 * 4 * 0.05  # 3 steps of 4 examples
    assert 0 < wait["share"] <= 1 and wait["waited_s"] <= wait["training_s"] and wait["dataloader_workers"] == 0
    assert wait["longest_wait_s"] >= 0.1  # each fetch gathers a step's 2 micro-batches of 2
    state = json.loads((out / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    shares = [h["data_wait"] for h in state["log_history"] if "loss" in h]
    assert len(shares) == 3 and all(0 < s <= 1 for s in shares)


@pytest.mark.slow
def test_dataloader_workers_start_once_for_the_whole_run(mixed, tmp_path, monkeypatch):
    # Workers started afresh each epoch made every epoch wait for them (on an H100, a 9-example demo set
    # trained for 40 epochs waited 21% of the time, 10% with workers kept). Each worker that encodes an
    # example leaves a file named by its process id: three epochs must be served by the one worker.
    import os

    from medllava import data

    encode = data.Encoder.__call__
    seen = tmp_path / "pids"
    seen.mkdir()

    def marked(self, record):
        (seen / str(os.getpid())).touch()
        return encode(self, record)

    monkeypatch.setattr(data.Encoder, "__call__", marked)
    stage = align_stage(mixed, epochs=3, save_steps=100, group_by_length=False, cache_vision_features="none",
                        dataloader_workers=1)
    record = run_stage("align", stage, ModelConfig(), RUN, tmp_path / "align")
    assert record["steps"] == 3 * -(-record["examples"] // 4)  # every epoch ran (4 examples per step)
    workers = [p.name for p in seen.iterdir() if p.name != str(os.getpid())]
    assert len(workers) == 1


def test_the_input_wait_line_advises_only_when_input_held_training_back():
    from medllava.finetune.stages import describe_input_wait

    quick = {"waited_s": 1.0, "training_s": 200.0, "share": 0.005, "longest_wait_s": 0.3, "dataloader_workers": 4}
    assert describe_input_wait(quick) == ("waited for data 0.5% of the training time (1.0 s of 200.0 s, longest"
                                          " wait 0.30 s) with 4 dataloader workers")
    starved = dict(quick, waited_s=50.0, share=0.25)
    assert "held training back: raise this stage's dataloader_workers" in describe_input_wait(starved)


@pytest.mark.slow
def test_auto_checkpointing_tries_the_heaviest_micro_batch_and_trains_as_without(mixed, tmp_path, tiny):
    # On a CPU the trial pass only shows the step runs: checkpointing stays off, and the run trains exactly
    # as one configured without checkpointing (the trial leaves no gradients behind).
    losses, records = {}, {}
    for setting in (False, "auto"):
        out = tmp_path / str(setting)
        stage = align_stage(mixed, epochs=1, max_steps=3, save_steps=3, logging_steps=1, gradient_checkpointing=setting,
                            group_by_length=False, cache_vision_features="none", packing=True)
        records[setting] = run_stage("align", stage, ModelConfig(), RUN, out)
        state = json.loads((out / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
        losses[setting] = [row["loss"] for row in state["log_history"] if "loss" in row]
    assert losses["auto"] == losses[False] and len(losses["auto"]) == 3
    assert records[False]["activation_checkpointing"] == {"setting": False, "used": False}
    auto = records["auto"]["activation_checkpointing"]
    assert auto["setting"] == "auto" and auto["used"] is False and "CPU" in auto["probe"]["reason"]
    lengths = encoded_lengths(mixed, tiny[1])
    assert auto["probe"]["examples"] == 2  # the 2 longest, packed into one row
    assert auto["probe"]["tokens"] == sum(sorted(lengths.values())[-2:])


def test_auto_checkpointing_turns_on_when_the_trial_runs_out_of_memory(mixed, tmp_path, monkeypatch, capsys):
    from medllava.finetune import memory_probe, stages

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    seen = {}
    build = stages.build_trainer

    def spy(model, processor, dataset, collator, args, *rest, **kw):
        seen["model"], seen["args"] = model, args
        return build(model, processor, dataset, collator, args, *rest, **kw)

    monkeypatch.setattr(memory_probe, "_forward_backward", out_of_memory)
    monkeypatch.setattr(stages, "build_trainer", spy)
    stage = align_stage(mixed, epochs=1, max_steps=2, save_steps=2, gradient_checkpointing="auto",
                        group_by_length=False, cache_vision_features="none")
    record = run_stage("align", stage, ModelConfig(), RUN, tmp_path / "align")
    assert record["activation_checkpointing"]["used"] is True and record["steps"] == 2
    assert "ran out of memory" in record["activation_checkpointing"]["probe"]["reason"]
    assert "activation checkpointing on (auto): the heaviest micro-batch ran out of memory" in capsys.readouterr().out
    model = seen["model"]  # the Trainer turned checkpointing on from the rebuilt arguments
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def test_auto_checkpointing_keeps_room_for_the_optimizer_and_picks_the_longest():
    from medllava.finetune.memory_probe import HEADROOM, fits, heaviest, optimizer_state_bytes

    gib = 2**30
    assert fits(60 * gib, 8 * gib, 80 * gib) and not fits(70 * gib, 8 * gib, 80 * gib)
    assert fits(int(HEADROOM * 80 * gib), 0, 80 * gib) and not fits(int(HEADROOM * 80 * gib) + 1, 0, 80 * gib)
    assert heaviest([5, 9, 1, 9, 7], 3) == [1, 3, 4]
    layer = torch.nn.Linear(4, 3)  # 15 float32 parameters: two AdamW moments of 4 bytes each
    assert optimizer_state_bytes(layer) == 15 * 8
    layer.bias.requires_grad_(False)
    assert optimizer_state_bytes(layer) == 12 * 8


def test_auto_checkpointing_is_refused_under_deepspeed_and_a_wrong_word_is_named():
    from medllava.config import ConfigError

    deepspeed = RunSettings(deepspeed=str(REPO / "finetune/configs/zero2.json"))
    with pytest.raises(ValueError, match="gradient_checkpointing=auto tries a micro-batch before DeepSpeed"):
        check_speed_options("instruct", from_dict(StageConfig, {"gradient_checkpointing": "auto"}), ("language_model",),
                            deepspeed)
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        from_dict(StageConfig, {"gradient_checkpointing": "sometimes"})
    assert from_dict(StageConfig, {"gradient_checkpointing": "false"}).gradient_checkpointing is False
