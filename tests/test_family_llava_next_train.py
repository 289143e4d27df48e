"""LLaVA-NeXT through `adapt` and `finetune`, on the tiny random `tiny-next` model: each stage moves what the
family's freeze table says (stage 1: the projector and image_newline), LoRA leaves the bare image_newline
frozen, packed and padded batches agree, the vision feature cache is refused with a trainable vision tower
before anything loads (it works per tile otherwise: tests/test_vision_cache_tiles.py), a head
trains and reloads, a resumed stage ends where an uninterrupted one does, DeepSpeed ZeRO-2 trains it, and a
folder written by transformers itself (sharded weights) trains through both commands."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_adapt import REPO, config, free_port, stage, write_config
from test_finetune import ask, size
from test_finetune import config as head_config

from medllava.cli import main as cli
from medllava.config import from_dict
from medllava.families import FAMILIES
from medllava.finetune.adapt import run_adapt
from medllava.finetune.compilation import decoder_layers
from medllava.finetune.config import AdaptConfig, LoraConfig
from medllava.finetune.head_training import run_finetune
from medllava.finetune.stages import apply_lora
from medllava.heads import load_with_heads
from medllava.model import ModelConfig, build_model, module_of, save_model, set_trainable

NEXT = FAMILIES["llava_next"]
VQA_RAD = Path(__file__).resolve().parents[1] / "medllava" / "assets" / "demo" / "vqa_rad"
LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "merge": True}


def next_config(run_dir, **overrides) -> AdaptConfig:
    return from_dict(AdaptConfig, config(run_dir, model={"name_or_path": "tiny-next"}, **overrides))


def weights(folder: Path | str) -> dict[str, torch.Tensor]:
    """A checkpoint's (or named model's) weights under the in-memory parameter names."""
    model, _ = build_model(ModelConfig(name_or_path=str(folder)))
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def changed_modules(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {module_of(n, NEXT.modules) for n in before if not torch.equal(before[n], after[n])}


@pytest.fixture(scope="module")
def start_weights():
    return weights("tiny-next")


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory):
    """tiny-next saved as a checkpoint folder."""
    model, processor = build_model(ModelConfig(name_or_path="tiny-next"))
    return save_model(model, processor, tmp_path_factory.mktemp("ckpt") / "tiny-next")


@pytest.mark.slow
def test_stage_1_trains_the_connector_and_stage_2_the_language_model_too(tmp_path, start_weights):
    records = run_adapt(next_config(tmp_path / "run"), ["align", "instruct"])
    run = tmp_path / "run"
    assert records["align"]["trained_modules"] == ["multi_modal_projector", "image_newline"]
    aligned = weights(run / "align" / "model")
    assert changed_modules(start_weights, aligned) == {"multi_modal_projector", "image_newline"}
    # projector.safetensors is the whole connector, as saved (on-disk names may lack the "model." prefix).
    connector = load_file(str(run / "align" / "projector.safetensors"))
    in_memory = {n.removeprefix("model."): t for n, t in aligned.items()}
    assert {module_of(n, NEXT.modules) for n in connector} == {"multi_modal_projector", "image_newline"}
    assert len(connector) == 5 and all(torch.equal(t, in_memory[n.removeprefix("model.")]) for n, t in connector.items())
    instructed = weights(run / "instruct" / "model")
    assert changed_modules(aligned, instructed) == {"multi_modal_projector", "image_newline", "language_model",
                                                   "lm_head"}


@pytest.mark.slow
def test_lora_trains_adapters_and_projector_and_leaves_image_newline_frozen(tmp_path, start_weights):
    record = run_adapt(next_config(tmp_path / "run", instruct=stage(lora=LORA)), ["instruct"])["instruct"]
    out = tmp_path / "run" / "instruct"
    assert record["trained_modules"] == ["multi_modal_projector", "language_model", "lm_head"]
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("lora_A" in n for n in adapter) and any("multi_modal_projector" in n for n in adapter)
    assert not any("vision_tower" in n or "image_newline" in n for n in adapter)
    assert size(out / "adapter") < size(out / "model") / 4
    # The merged model: adapters folded into the language model, the projector trained, nothing else moved.
    assert changed_modules(start_weights, weights(out / "model")) == {"multi_modal_projector", "language_model"}
    # Named to apply_lora directly, the bare parameter is no module to save: PEFT freezes it with the base.
    model, _ = build_model(ModelConfig(name_or_path="tiny-next"))
    set_trainable(model, NEXT.connector)
    model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0), NEXT.connector)
    trained = {module_of(n.replace("base_model.model.", "", 1), NEXT.modules)
               for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"multi_modal_projector", "language_model"}  # the projector's copy, the adapters


def test_settings_the_family_cannot_train_are_refused_before_anything_loads(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("medllava.finetune.stages.build_model", no_loading)
    assert not NEXT.feature_cache  # the cache keeps features per tile; a trainable tower it still refuses
    cached = next_config(tmp_path / "cached", align=stage(cache_vision_features="memory",
                                                          train_modules=["vision_tower", "multi_modal_projector"]))
    with pytest.raises(ValueError, match="stage align: cache_vision_features needs a frozen vision tower"):
        run_adapt(cached, ["align"])
    listed = next_config(tmp_path / "listed", instruct=stage(train_modules=["image_newline", "language_model"],
                                                             lora=LORA))
    with pytest.raises(ValueError, match="image_newline, a single parameter, which LoRA cannot train"):
        run_adapt(listed, ["instruct"])
    llava = from_dict(AdaptConfig, config(tmp_path / "llava", align=stage(train_modules=["image_newline"])))
    with pytest.raises(ValueError, match="names image_newline, which llava models do not have; choose from"):
        run_adapt(llava, ["align"])
    for run in ("cached", "listed", "llava"):
        assert not list((tmp_path / run).glob("*/checkpoints"))


def test_qlora_without_a_gpu_says_what_it_needs(tmp_path, next_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: QLoRA would run")
    cfg = from_dict(AdaptConfig, config(tmp_path / "run", model={"name_or_path": str(next_checkpoint)},
                                        instruct=stage(lora={"enabled": True, "quantize_4bit": True})))
    with pytest.raises(ValueError, match=r"^4-bit \(QLoRA\) training needs a CUDA GPU; use LoRA"):
        run_adapt(cfg, ["instruct"])


@pytest.mark.slow
def test_packed_and_padded_stages_log_the_same_first_loss(tmp_path):
    first = {}
    for name, options in {"plain": dict(packing=False, sparse_logits=False),
                          "packed": dict(packing=True, sparse_logits=True)}.items():
        run_adapt(next_config(tmp_path / name, instruct=stage(max_steps=1, save_steps=1, **options)), ["instruct"])
        state = tmp_path / name / "instruct" / "checkpoints" / "checkpoint-1" / "trainer_state.json"
        first[name] = json.loads(state.read_text())["log_history"][0]["loss"]
    assert first["plain"] == pytest.approx(first["packed"], abs=1e-4)


@pytest.mark.slow
def test_compile_layers_finds_the_decoder_layers_and_the_memory_probe_runs(tmp_path):
    model, _ = build_model(ModelConfig(name_or_path="tiny-next"))
    assert decoder_layers(model) is model.model.language_model.layers and len(decoder_layers(model)) == 2
    record = run_adapt(next_config(tmp_path / "run", instruct=stage(max_steps=1, gradient_checkpointing="auto",
                                                                    group_by_length=True)), ["instruct"])["instruct"]
    probe = record["activation_checkpointing"]["probe"]
    # The heaviest micro-batch as estimated: two examples whose images may take up to the largest grid.
    assert record["activation_checkpointing"]["used"] is False and probe["examples"] == 2 and probe["tokens"] > 2 * 36


@pytest.mark.slow
def test_a_head_trains_saves_reloads_and_changes_the_answers(tmp_path, next_checkpoint):
    record = run_finetune(head_config(tmp_path / "vqa", next_checkpoint, VQA_RAD))
    head = Path(record["head"])
    adapter = load_file(str(head / "adapter_model.safetensors"))
    assert any("lora_A" in n for n in adapter) and any("multi_modal_projector" in n for n in adapter)
    assert size(head) < size(next_checkpoint) / 4 and record["steps"] == 8
    model, processor, infos = load_with_heads(ModelConfig(name_or_path=str(next_checkpoint)), [head])
    assert list(infos) == ["vqa-head"]
    with_head = ask(model, processor, VQA_RAD)
    with model.disable_adapter():
        plain = ask(model, processor, VQA_RAD)
    base, base_processor = build_model(ModelConfig(name_or_path=str(next_checkpoint)))
    assert plain == ask(base, base_processor, VQA_RAD) and with_head != plain


@pytest.mark.slow
@pytest.mark.parametrize("name,lora", [("align", False), ("instruct", True)])
def test_a_resumed_stage_ends_with_the_uninterrupted_runs_weights(tmp_path, name, lora):
    # As tests/test_adapt.py's resume test: the step-3 checkpoint keeps what the stage trains (stage 1: the
    # projector and image_newline), and a run resumed from it ends where the uninterrupted run does.
    six = stage(max_steps=6, save_steps=3, learning_rate=1e-2, warmup_ratio=0.0, lora={**LORA, "enabled": lora})
    runs = {run: next_config(tmp_path / run, **{name: six}) for run in ("ref", "resumed")}
    for cfg in runs.values():
        run_adapt(cfg, [name])
    out = tmp_path / "resumed" / name
    kept = load_file(str(out / "checkpoints" / "checkpoint-3" / ("adapter_model.safetensors" if lora
                                                                  else "trained_weights.safetensors")))
    start = weights("tiny-next")
    if lora:
        assert any("lora_A" in n for n in kept) and not any("image_newline" in n for n in kept)
    else:
        assert sorted(kept) == sorted(n for n in start if module_of(n, NEXT.modules) in NEXT.connector)
    for path in (out / "stage_complete.json", out / "model", out / "checkpoints" / "checkpoint-6"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    record = run_adapt(runs["resumed"], [name])[name]
    assert record["steps"] == 6 and record["train_loss_steps"] == [4, 6]
    a, b = weights(out / "model"), weights(tmp_path / "ref" / name / "model")
    assert changed_modules(start, a) and all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


@pytest.mark.slow
def test_adapt_and_finetune_train_a_folder_transformers_wrote(tmp_path, capsys):
    import yaml

    model, processor = build_model(ModelConfig(name_or_path="tiny-next"))
    hub = tmp_path / "llava-v1.6-tiny-hf"
    model.save_pretrained(hub, max_shard_size="100KB")  # sharded, as hub checkpoints of real size are
    processor.save_pretrained(hub)
    assert len(list(hub.glob("*.safetensors"))) > 1 and (hub / "model.safetensors.index.json").is_file()
    cfg = config(tmp_path / "run", model={"name_or_path": str(hub)}, instruct=stage(lora=LORA))
    (tmp_path / "adapt.yaml").write_text(yaml.safe_dump(cfg))
    assert cli(["adapt", "--config", str(tmp_path / "adapt.yaml")]) == 0
    run = tmp_path / "run"
    assert changed_modules(weights(hub), weights(run / "align" / "model")) == {"multi_modal_projector",
                                                                                 "image_newline"}
    assert (run / "instruct" / "adapter" / "adapter_model.safetensors").is_file()
    assert cli(["finetune", "--task", "vqa-rad", "--base", str(hub), "--root", str(VQA_RAD),
                f"run_dir={tmp_path / 'head'}", "bf16=false", "report_to=[none]", "train.max_steps=2",
                "train.global_batch_size=4", "train.per_device_batch_size=4", "train.dataloader_workers=0",
                "train.gradient_checkpointing=false", "train.lora.r=4", "train.lora.alpha=8"]) == 0
    assert f"head saved to {tmp_path / 'head' / 'head-head'}" in capsys.readouterr().out
    load_with_heads(ModelConfig(name_or_path=str(hub)), [tmp_path / "head" / "head-head"])


@pytest.mark.slow
def test_deepspeed_zero2_trains_the_grid_model_on_cpu(tmp_path):
    # As tests/test_adapt.py's DeepSpeed test, on tiny-next: stage 2 under ZeRO-2 in one process launched by
    # torch.distributed.run, whose image_sizes travel with pixel_values through DeepSpeed's engine. Resuming
    # from DeepSpeed's own checkpoint is the same code for every family, and tested there.
    pytest.importorskip("deepspeed")
    two = stage(max_steps=2, save_steps=2, learning_rate=1e-2, warmup_ratio=0.0)
    cfg = write_config(tmp_path / "c.yaml", config(tmp_path / "run", model={"name_or_path": "tiny-next"},
                                                   instruct=two, deepspeed=str(REPO / "finetune/configs/zero2.json")))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr",
                "127.0.0.1", "--master-port", str(free_port()), "-m", "medllava.cli"]
    out = subprocess.run([*launcher, "adapt", "--config", str(cfg), "--stage", "instruct"], cwd=REPO,
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    stage_dir = tmp_path / "run" / "instruct"
    ckpt = stage_dir / "checkpoints" / "checkpoint-2"
    assert (ckpt / "global_step2").is_dir()  # DeepSpeed's own layout: ZeRO really ran
    assert not list(ckpt.glob("*.safetensors"))
    assert changed_modules(weights("tiny-next"), weights(stage_dir / "model")) == {
        "multi_modal_projector", "image_newline", "language_model", "lm_head"}
