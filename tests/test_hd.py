"""LLaVA-1.5-HD (medllava.hd): `model.grid_pinpoints` turns the tiny llava model, named or saved, into a llava_next
one that carries every source weight under its name and adds a seeded image_newline; a base-sized image keeps the
source's features; `adapt` trains the converted model's connector, saves a llava_next folder and continues from
it without converting again; bad grids are refused in one line; the token cost the docs state is the
processor's."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_adapt import config

from medllava.cli import main as cli
from medllava.config import ConfigError, from_dict
from medllava.families import FAMILIES, image_inputs, max_image_tokens
from medllava.finetune.adapt import run_adapt
from medllava.finetune.config import AdaptConfig
from medllava.hd import IMAGE_SETTINGS, SHARED_CONFIG_FIELDS, hd_processor, init_image_newline
from medllava.model import ModelConfig, build_model, family_of, grid_to_add, module_of

NEXT = FAMILIES["llava_next"]
# tiny's 16-px tiles in the shape of the 336-px grid [[336, 672], [672, 336], [672, 672]].
GRID = [[16, 32], [32, 16], [32, 32]]
DOC_GRID = [[336, 672], [672, 336], [672, 672]]
TRAINING_DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def changed_modules(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {module_of(n, NEXT.modules) for n in before if not torch.equal(before[n], after[n])}


@pytest.mark.parametrize("source", ["tiny", "checkpoint"])
def test_the_converted_model_carries_every_weight_and_setting_of_the_source(source, tiny_checkpoint):
    name = "tiny" if source == "tiny" else str(tiny_checkpoint)
    llava, llava_processor = build_model(ModelConfig(name_or_path=name))
    assert family_of(ModelConfig(name_or_path=name, grid_pinpoints=GRID)) is NEXT
    hd, processor = build_model(ModelConfig(name_or_path=name, grid_pinpoints=GRID))
    assert (type(hd).__name__, type(processor).__name__) == (NEXT.model_class, NEXT.processor_class)
    before, after = snapshot(llava), hd.state_dict()
    assert set(after) - set(before) == {"model.image_newline"} and set(before) <= set(after)
    assert all(torch.equal(before[n], after[n]) for n in before)
    buffers = dict(llava.named_buffers())
    assert all(torch.equal(buffers[n], b) for n, b in hd.named_buffers()) and len(buffers) == len(dict(hd.named_buffers()))
    assert not any(t.is_meta for t in [*hd.parameters(), *hd.buffers()])
    assert all(getattr(hd.config, f) == getattr(llava.config, f) for f in SHARED_CONFIG_FIELDS)
    assert hd.config.vision_config.to_dict() == llava.config.vision_config.to_dict()
    assert hd.config.text_config.to_dict() == llava.config.text_config.to_dict()
    assert hd.config.image_grid_pinpoints == GRID and hd.generation_config == llava.generation_config
    for attribute in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens",
                      "chat_template", "image_token"):
        assert getattr(processor, attribute) == getattr(llava_processor, attribute)
    assert processor.tokenizer.get_vocab() == llava_processor.tokenizer.get_vocab()
    settings, source_settings = processor.image_processor.to_dict(), llava_processor.image_processor.to_dict()
    assert all(settings[k] == source_settings[k] for k in IMAGE_SETTINGS if k in source_settings)
    assert settings["image_grid_pinpoints"] == GRID


def test_image_newline_starts_as_transformers_draws_it_and_from_the_seed(tiny_checkpoint):
    # transformers' LlavaNextModel: randn(hidden) * 1/sqrt(hidden) (its _init_weights: normal, same std).
    hidden = 4096
    drawn = init_image_newline(hidden, seed=0)
    assert torch.equal(drawn, torch.randn(hidden, generator=torch.Generator().manual_seed(0)) / math.sqrt(hidden))
    assert drawn.std().item() == pytest.approx(hidden ** -0.5, rel=0.05) and abs(drawn.mean().item()) < 3 / hidden
    newline = {}
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        model, _ = build_model(ModelConfig(name_or_path=str(tiny_checkpoint), grid_pinpoints=GRID, seed=seed))
        newline[run] = model.model.image_newline.detach()
    assert torch.equal(newline["a"], newline["b"]) and not torch.equal(newline["a"], newline["c"])
    assert torch.equal(newline["a"], init_image_newline(newline["a"].numel(), seed=0))


def test_a_base_sized_image_keeps_the_source_models_features(tiny_checkpoint):
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    llava, llava_processor = build_model(ModelConfig(name_or_path=str(tiny_checkpoint)))
    view = llava_processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        source = llava.get_image_features(pixel_values=view).pooler_output[0]  # (16 patches, hidden)
    # With the base resolution among the grids, a 16-px image is the base view plus one tile: both are the
    # LLaVA-1.5 view, and the tile's 4x4 feature map gains image_newline at the end of each row.
    for grid in (GRID, [[16, 16], *GRID]):
        hd, processor = build_model(ModelConfig(name_or_path=str(tiny_checkpoint), grid_pinpoints=grid))
        got = image_inputs(processor, [image])
        inputs, counts = got.pixels, got.counts
        assert torch.equal(inputs["pixel_values"][0, 0], view[0])
        with torch.no_grad():
            features = hd.get_image_features(**inputs).pooler_output[0]
        assert len(features) == counts[0] and torch.equal(features[:16], source)
    assert counts == [16 + 4 * 5] and torch.equal(inputs["pixel_values"][0, 1], view[0])
    rows = features[16:].reshape(4, 5, -1)
    assert torch.equal(rows[:, :4].reshape(16, -1), source)
    assert all(torch.equal(row, hd.model.image_newline) for row in rows[:, 4])


@pytest.mark.slow
def test_adapt_trains_the_hd_connector_saves_a_llava_next_folder_and_stage_2_continues(tmp_path, tiny_checkpoint,
                                                                                        monkeypatch):
    import medllava.model

    start = snapshot(build_model(ModelConfig(name_or_path=str(tiny_checkpoint), grid_pinpoints=GRID))[0])
    conversions = []
    convert = medllava.model.to_hd
    monkeypatch.setattr(medllava.model, "to_hd", lambda *a, **k: conversions.append(a[2]) or convert(*a, **k))
    cfg = from_dict(AdaptConfig, config(tmp_path / "run", model={"name_or_path": str(tiny_checkpoint),
                                                                  "grid_pinpoints": GRID}))
    records = run_adapt(cfg, ["align", "instruct"])
    run = tmp_path / "run"
    assert conversions == [GRID]  # stage 2 loads stage 1's llava_next folder as it is
    assert records["align"]["trained_modules"] == ["multi_modal_projector", "image_newline"]
    saved = json.loads((run / "align" / "model" / "config.json").read_text())
    assert saved["model_type"] == "llava_next" and saved["image_grid_pinpoints"] == GRID
    aligned, processor = build_model(ModelConfig(name_or_path=str(run / "align" / "model")))
    assert (type(aligned).__name__, type(processor).__name__) == (NEXT.model_class, NEXT.processor_class)
    aligned = snapshot(aligned)
    assert changed_modules(start, aligned) == {"multi_modal_projector", "image_newline"}
    instructed = snapshot(build_model(ModelConfig(name_or_path=str(run / "instruct" / "model")))[0])
    assert changed_modules(aligned, instructed) == {"multi_modal_projector", "image_newline", "language_model",
                                                    "lm_head"}
    assert "grid_pinpoints: [[16, 32], [32, 16], [32, 32]]" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("grid,message", [
    ([[16, 24]], r"model\.grid_pinpoints\[0\]: \[16, 24\] is not a multiple of the model's image size 16"),
    ([[16, 32], []], r"model\.grid_pinpoints\[1\]: expected \[height, width\], two positive pixel sizes, got \[\]"),
    ([[0, 16]], r"model\.grid_pinpoints\[0\]: expected \[height, width\], two positive pixel sizes, got \[0, 16\]"),
], ids=["not-a-multiple", "empty-pair", "zero-side"])
def test_bad_grids_are_refused_in_one_line_naming_the_field_before_anything_loads(tmp_path, tiny_checkpoint,
                                                                                  monkeypatch, grid, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("medllava.finetune.stages.build_model", no_loading)
    cfg = from_dict(AdaptConfig, config(tmp_path / "run", model={"name_or_path": str(tiny_checkpoint),
                                                                  "grid_pinpoints": grid}))
    with pytest.raises(ConfigError, match=f"^{message}") as error:
        run_adapt(cfg, ["align"])
    assert "\n" not in str(error.value) and not list((tmp_path / "run").glob("*/checkpoints"))


def test_a_grid_model_keeps_its_own_grid_and_qlora_cannot_convert(tiny_checkpoint):
    own = [[16, 32], [32, 16], [32, 32]]  # tiny-next's
    assert grid_to_add(ModelConfig(name_or_path="tiny-next", grid_pinpoints=own)) == []
    assert family_of(ModelConfig(name_or_path="tiny-next", grid_pinpoints=own)) is NEXT
    with pytest.raises(ConfigError, match=re.escape("model.grid_pinpoints: tiny-next is a llava_next model with its"
                                                    f" own grid {own}; leave model.grid_pinpoints empty")):
        family_of(ModelConfig(name_or_path="tiny-next", grid_pinpoints=[[32, 32]]))
    with pytest.raises(ConfigError, match="^model.grid_pinpoints: the grid conversion needs unquantised weights"):
        build_model(ModelConfig(name_or_path=str(tiny_checkpoint), grid_pinpoints=GRID), quantize_4bit=True)


def test_check_takes_a_grid(tiny_checkpoint, capsys):
    assert cli(["check", "--model", str(tiny_checkpoint), "--grid", "16x32,32x16,32x32", "--limit", "2"]) == 0
    assert "image tokens per example; per image by its shape, at most 88" in capsys.readouterr().out
    assert cli(["check", "--model", str(tiny_checkpoint), "--grid", "16x32,32"]) == 1
    assert "medllava: error: --grid: '32' is not HEIGHTxWIDTH in pixels" in capsys.readouterr().err


def test_the_documented_token_cost_is_the_processors():
    # LLaVA-1.5's processor shape without its weights: CLIP ViT-L/14 at 336 px, CLS, the default strategy.
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    from medllava.tiny import build_tokenizer

    clip = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 do_center_crop=True)
    llava = LlavaProcessor(image_processor=clip, tokenizer=build_tokenizer(512), patch_size=14,
                           vision_feature_select_strategy="default", num_additional_image_tokens=1)
    hd = hd_processor(llava, DOC_GRID)
    by_shape = {(h, w): image_inputs(hd, [Image.new("RGB", (w, h))]).counts[0] for h, w in DOC_GRID}
    assert (max_image_tokens(llava), max_image_tokens(hd)) == (576, 2928)
    assert by_shape == {(336, 672): 1752, (672, 336): 1776, (672, 672): 2928}
    section = TRAINING_DOC.read_text().split("## LLaVA-1.5-HD")[1].split("\n## ")[0]
    assert all(f"{n:,}" in section for n in (576, 1752, 1776, 2928))
