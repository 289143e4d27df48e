"""The GPU benchmarks' CPU-checkable parts: the QLoRA stage refuses a machine it cannot run on, the
examples' text comes from the shipped real data by default, benchmarks/gpu_all.sh's commands parse, the 7B
shapes build, and both benchmarks run LLaVA-NeXT (tiny-next, and a checkpoint folder of it) with the image
tokens of its family and every path, the per-tile vision feature cache included."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from medllava.finetune.config import AdaptConfig
from medllava.config import load_config

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_train():
    return _load("bench_train")


@pytest.fixture(scope="module")
def real_text(bench_train):
    from benchmarks import real_text  # importable once a benchmark script has put the repository on the path

    return real_text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_qlora_stops_with_one_line_naming_what_it_needs(bench_train, capsys, monkeypatch):
    def must_not_load(args):
        raise AssertionError("a model was built on a machine that cannot run QLoRA")

    monkeypatch.setattr(bench_train, "load_model", must_not_load)
    assert bench_train.main(["--stage", "instruct-qlora", "--model", "tiny", "--steps", "3"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1
    assert lines[0].startswith("bench_train: instruct-qlora") and "a CUDA GPU" in lines[0]
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "bitsandbytes" in lines[0]


def test_stage1_text_is_every_shipped_real_caption(real_text):
    source = real_text.source_for("align", None)
    ids = [r["id"] for r in source.records]
    # 4 figures of the shipped PMC article (JATS), 10 LLaVA-Med captions; the article's figures are in both files.
    assert len(ids) == len(set(ids)) == 14
    assert sum(i.startswith("PMC3460867_") for i in ids) == 4
    assert source.description.startswith("14 real PMC figure captions (4 from the JATS articles")
    captions = {r["conversations"][1]["value"] for r in source.records}
    drawn = source.draw(40, seed=1)
    assert {r["conversations"][1]["value"] for r in drawn} <= captions
    assert all(r["conversations"][0]["value"] == "<image>" for r in drawn)


def test_stage2_examples_are_built_from_real_rounds(real_text):
    source = real_text.source_for("instruct", None)
    assert "teacher_conversations.jsonl" in source.description and len(source.records) == 2
    real_rounds = {(a["value"].replace("<image>", "").strip(), b["value"])
                   for rec in source.records for a, b in zip(rec["conversations"][::2], rec["conversations"][1::2])}
    counts = {len(rec["conversations"]) // 2 for rec in source.records}
    for rec in source.draw(30, seed=2):
        turns = rec["conversations"]
        assert len(turns) // 2 in counts and [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n") and sum(t["value"].count("<image>") for t in turns) == 1
        assert {(a["value"].replace("<image>", "").strip(), b["value"]) for a, b in zip(turns[::2], turns[1::2])} \
            <= real_rounds


def test_lengths_from_a_file_draws_its_records_whole(real_text):
    path = REPO / "medllava" / "assets" / "demo" / "conversations.jsonl"
    source = real_text.source_for("align", path)
    assert source.description.startswith(f"9 records of {path}")
    assert all(len(r["conversations"]) == 2 for r in source.draw(20))  # stage 1: each record's first round


@pytest.mark.slow
def test_tiny_model_trains_on_the_real_conversations_by_default(bench_train, tmp_path, capsys, one_thread):
    from medllava.model import ModelConfig, build_model
    from medllava.families import fixed_image_token_count
    from medllava.templates import encode_conversation

    out = tmp_path / "lora.json"
    argv = ["--stage", "instruct-lora", "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--steps", "3",
            "--batch", "2", "--paths", "baseline,sparse", "--json", str(out)]
    assert bench_train.main(argv) == 0
    table = json.loads(out.read_text())
    printed = capsys.readouterr().out
    text = table["text"]
    assert "teacher_conversations.jsonl" in printed and "min/median/max" in printed
    # The real conversations, encoded whole by the template code with the tiny tokenizer, give the lengths reported.
    _, processor = build_model(ModelConfig(name_or_path="tiny"))
    n_img = fixed_image_token_count(processor)
    real = sorted(len(encode_conversation(r["conversations"], processor, "vicuna_v1", n_img)["input_ids"]) - n_img
                  for r in bench_train.source_for("instruct", None).records)
    whole = text["text_tokens_of_real_records"]
    assert (whole["min"], whole["max"], whole["n"]) == (real[0], real[-1], 2)
    assert text["image_tokens"] == n_img and text["text_tokens_per_example"]["n"] == 2 * (3 + 2)
    assert table["lora"]["r"] == 128 and table["lora"]["config"] == "llava_med_lora.yaml"
    assert set(table["paths"]) == {"baseline", "sparse"} and table["paths"]["baseline"]["samples/s"] > 0
    assert "sparse" in table["vs_baseline"]


def test_gpu_all_dry_run_commands_parse(bench_train, tmp_path):
    bench_eval = _load("bench_eval")
    out = tmp_path / "figures"
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_all.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, check=True, timeout=30)
    steps = {}
    for line in done.stdout.splitlines():
        name, _, command = line.partition(": ")
        words = shlex.split(command)
        if words[:1] != ["timeout"] or name.startswith("install-"):  # wheels carried in .wheels/, if any
            continue
        assert int(words[1]) <= 600  # no step may outlast one 10-minute command
        script = words[4] if words[3] == "-m" else Path(words[3]).name
        steps[name] = (script, words[5:] if words[3] == "-m" else words[4:])
    assert list(steps) == ["align", "lora", "write-random-7b", "qlora", "eval", "data", "memory", "adapt"]
    script, argv = steps["adapt"]
    assert script == "medllava.cli" and argv[:3] == ["adapt", "--config", "finetune/configs/llava_med_lora.yaml"]
    adapt = load_config(AdaptConfig, REPO / argv[2], argv[3:])  # the shipped config, as the step overrides it
    assert adapt.model.name_or_path == "runs/bench-7b-random" and adapt.report_to == ["none"]
    for stage in (adapt.align, adapt.instruct):
        assert (REPO / stage.data.path).is_file() and stage.compile_layers and stage.gradient_checkpointing == "auto"
    data_args = _load("bench_data").parse_args(steps["data"][1])
    assert data_args.workers == [0, 2, 4, 8] and data_args.json == out / "data.json"
    memory_args = _load("bench_lora_memory").parse_args(steps["memory"][1])
    assert memory_args.device == "cuda" and memory_args.json == out / "memory.json"
    expected_stages = {"align": "align", "lora": "instruct-lora", "qlora": "instruct-qlora"}
    for name, stage in expected_stages.items():
        script, argv = steps[name]
        parser = bench_train.build_parser()
        args = parser.parse_args(argv)
        assert script == "bench_train.py" and args.stage == stage and args.device == "cuda"
        paths = bench_train.stage_paths(args, parser)
        assert paths[0] == "baseline" and args.attn == "sdpa"
        assert args.json == out / f"{name}.json"
        # The baseline fits its batch the plain way (checkpointing); medllava's paths accumulate micro-batches.
        assert args.baseline_checkpointing or args.gradient_checkpointing
        assert args.batch % (args.micro_batch or args.batch) == 0
    assert "packed-flex" in steps["lora"][1][steps["lora"][1].index("--paths") + 1]
    eval_args = bench_eval.build_parser().parse_args(steps["eval"][1])
    assert eval_args.questions == 451 and eval_args.json == out / "eval.json"
    assert bench_eval.build_parser().parse_args(steps["write-random-7b"][1]).write_random_7b is not None
    assert not out.exists()  # a dry run writes nothing
    refused = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_all.sh"), "--dry-run", "all"],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "unknown argument 'all'" in refused.stderr


@pytest.mark.slow
def test_a_path_out_of_gpu_memory_is_reported_and_the_others_still_run(bench_train, tmp_path, capsys, monkeypatch):
    tried = []

    def fake_measure(options, args, source, describe_text=False, attn="sdpa", micro=None, checkpointing=False,
                     plain=False):
        tried.append((options["pack"], options["sparse_logits"], micro))
        if options["pack"]:
            raise torch.OutOfMemoryError("CUDA out of memory")
        if not options["sparse_logits"] and not (checkpointing and plain):
            raise AssertionError("the baseline was asked for without its checkpointing or as medllava's path")
        row = {"samples/s": 4.0 if options["sparse_logits"] else 2.0, "tokens/s": 1.0, "TFLOP/s": 1.0,
               "pad %": 0.0, "peak GiB": None, "micro-batch": micro, "checkpointing": checkpointing}
        return row, ({"source": "s", "template": "t", "tokenizer": "k", "image_tokens": 1, "examples_too_long": 0,
                      "family": "llava", "image_size": [16, 16],
                      "text_tokens_per_example": {"min": 1, "median": 2, "max": 3, "n": 3},
                      "text_tokens_of_real_records": {"min": 1, "median": 2, "max": 3, "n": 3}}
                     if describe_text else None)

    monkeypatch.setattr(bench_train, "measure", fake_measure)
    out = tmp_path / "full.json"
    argv = ["--stage", "instruct-full", "--steps", "3", "--batch", "4", "--micro-batch", "2", "--paths",
            "baseline,packed,sparse,sparse@4", "--baseline-checkpointing", "--json", str(out)]
    assert bench_train.main(argv) == 0
    table = json.loads(out.read_text())
    # The packed path is retried at half its micro-batch until one example per pass also runs out.
    assert tried == [(False, False, 4), (True, True, 2), (True, True, 1), (False, True, 2), (False, True, 4)]
    assert table["paths"]["sparse@4"]["micro-batch"] == 4
    assert table["paths"]["packed"] == {"error": "out of GPU memory at 1 examples per forward pass"}
    assert table["paths"]["sparse"]["micro-batch"] == 2 and table["paths"]["baseline"]["checkpointing"]
    assert table["vs_baseline"] == {"sparse": 2.0, "sparse@4": 2.0}
    printed = capsys.readouterr()
    assert "packed        out of GPU memory at 1 examples per forward pass" in printed.out
    assert "trying 1" in printed.err


@pytest.mark.slow
def test_a_path_that_fails_otherwise_is_reported_and_the_others_still_run(bench_train, tmp_path, capsys,
                                                                          monkeypatch):
    real_measure = bench_train.measure

    def measure(options, args, source, **kw):
        if kw["attn"] == "flex_attention":
            raise RuntimeError("no flex kernel here\nsecond line")
        return real_measure(options, args, source, **kw)

    monkeypatch.setattr(bench_train, "measure", measure)
    monkeypatch.setitem(bench_train.PATHS, "sparse", dict(pack=False, sparse_logits=True, attn="flex_attention"))
    out = tmp_path / "align.json"
    argv = ["--stage", "align", "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--steps", "3",
            "--batch", "2", "--paths", "baseline,sparse,grouped", "--json", str(out)]
    assert bench_train.main(argv) == 0
    table = json.loads(out.read_text())
    assert table["paths"]["sparse"] == {"error": "failed: RuntimeError: no flex kernel here"}
    assert table["paths"]["grouped"]["samples/s"] > 0 and "grouped" in table["vs_baseline"]
    assert "RuntimeError: no flex kernel here" in capsys.readouterr().err


@pytest.mark.parametrize("shape,params", [("llava-7b", 7.06e9), ("llava-next-7b", 7.57e9)])
def test_the_7b_shape_expects_the_image_token_its_processor_writes(bench_train, shape, params):
    # Built on the meta device: the shape and its ids, no 7B of memory.
    import argparse

    model, processor, _ = bench_train.load_model(
        argparse.Namespace(stage="align", model=shape, device="meta", dtype="float32"))
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)
    assert bench_train.model_family_of(shape).model_type == model.config.model_type


def test_the_llava_next_7b_shape_is_llava_v1_6_mistral_at_672_px(bench_train):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from benchmarks.shapes import random_7b_processor, shape_config
    from medllava.families import max_image_tokens

    config, defaults = shape_config("llava-next-7b"), LlavaNextConfig()
    for key in ("image_grid_pinpoints", "vision_feature_layer", "vision_feature_select_strategy", "image_seq_length"):
        assert getattr(config, key) == getattr(defaults, key), key
    assert config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    text, vision = config.text_config, config.vision_config
    assert (text.model_type, text.num_key_value_heads, text.intermediate_size, text.vocab_size) == \
        ("mistral", 8, 14336, 32064)
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (336, 14, 1024, 24)
    assert bench_train.model_class(config) is LlavaNextForConditionalGeneration
    processor = random_7b_processor("llava-next-7b")
    # The 2x2 grid of 24x24 features with a newline per row, plus the 576 of the downsampled view.
    assert max_image_tokens(processor) == 48 * 49 + 576 == 2928
    assert bench_train.largest_grid_size(processor) == (672, 672)


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory):
    """tiny-next saved as a llava_next checkpoint folder."""
    from medllava.model import ModelConfig, build_model, save_model

    model, processor = build_model(ModelConfig(name_or_path="tiny-next"))
    return save_model(model, processor, tmp_path_factory.mktemp("ckpt") / "tiny-next")


def test_the_feature_cache_path_runs_for_llava_next_and_the_image_size_parses(bench_train, next_checkpoint):
    parser = bench_train.build_parser()
    for model in ("tiny-next", str(next_checkpoint)):  # the cache keeps a grid family's features per tile
        assert "cached" in bench_train.stage_paths(parser.parse_args(["--model", model]), parser)
        asked = parser.parse_args(["--model", model, "--paths", "baseline,cached"])
        assert bench_train.stage_paths(asked, parser) == ["baseline", "cached"]
        assert bench_train.family_refusals(model) == {}
    assert "cached" in bench_train.stage_paths(parser.parse_args(["--model", "tiny"]), parser)
    assert parser.parse_args(["--image-size", "672x336"]).image_size == (672, 336)
    with pytest.raises(SystemExit):
        parser.parse_args(["--image-size", "672"])


@pytest.mark.slow
def test_tiny_next_trains_every_path_it_can_with_its_image_tokens(bench_train, tmp_path, capsys, one_thread):
    from medllava.families import FAMILIES, max_image_tokens
    from medllava.model import ModelConfig, build_model

    out = tmp_path / "align.json"
    argv = ["--stage", "align", "--model", "tiny-next", "--device", "cpu", "--dtype", "float32", "--steps", "3",
            "--batch", "2", "--json", str(out)]
    assert bench_train.main(argv) == 0
    table, printed = json.loads(out.read_text()), capsys.readouterr().out
    _, processor = build_model(ModelConfig(name_or_path="tiny-next"))
    # Every example's image fills the largest grid: the most tokens one image takes, as the processor counts.
    assert table["text"]["image_tokens"] == max_image_tokens(processor) == 88
    assert table["text"]["family"] == "llava_next" and table["text"]["image_size"] == [32, 32]
    assert "+ 88 image tokens per example (llava_next: 32x32 images)" in printed
    assert set(table["paths"]) == {"baseline", "sparse", "packed", "grouped", "cached"}
    assert all(row["samples/s"] > 0 for row in table["paths"].values())
    assert set(table["vs_baseline"]) == {"sparse", "packed", "grouped", "cached"}
    assert "packed / baseline samples/s" in printed
    assert not table.get("left_out") and not FAMILIES["llava_next"].feature_cache


@pytest.mark.slow
def test_eval_benchmark_runs_a_llava_next_folder_against_one_at_a_time(next_checkpoint, tmp_path, capsys, one_thread):
    bench_eval = _load("bench_eval")
    out = tmp_path / "eval.json"
    bench_eval.main(["--model", str(next_checkpoint), "--questions", "8", "--batch-size", "4", "--max-new-tokens",
                     "4", "--json", str(out)])
    result, printed = json.loads(out.read_text()), capsys.readouterr().out
    tokens = result["image_tokens_per_question"]
    # The demo images are of several shapes, so their questions take different numbers of image tokens.
    assert result["family"] == "llava_next" and tokens["n"] == 8 and 36 <= tokens["min"] < tokens["max"] <= 88
    assert f"image tokens per question min/median/max {tokens['min']}/{tokens['median']:g}/{tokens['max']}" in printed
    assert result["answers_identical"] == 8 and "answers identical on 8/8" in printed
    assert result["batched_qps"] > 0 and f"speed-up {result['speedup']:.2f}x" in printed


def test_the_input_benchmark_loads_every_example_and_derives_gpu_idle_from_its_rates(tmp_path, capsys):
    from medllava.finetune.config import AdaptConfig, StageConfig
    from medllava.config import load_config

    bench_data = _load("bench_data")
    assert bench_data.default_gpu_rate() == pytest.approx(16.41, abs=0.01)  # the H100 stage-1 packed-flex figure
    # The docstring's "medllava's stage configs use 4 workers": the 7B configs leave the default alone.
    assert StageConfig().dataloader_workers == 4
    for name in ("llava_med", "llava_med_lora", "llava_med_qlora"):
        config = load_config(AdaptConfig, REPO / "finetune" / "configs" / f"{name}.yaml")
        assert {s.dataloader_workers for s in (config.align, config.instruct)} == {4}, name
    out = tmp_path / "data.json"
    assert bench_data.main(["--examples", "10", "--batch", "4", "--workers", "0,1", "--gpu-rate", "20",
                            "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "10 examples over 9 images" in printed and "| workers | samples/s |" in printed
    result = json.loads(out.read_text())
    plain, one = result["rows"]
    assert (plain["workers"], plain["samples"], one["workers"], one["samples"]) == (0, 10, 1, 10)
    decode, step = 1 / plain["samples_per_s"], 1 / 20
    assert plain["gpu_idle"] == pytest.approx(decode / (decode + step))
    assert one["gpu_idle"] == max(0.0, 1 - one["samples_per_s"] / 20) and plain["ratio"] == 1.0


def test_a_path_can_be_named_at_its_own_micro_batch(bench_train, capsys):
    parser = bench_train.build_parser()
    args = parser.parse_args(["--batch", "8", "--micro-batch", "2", "--paths", "baseline,sparse,sparse@8"])
    assert bench_train.stage_paths(args, parser) == ["baseline", "sparse", "sparse@8"]
    for bad, says in (("sparse@3", "must divide --batch 8"), ("sparse@0", "must divide"), ("sparse@x", "must divide"),
                      ("nothing@2", "stage align has"), ("sparse,sparse", "named twice")):
        with pytest.raises(SystemExit):
            bench_train.stage_paths(parser.parse_args(["--batch", "8", "--paths", bad]), parser)
        assert says in capsys.readouterr().err, bad
