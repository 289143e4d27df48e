"""`medllava finetune` on the tiny model: a head trains on real VQA-RAD rows, saves a small folder,
reloads onto the untouched base and changes its answers; two heads on one base keep their own
outputs; a full head is a checkpoint; a validation split keeps the best checkpoint; shipped configs load."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medllava.eval.tasks import load_task
from medllava.finetune import head_training as heads
from medllava.finetune.head_training import FinetuneConfig, head_dir, run_finetune
from medllava.finetune.splits import make_split
from medllava.commands.chat import answer_batch
from medllava.tiny import demo_data
from medllava.config import ConfigError, from_dict, load_config
from medllava.heads import load_with_heads, read_head_info, use_head
from medllava.images import load_image
from medllava.model import ModelConfig, build_model
from medllava.question_styles import format_question

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets" / "finetune"
IMAGES = demo_data()[1]


@pytest.fixture(scope="module")
def vqa_root(tmp_path_factory) -> Path:
    """A VQA-RAD folder in the MEVF layout: 26 real training rows and their images."""
    root = tmp_path_factory.mktemp("vqa_rad")
    shutil.copy(ASSETS / "vqa_rad_trainset.json", root / "trainset.json")
    shutil.copytree(IMAGES, root / "images")
    return root


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config(run_dir, base, root, **extra) -> FinetuneConfig:
    data = {
        "run_dir": str(run_dir), "base": {"name_or_path": str(base)}, "task": {"name": "vqa-rad", "root": str(root)},
        "bf16": False, "report_to": ["none"], "seed": 0,
        "train": {"learning_rate": 1e-2, "max_steps": 8, "global_batch_size": 4, "per_device_batch_size": 4,
                  "warmup_ratio": 0.0, "lr_scheduler": "constant", "save_steps": 100, "logging_steps": 1,
                  "dataloader_workers": 0, "gradient_checkpointing": False,
                  "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}},
    }
    return from_dict(FinetuneConfig, merge(data, extra))


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_checkpoint, vqa_root):
    """One LoRA head trained on the VQA-RAD rows, with the base's file hashes before and after."""
    before = file_hashes(tiny_checkpoint)
    cfg = config(tmp_path_factory.mktemp("runs") / "vqa_a", tiny_checkpoint, vqa_root)
    record = run_finetune(cfg)
    return cfg, record, before, file_hashes(tiny_checkpoint)


def ask(model, processor, root: Path, n: int = 6) -> list[str]:
    """Greedy answers to the first `n` training questions, asked as the head was taught."""
    task = load_task("vqa-rad", root, "train")
    examples = task.examples[:n]
    questions = [format_question(ex.question, "llava-med", ex.answer_type) for ex in examples]
    return answer_batch(model, processor, [load_image(task.image_path(ex)) for ex in examples], questions,
                        "vicuna_v1", 4)


def test_a_head_is_a_small_folder_and_the_base_is_untouched(trained, tiny_checkpoint):
    cfg, record, before, after = trained
    assert before == after  # every file of the base checkpoint, byte for byte
    head = Path(record["head"])
    assert head == head_dir(cfg) and head.name == "vqa_a-head"
    assert {p.name for p in head.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "head.json"}
    assert size(head) < size(tiny_checkpoint) / 4
    adapter = load_file(str(head / "adapter_model.safetensors"))
    assert any("lora_A" in n for n in adapter) and any("multi_modal_projector" in n for n in adapter)
    assert not any("vision_tower" in n for n in adapter)
    info = read_head_info(head)
    assert (info.task, info.template, info.prompt_style, info.closed_options) == ("vqa-rad", "vicuna_v1", "llava-med",
                                                                                   ["yes", "no"])
    assert info.base == str(tiny_checkpoint) and info.metrics["steps"] == 8 == record["steps"]


def test_the_head_reloads_and_changes_the_answers(trained, tiny_checkpoint, vqa_root):
    _, record, _, _ = trained
    model, processor, infos = load_with_heads(ModelConfig(name_or_path=str(tiny_checkpoint)), [record["head"]])
    assert list(infos) == ["vqa_a-head"]
    with_head = ask(model, processor, vqa_root)
    with model.disable_adapter():
        plain = ask(model, processor, vqa_root)
    base, base_processor = build_model(ModelConfig(name_or_path=str(tiny_checkpoint)))
    assert plain == ask(base, base_processor, vqa_root)
    assert with_head != plain


def test_training_conversations_ask_as_evaluation_does(trained, vqa_root):
    cfg, _, _, _ = trained
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "data" / "train.jsonl").read_text().splitlines()]
    task = load_task("vqa-rad", vqa_root, "train")
    assert [r["id"] for r in rows] == [ex.qid for ex in task]
    for row, ex in zip(rows, task):
        human, gpt = row["conversations"]
        assert human["value"] == "<image>\n" + format_question(ex.question, "llava-med", ex.answer_type)
        # Closed yes/no answers are spelled as the prompt's options; the rest as the dataset has them.
        expected = ex.answer.strip().lower() if ex.answer.strip().lower() in ("yes", "no") and ex.answer_type == "closed" \
            else ex.answer
        assert gpt["value"] == expected and (vqa_root / "images" / row["image"]).is_file()
    assert any(r["conversations"][0]["value"].endswith("[yes, no]") for r in rows)
    assert any("Please choose" not in r["conversations"][0]["value"] for r in rows)  # open questions


def test_two_heads_on_one_base_keep_their_own_outputs(trained, tiny_checkpoint, vqa_root, tmp_path):
    _, record, _, _ = trained
    other = run_finetune(config(tmp_path / "vqa_b", tiny_checkpoint, vqa_root, seed=1,
                                train={"learning_rate": 5e-3, "max_steps": 4}))
    alone = {}
    for folder in (record["head"], other["head"]):
        model, processor, _ = load_with_heads(ModelConfig(name_or_path=str(tiny_checkpoint)), [folder])
        alone[Path(folder).name] = logits(model, processor, vqa_root)
    model, processor, infos = load_with_heads(ModelConfig(name_or_path=str(tiny_checkpoint)),
                                              [record["head"], other["head"]])
    assert list(infos) == ["vqa_a-head", "vqa_b-head"]
    for name in infos:
        use_head(model, name)
        assert torch.allclose(logits(model, processor, vqa_root), alone[name], atol=1e-5)
    assert not torch.allclose(alone["vqa_a-head"], alone["vqa_b-head"], atol=1e-3)


def logits(model, processor, root: Path) -> torch.Tensor:
    from medllava.templates import prompt_text

    text = prompt_text("Is the heart enlarged?", "vicuna_v1", processor)
    batch = processor(images=[load_image(root / "images" / "synpic100132.jpg")], text=[text], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits[0, -1]


def test_a_full_head_from_the_command_line_is_a_checkpoint_with_head_json(tiny_checkpoint, vqa_root, tmp_path,
                                                                          capsys):
    from medllava.commands.chat import read_full_head_info

    before = file_hashes(tiny_checkpoint)
    parser = argparse.ArgumentParser()
    heads.register(parser.add_subparsers())
    # The shipped VQA-RAD config, made CPU-sized by overrides.
    args = parser.parse_args([
        "finetune", "--task", "vqa-rad", "--base", str(tiny_checkpoint), "--root", str(vqa_root),
        f"run_dir={tmp_path / 'full'}", "head.full=true", "base.dtype=float32", "bf16=false", "report_to=[none]",
        "train.max_steps=2", "train.learning_rate=1e-3", "train.global_batch_size=4", "train.per_device_batch_size=4",
        "train.gradient_checkpointing=false", "train.dataloader_workers=0",
    ])
    assert heads.main(args) == 0
    head = tmp_path / "full" / "full-head"
    assert f"head saved to {head}" in capsys.readouterr().out
    assert (head / "model.safetensors").is_file() and not (head / "adapter_config.json").exists()
    assert read_full_head_info(head).prompt_style == "llava-med"
    trained_model, _ = build_model(ModelConfig(name_or_path=str(head)))
    base, _ = build_model(ModelConfig(name_or_path=str(tiny_checkpoint)))
    tuned, start = trained_model.state_dict(), base.state_dict()
    assert any(not torch.equal(tuned[n], start[n]) for n in start if "language_model" in n)
    assert all(torch.equal(tuned[n], start[n]) for n in start if "vision_tower" in n)
    assert file_hashes(tiny_checkpoint) == before


def test_a_validation_split_keeps_the_best_checkpoint(tiny_checkpoint, tmp_path):
    rows = [{"image": str(p), "question": f"Is case {i} normal?", "answer": "yes" if i % 2 else "no",
             "patient_id": f"P{i // 2}"} for i, p in enumerate(sorted(IMAGES.iterdir()) * 4)]
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_split(tmp_path / "cases.jsonl", tmp_path / "cases", val=0.25, test=0.1, seed=0)
    cfg = config(tmp_path / "inhouse", tiny_checkpoint, tmp_path / "cases",
                 task={"name": "inhouse", "val_split": "validation"},
                 train={"max_steps": 6, "save_steps": 2, "learning_rate": 3e-2})
    record = run_finetune(cfg)
    val = record["validation"]
    losses = dict(val["eval_losses"])
    assert sorted(losses) == [2, 4, 6] and val["best_eval_loss"] == min(losses.values())
    best = Path(val["best_checkpoint"])
    assert best.name == f"checkpoint-{min(losses, key=losses.get)}"
    saved = load_file(str(Path(record["head"]) / "adapter_model.safetensors"))
    kept = load_file(str(best / "adapter_model.safetensors"))
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)
    assert read_head_info(record["head"]).metrics["val_loss"] == min(losses.values())


def test_a_full_head_with_a_validation_split_ends_with_its_best_checkpoints_weights(tiny_checkpoint, tmp_path):
    # A full head's checkpoints keep its trained weights under the model's own names; the best by
    # validation loss is loaded at the end. Too high a learning rate makes the last checkpoint not the best.
    rows = [{"image": str(p), "question": f"Is case {i} normal?", "answer": "yes" if i % 2 else "no",
             "patient_id": f"P{i // 2}"} for i, p in enumerate(sorted(IMAGES.iterdir()) * 4)]
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_split(tmp_path / "cases.jsonl", tmp_path / "cases", val=0.25, test=0.1, seed=0)
    cfg = config(tmp_path / "inhouse", tiny_checkpoint, tmp_path / "cases", head={"full": True},
                 task={"name": "inhouse", "val_split": "validation"},
                 train={"max_steps": 6, "save_steps": 2, "learning_rate": 0.5, "lora": {"enabled": False}})
    record = run_finetune(cfg)
    losses = dict(record["validation"]["eval_losses"])
    best = Path(record["validation"]["best_checkpoint"])
    assert best.name == f"checkpoint-{min(losses, key=losses.get)}" != "checkpoint-6"
    kept = load_file(str(best / "trained_weights.safetensors"))
    last = load_file(str(best.parent / "checkpoint-6" / "trained_weights.safetensors"))
    model, _ = build_model(ModelConfig(name_or_path=record["head"]))
    saved = model.state_dict()
    assert kept and all(torch.equal(saved[k], kept[k]) for k in kept)
    assert not all(torch.equal(saved[k], last[k]) for k in last)


def test_a_rerun_resumes_and_another_config_in_the_same_folder_is_refused(trained, tiny_checkpoint, vqa_root):
    cfg, record, _, _ = trained
    adapter = Path(cfg.run_dir) / "train" / "adapter" / "adapter_model.safetensors"
    mtime = adapter.stat().st_mtime_ns
    assert run_finetune(cfg)["steps"] == record["steps"]
    assert adapter.stat().st_mtime_ns == mtime  # finished: nothing is retrained
    assert read_head_info(record["head"]).task == "vqa-rad"
    changed = config(cfg.run_dir, tiny_checkpoint, vqa_root, train={"learning_rate": 1e-4})
    with pytest.raises(ConfigError, match=r"different config \(train.learning_rate\)"):
        run_finetune(changed)


@pytest.mark.parametrize("path", sorted((REPO / "finetune" / "configs" / "heads").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_finetune_config_loads(path):
    from medllava.eval.tasks import TASKS

    assert path.read_text().splitlines()[0].startswith(f"# medllava finetune --task finetune/configs/heads/{path.name}")
    cfg = load_config(FinetuneConfig, path)
    assert cfg.task.name in TASKS and cfg.train.lora.enabled and not cfg.head.full
    assert cfg.head.prompt_style == "llava-med" and cfg.head.closed_options == ["yes", "no"]
    assert cfg.train.epochs == 3 and cfg.train.global_batch_size == 128
    assert heads.task_config_path(cfg.task.name) == path or path.name == "inhouse_example.yaml"


def test_the_command_line_checks_its_arguments(tmp_path):
    parser = argparse.ArgumentParser()
    heads.register(parser.add_subparsers())
    with pytest.raises(ValueError, match="--task is required"):
        heads.main(parser.parse_args(["finetune", "train.epochs=1"]))
    with pytest.raises(ValueError, match="options go before"):
        heads.main(parser.parse_args(["finetune", "--task", "vqa-rad", "train.epochs=1", "--base", "x"]))
    with pytest.raises(FileNotFoundError, match="neither a task"):
        heads.main(parser.parse_args(["finetune", "--task", "mimic"]))
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        heads.main(parser.parse_args(["finetune", "--task", "vqa-rad", "train.epoch=1"]))
    with pytest.raises(FileNotFoundError, match="no mevf/official/parquet release"):
        heads.main(parser.parse_args(["finetune", "--task", "vqa-rad", "--root", str(tmp_path / "nowhere"),
                                      f"run_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()  # a wrong dataset path leaves no run folder behind


@pytest.mark.slow
def test_the_learning_experiment_runs_end_to_end(vqa_root, tmp_path, monkeypatch, capsys):
    import runpy
    import sys

    data = tmp_path / "vqa_rad"
    shutil.copytree(vqa_root, data)
    shutil.copy(data / "trainset.json", data / "testset.json")  # the same 26 questions as a test set
    out = tmp_path / "out"
    argv = ["vqa_rad_learning.py", "--data", str(data), "--out", str(out), "--model", "tiny", "--max-steps", "2",
            "--batch", "8", "--micro-batch", "8", "--thumb", "32"]
    monkeypatch.setattr(sys, "argv", argv)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(REPO / "scripts" / "vqa_rad_learning.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)  # the script pins threads for the whole process
    assert exit_.value.code == 0
    results = json.loads((out / "results.json").read_text())
    closed = sum(r["answer_type"].strip() == "CLOSED" for r in json.loads((data / "testset.json").read_text()))
    assert results["n_test"] == 26 and results["n_test_closed"] == closed
    assert set(results["runs"]) == {"images", "blank"} and "images_vs_blank" in results
    for run in results["runs"].values():
        assert 0 <= run["strict"]["closed_accuracy"]["value"] <= 1 and len(run["vs_majority"]["ci95"]) == 2
    assert set(results["references"]) == {"question words", "question words + image id"}
    assert results["n_train"] + results["n_validation"] == 26  # validation: held-out training images
    assert "majority answer (" in capsys.readouterr().out


def test_series_folders_and_inline_images_become_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from medllava.finetune.task_data import task_records

    series = tmp_path / "scans" / "case1"
    series.mkdir(parents=True)
    for number in (3, 1, 2):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.InstanceNumber, ds.SOPInstanceUID = number, generate_uid()
        ds.save_as(series / f"slice_{4 - number}.dcm")  # file names in the opposite order
    (tmp_path / "cases.csv").write_text(f"image,question,answer,patient_id\n{series},Is it normal?,yes,P1\n"
                                        f"{IMAGES / 'synpic100132.jpg'},What plane?,PA,P2\n")
    made = task_records(load_task("inhouse", tmp_path, "cases"), "llava-med", ["yes", "no"], tmp_path / "bytes")
    assert made.image_root.is_dir()
    first = made.image_root / made.records[0]["image"]
    assert first.parent == series and pydicom.dcmread(first).InstanceNumber == 2  # the middle slice
    assert (made.image_root / made.records[1]["image"]).samefile(IMAGES / "synpic100132.jpg")

    jpeg = (IMAGES / "synpic20208.jpg").read_bytes()
    table = pa.table({"image": [{"bytes": jpeg, "path": "a.jpg"}, {"bytes": jpeg, "path": "b.jpg"}],
                      "question": ["Is this a CT?", "Is it axial?"], "answer": ["no", "yes"]})
    (tmp_path / "hf" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "hf" / "data" / "train-00000-of-00001.parquet")
    made = task_records(load_task("vqa-rad", tmp_path / "hf", "train", source="parquet"), "llava-med", ["yes", "no"],
                        tmp_path / "bytes")
    files = {made.image_root / r["image"] for r in made.records}
    assert len(files) == 1 and next(iter(files)).read_bytes() == jpeg  # one file per distinct image
    assert made.records[0]["conversations"][0]["value"].endswith("[yes, no]")


def test_closed_answers_are_spelled_as_the_options():
    from medllava.eval.tasks import CLOSED, OPEN
    from medllava.finetune.task_data import reply

    options = ["yes", "no"]
    assert [reply(a, CLOSED, options) for a in ("Yes", "YES ", "no", "No")] == ["yes", "yes", "no", "no"]
    assert reply("Left", CLOSED, options) == "Left"  # not an option: kept as it is
    assert reply("Yes", OPEN, options) == "Yes"  # open answers are never rewritten


def test_every_benchmark_task_has_a_shipped_head_config_found_by_its_task_name():
    from medllava.eval.tasks import TASKS

    configs = heads.shipped_task_configs()
    assert set(configs) == set(TASKS)
    for name, path in configs.items():
        assert heads.task_config_path(name) == path
        assert load_config(FinetuneConfig, path).task.name == name
