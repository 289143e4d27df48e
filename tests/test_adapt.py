"""The curriculum on the tiny model, on CPU: what each stage trains moves and nothing else does, loss
falls, a killed run resumes to the same steps and data order, two processes shard the data, shipped
configs load."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medllava.finetune.adapt import run_adapt
from medllava.finetune.config import AdaptConfig
from medllava.finetune.stages import describe_train_loss
from medllava.finetune.trainer import COMPLETE_MARKER, complete_checkpoints, read_trace
from medllava.tiny import demo_data
from medllava.config import ConfigError, from_dict, load_config
from medllava.model import ModelConfig, build_model, module_of

REPO = Path(__file__).resolve().parents[1]
DATA, IMAGES = demo_data()


def stage(path=DATA, **overrides):
    base = {
        "data": {"path": str(path), "image_root": str(IMAGES), "template": "vicuna_v1"},
        "max_steps": 3, "global_batch_size": 4, "per_device_batch_size": 2, "save_steps": 100,
        "logging_steps": 1, "dataloader_workers": 0, "gradient_checkpointing": False, "learning_rate": 1e-2,
    }
    base.update(overrides)
    return base


def config(run_dir, **overrides) -> dict:
    cfg = {"run_dir": str(run_dir), "model": {"name_or_path": "tiny"}, "bf16": False, "report_to": ["none"],
           "align": stage(), "instruct": stage()}
    cfg.update(overrides)
    return cfg


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """A saved checkpoint's weights under the in-memory parameter names."""
    model, _ = build_model(ModelConfig(name_or_path=str(folder)))
    return {n: p.detach() for n, p in model.state_dict().items()}


@pytest.fixture(scope="module")
def start_weights():
    model, _ = build_model(ModelConfig(name_or_path="tiny"))
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def changed_modules(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {module_of(n) for n in before if not torch.equal(before[n], after[n])}


def test_full_curriculum_trains_what_the_table_says(tmp_path, start_weights):
    cfg = from_dict(AdaptConfig, config(tmp_path / "run"))
    records = run_adapt(cfg, ["align", "instruct"])
    run = tmp_path / "run"
    aligned = weights(run / "align" / "model")
    assert changed_modules(start_weights, aligned) == {"multi_modal_projector"}
    projector = load_file(str(run / "align" / "projector.safetensors"))
    assert projector and all(module_of(n) == "multi_modal_projector" for n in projector)
    # Saved under llava-hf's on-disk names, which may lack the in-memory "model." prefix.
    in_memory = {n.removeprefix("model."): t for n, t in aligned.items()}
    assert len(projector) == 4 and all(torch.equal(t, in_memory[n.removeprefix("model.")]) for n, t in projector.items())
    instructed = weights(run / "instruct" / "model")
    assert changed_modules(aligned, instructed) == {"multi_modal_projector", "language_model", "lm_head"}
    assert records["instruct"]["steps"] == 3 and (run / "instruct" / "stage_complete.json").is_file()
    # The saved config reproduces the run, and a finished stage is not redone.
    assert load_config(AdaptConfig, run / "config.yaml") == cfg
    mtime = (run / "align" / "model" / "model.safetensors").stat().st_mtime_ns
    run_adapt(cfg, ["align"])
    assert (run / "align" / "model" / "model.safetensors").stat().st_mtime_ns == mtime


def test_lora_stage_keeps_the_vision_tower_and_saves_a_small_adapter(tmp_path, start_weights):
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "merge": True}
    cfg = from_dict(AdaptConfig, config(tmp_path / "run", instruct=stage(lora=lora)))
    run_adapt(cfg, ["instruct"])
    out = tmp_path / "run" / "instruct"
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("lora_A" in n for n in adapter) and any("multi_modal_projector" in n for n in adapter)
    assert not any("vision_tower" in n for n in adapter)
    merged = weights(out / "model")
    assert changed_modules(start_weights, merged) == {"multi_modal_projector", "language_model"}


def test_loss_falls_on_a_set_the_model_can_overfit(tmp_path):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:2]
    small = tmp_path / "two.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(AdaptConfig, config(tmp_path / "run", instruct=stage(
        small, max_steps=40, global_batch_size=2, learning_rate=3e-3, warmup_ratio=0.0, lr_scheduler="constant")))
    run_adapt(cfg, ["instruct"])
    state = json.loads(next((tmp_path / "run" / "instruct" / "checkpoints").glob("*/trainer_state.json")).read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses[0] > 5.5 and losses[-1] < 0.5 * losses[0]


def test_resuming_with_a_different_config_is_refused(tmp_path):
    run_adapt(from_dict(AdaptConfig, config(tmp_path / "run")), ["align"])
    changed = from_dict(AdaptConfig, config(tmp_path / "run", seed=7))
    with pytest.raises(ConfigError, match=r"different config \(seed\)"):
        run_adapt(changed, ["align"])


def test_incomplete_checkpoints_are_never_resumed_from(tmp_path):
    for step, complete in ((2, True), (4, False)):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "model.safetensors").write_bytes(b"")
        if complete:
            (ckpt / COMPLETE_MARKER).write_text("{}")
    assert complete_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"]
    assert not (tmp_path / "checkpoint-4").exists()


def cli(*args, env=None):
    return [sys.executable, "-m", "medllava.cli", *args]


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    long = stage(max_steps=24, save_steps=1, save_total_limit=2, learning_rate=1e-3)
    ref = write_config(tmp_path / "ref.yaml", config(tmp_path / "ref", instruct=long))
    killed = write_config(tmp_path / "killed.yaml", config(tmp_path / "killed", instruct=long))
    ckpts = tmp_path / "killed" / "instruct" / "checkpoints"
    proc = subprocess.Popen(cli("adapt", "--config", str(killed), "--stage", "instruct"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    # Killed after step 3: at step 1 warmup keeps the learning rate at 0, so a resume that loaded no
    # weights would still match.
    while time.time() < deadline and not any(int(m.parent.name.split("-")[1]) >= 3
                                             for m in ckpts.glob(f"checkpoint-*/{COMPLETE_MARKER}")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = complete_checkpoints(ckpts)
    assert done and int(done[-1].name.split("-")[1]) < 24, "the run was not killed mid-way"
    assert not (tmp_path / "killed" / "instruct" / "stage_complete.json").exists()
    subprocess.run(cli("adapt", "--config", str(killed), "--stage", "instruct"), cwd=REPO, check=True,
                   capture_output=True)
    subprocess.run(cli("adapt", "--config", str(ref), "--stage", "instruct"), cwd=REPO, check=True,
                   capture_output=True)
    resumed = json.loads((tmp_path / "killed" / "instruct" / "stage_complete.json").read_text())
    reference = json.loads((tmp_path / "ref" / "instruct" / "stage_complete.json").read_text())
    assert resumed["steps"] == reference["steps"] == 24
    order = read_trace(tmp_path / "killed" / "instruct" / "data_order.jsonl")
    assert order == read_trace(tmp_path / "ref" / "instruct" / "data_order.jsonl") and len(order) == 24
    a, b = weights(tmp_path / "killed" / "instruct" / "model"), weights(tmp_path / "ref" / "instruct" / "model")
    assert all(torch.allclose(a[n], b[n], atol=1e-5) for n in a)


@pytest.mark.slow
@pytest.mark.parametrize("name,lora", [("align", False), ("instruct", False), ("instruct", True)])
def test_a_resumed_stage_goes_on_from_its_checkpoints_weights(tmp_path, name, lora):
    # Stop a 6-step run after its step-3 checkpoint (here: remove what came after it) and run it again: it
    # must end with the weights of the uninterrupted run, so step 3's weights were really loaded. The
    # checkpoint keeps only what the stage trains (stage 1: the projector), under the model's own names;
    # a LoRA stage keeps PEFT's adapter format.
    six = stage(max_steps=6, save_steps=3, learning_rate=1e-2, warmup_ratio=0.0,
                lora={"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0, "merge": True})
    runs = {}
    for run in ("ref", "resumed"):
        runs[run] = from_dict(AdaptConfig, config(tmp_path / run, **{name: six}))
        run_adapt(runs[run], [name])
    out = tmp_path / "resumed" / name
    model, _ = build_model(ModelConfig(name_or_path="tiny"))
    kept = load_file(str(out / "checkpoints" / "checkpoint-3" / ("adapter_model.safetensors" if lora
                                                                  else "trained_weights.safetensors")))
    if lora:
        assert any("lora_A" in n for n in kept)
    elif name == "align":
        assert sorted(kept) == sorted(n for n in model.state_dict() if ".multi_modal_projector." in n)
    else:
        assert not any(".vision_tower." in n for n in kept) and any(".language_model." in n for n in kept)
    assert not (out / "checkpoints" / "checkpoint-3" / "model.safetensors").exists()
    for path in (out / "stage_complete.json", out / "model", out / "checkpoints" / "checkpoint-6"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    record = run_adapt(runs["resumed"], [name])[name]
    assert record["steps"] == 6 and record["train_loss_steps"] == [4, 6]  # the Trainer's mean covers these
    assert describe_train_loss(record).endswith("(mean of steps 4-6, run after resuming)")
    a, b = weights(out / "model"), weights(tmp_path / "ref" / name / "model")
    changed = [n for n in a if not torch.equal(a[n], model.state_dict()[n])]
    assert changed and all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    if not lora:  # a checkpoint in the earlier format (save_pretrained's names) is refused, not loaded as nothing
        old = out / "checkpoints" / "checkpoint-3"
        (old / "trained_weights.safetensors").unlink()
        model.save_pretrained(old)
        for path in (out / "stage_complete.json", out / "checkpoints" / "checkpoint-6"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        with pytest.raises(ValueError, match="earlier medllava.*Remove the stage's checkpoints/ folder"):
            run_adapt(runs["resumed"], [name])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_shard_the_data(tmp_path):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:8]
    eight = tmp_path / "eight.jsonl"
    eight.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_config(tmp_path / "c.yaml", config(tmp_path / "run", instruct=stage(eight, max_steps=-1, epochs=1)))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), "-m", "medllava.cli"]
    out = subprocess.run([*launcher, "adapt", "--config", str(cfg), "--stage", "instruct"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 processes x 1 accumulation = 4" in out.stdout
    order = read_trace(tmp_path / "run" / "instruct" / "data_order.jsonl")
    assert len(order) == 2  # 8 examples, 4 per optimizer step over both ranks
    seen = []
    for shards in order.values():
        assert len(shards) == 2 and not set(shards[0]) & set(shards[1])
        seen += shards[0] + shards[1]
    assert sorted(seen) == sorted(r["id"] for r in rows)  # each example once: sharded, not repeated


@pytest.mark.parametrize("path", sorted((REPO / "finetune" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# medllava adapt --config finetune/configs/"), "a config starts with its command"
    cfg = load_config(AdaptConfig, path)
    if cfg.deepspeed:
        assert (REPO / cfg.deepspeed).is_file()


@pytest.mark.parametrize("path", sorted((REPO / "finetune" / "configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_deepspeed_config_parses(path):
    ds = json.loads(path.read_text())
    assert ds["zero_optimization"]["stage"] in (2, 3) and ds["train_micro_batch_size_per_gpu"] == "auto"


@pytest.mark.slow
def test_deepspeed_zero2_runs_on_cpu_and_resumes_from_its_own_checkpoint(tmp_path):
    pytest.importorskip("deepspeed")
    four = stage(max_steps=4, save_steps=2, learning_rate=1e-2, warmup_ratio=0.0)
    cfg = write_config(tmp_path / "c.yaml", config(tmp_path / "run", instruct=four,
                                                   deepspeed=str(REPO / "finetune/configs/zero2.json")))

    def run():
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr",
                    "127.0.0.1", "--master-port", str(free_port()), "-m", "medllava.cli"]
        out = subprocess.run([*launcher, "adapt", "--config", str(cfg), "--stage", "instruct"], cwd=REPO,
                             capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    run()
    out = tmp_path / "run" / "instruct"
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert (ckpt / "global_step2").is_dir()  # DeepSpeed's own layout: ZeRO really ran, and resumes from it
    assert not list(ckpt.glob("*.safetensors"))  # so no second copy of the weights is written beside it
    uninterrupted = weights(out / "model")
    for path in (out / "stage_complete.json", out / "model", out / "checkpoints" / "checkpoint-4"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert f"resuming from {ckpt}" in run()
    resumed = weights(out / "model")
    assert all(torch.equal(resumed[n], uninterrupted[n]) for n in resumed)


def test_qlora_without_a_gpu_says_what_it_needs(tmp_path, tiny_checkpoint):
    qlora = {"enabled": True, "quantize_4bit": True}
    cfg = from_dict(AdaptConfig, config(tmp_path / "run", model={"name_or_path": str(tiny_checkpoint)},
                                        instruct=stage(lora=qlora)))
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: QLoRA would run")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        run_adapt(cfg, ["instruct"])
    with pytest.raises(ValueError, match="needs lora.enabled"):
        run_adapt(from_dict(AdaptConfig, config(tmp_path / "run2", instruct=stage(lora={"quantize_4bit": True}))),
                  ["instruct"])


def test_flex_attention_without_a_gpu_is_refused_before_any_training(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: flex attention trains there")
    cfg = from_dict(AdaptConfig, config(tmp_path / "run", model={"name_or_path": "tiny",
                                                                "attn_implementation": "flex_attention"}))
    with pytest.raises(ValueError, match="flex_attention trains on a CUDA GPU only.*attn_implementation=sdpa"):
        run_adapt(cfg, ["align"])
    assert not (tmp_path / "run" / "align" / "checkpoints").exists()


def test_a_template_the_registry_does_not_know_is_refused_before_any_training(tmp_path):
    cfg = from_dict(AdaptConfig, config(tmp_path / "run", instruct=stage(data={"path": str(DATA), "template": "vicuna"})))
    with pytest.raises(ValueError, match="stage instruct: data.template: unknown template 'vicuna'; choose one of"):
        run_adapt(cfg, ["instruct"])
    assert not (tmp_path / "run" / "instruct" / "checkpoints").exists()


@pytest.mark.parametrize("named", ["tiny", "tiny-next"])
def test_qlora_quantises_the_language_model_and_nothing_of_the_vision_side(named):
    # transformers' own matcher, on every linear layer of the model: the skip list decides what goes to 4-bit.
    from transformers.quantizers.quantizers_utils import should_convert_module

    from medllava.families import model_family

    model, _ = build_model(ModelConfig(name_or_path=named))
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    converted = {name for name in linears if should_convert_module(name, list(model_family(model).nf4_skip))}
    language = {name for name in linears if name.startswith("model.language_model.")}
    assert language and converted == language, sorted(set(linears) - language)[:3]


def test_packed_sparse_and_plain_stages_log_the_same_first_loss(tmp_path):
    first = {}
    for name, options in {"plain": dict(packing=False, sparse_logits=False),
                          "packed": dict(packing=True, sparse_logits=True)}.items():
        cfg = from_dict(AdaptConfig, config(tmp_path / name, instruct=stage(max_steps=1, save_steps=1, **options)))
        run_adapt(cfg, ["instruct"])
        state = tmp_path / name / "instruct" / "checkpoints" / "checkpoint-1" / "trainer_state.json"
        first[name] = json.loads(state.read_text())["log_history"][0]["loss"]
    assert first["plain"] == pytest.approx(first["packed"], abs=1e-4)


@pytest.mark.slow
def test_compiled_decoder_layers_train_lora_to_the_same_losses(tmp_path):
    # Each decoder layer compiled on its own (dynamic shapes), under LoRA, packing and activation checkpointing.
    import torch._dynamo
    from torch._dynamo.utils import counters

    losses, graphs = {}, {}
    for name, compiled in (("eager", False), ("compiled", True)):
        torch._dynamo.reset()
        counters.clear()
        cfg = from_dict(AdaptConfig, config(tmp_path / name, instruct=stage(
            max_steps=2, save_steps=2, packing=True, gradient_checkpointing=True, compile_layers=compiled,
            lora={"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0, "merge": True})))
        run_adapt(cfg, ["instruct"])
        state = tmp_path / name / "instruct" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
        losses[name] = [row["loss"] for row in json.loads(state.read_text())["log_history"] if "loss" in row]
        graphs[name] = counters["stats"]["unique_graphs"]
        assert (tmp_path / name / "instruct" / "model" / "model.safetensors").is_file()
    assert graphs["eager"] == 0 and graphs["compiled"] >= 1  # the layers really ran compiled
    assert len(losses["eager"]) == 2 and losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3)
    with pytest.raises(ValueError, match="turn one of them off"):
        run_adapt(from_dict(AdaptConfig, config(tmp_path / "both", instruct=stage(compile_layers=True,
                                                                                 torch_compile=True))), ["instruct"])


def test_conversations_the_template_cannot_render_are_skipped_before_training(tmp_path):
    # LLaVA's stage-1 format takes one question and one caption; a several-round record under it is one
    # bad record of the set, counted and listed, not the end of the run. A set with no usable record at
    # all is a configuration mistake, named before any model time is spent.
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:5]
    for row in rows[:3]:
        row["conversations"] = row["conversations"][:2]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = stage(data, max_steps=-1, epochs=1, global_batch_size=4, per_device_batch_size=4)
    plain["data"]["template"] = "plain"
    record = run_adapt(from_dict(AdaptConfig, config(tmp_path / "run", align=plain)), ["align"])["align"]
    out = tmp_path / "run" / "align"
    assert record["data"]["unusable_for_template"] == 2 and record["examples"] == 3
    listed = [json.loads(line) for line in (out / "skipped_mixed.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in listed] == ["unusable conversation"] * 2
    assert all("takes one human and one gpt turn, got 8 turns" in r["detail"] for r in listed)
    assert f"record {rows[3]['id']}" in listed[0]["detail"] and "mixed.jsonl" in listed[0]["detail"]
    assert sorted(read_trace(out / "data_order.jsonl")[1]) == sorted(r["id"] for r in rows[:3])
    plain["data"]["path"] = str(DATA)
    with pytest.raises(ValueError, match=r"no usable examples(.|\n)*9 unusable with template plain"):
        run_adapt(from_dict(AdaptConfig, config(tmp_path / "all", align=plain)), ["align"])


def test_bad_records_and_images_are_skipped_counted_and_listed(tmp_path):
    import shutil

    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:4]
    images = tmp_path / "images"
    shutil.copytree(IMAGES, images)
    (images / "corrupt.jpg").write_bytes((IMAGES / rows[0]["image"]).read_bytes()[:200])  # truncated JPEG
    rows += [dict(rows[0], id="corrupt", image="corrupt.jpg"), dict(rows[1], id="absent", image="absent.jpg"),
             dict(rows[2], id="escape", image="../outside.jpg")]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    long = stage(data, max_steps=-1, epochs=1, global_batch_size=5, per_device_batch_size=5)
    long["data"]["image_root"] = str(images)
    record = run_adapt(from_dict(AdaptConfig, config(tmp_path / "run", instruct=long)), ["instruct"])["instruct"]
    out = tmp_path / "run" / "instruct"
    assert record["data"]["records_invalid"] == 2 and record["data"]["missing_images"] == 1
    listed = [json.loads(line) for line in (out / "skipped_d.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in listed) == ["invalid record", "invalid record", "missing image"]
    assert any("escapes the image root" in r["detail"] for r in listed) and any("d.jsonl:8" in r["detail"] for r in listed)
    assert record["skipped_in_batches"] == {"unreadable image": 1}
    [row] = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert row["reason"] == "unreadable image" and "corrupt.jpg" in row["detail"] and row["step"] == 1
    order = read_trace(out / "data_order.jsonl")
    assert sorted(order[1]) == sorted(r["id"] for r in rows[:4])  # trained on the good ones only
