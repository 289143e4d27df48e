"""The vision feature cache in the grid families (tiny-next, tiny-onevision), on CPU: each image's tiles are
cached under (image key, tile index), so cached features give the uncached loss and connector gradients on
images of different shapes (different tile counts), a second pass and a reloaded disk cache never run the
tower, a cache made under another grid or tower is not read, and a stage caching on disk trains, reads every
tile from the cache in its second epoch and resumes reading the disk cache."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from medllava.config import from_dict
from medllava.data import Collator, EncodedDataset, Encoder
from medllava.families import FAMILIES, model_family
from medllava.finetune.config import StageConfig
from medllava.finetune.stages import RunSettings, run_stage
from medllava.finetune.trainer import read_trace
from medllava.finetune.vision_cache import VisionFeatureCache
from medllava.model import ModelConfig, build_model, set_trainable

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = RunSettings(seed=3, bf16=False, report_to=("none",))
SHAPES = {"wide.png": (64, 24), "tall.png": (24, 64), "square.png": (64, 64), "small.png": (20, 20)}
"""Image name: (width, height)."""
NEXT_TILES = dict(zip(SHAPES, [3, 3, 5, 5]))
"""Their tiles under tiny-next's grid (pinpoints 16x32, 32x16, 32x32; 16-px tiles): the grid's and the
downsampled view (the small image is scaled up into the 32x32 grid)."""
TEMPLATES = {"tiny-next": "vicuna_v1", "tiny-onevision": "chat_template"}


@pytest.fixture(scope="module")
def shaped(tmp_path_factory) -> Path:
    """8 one-turn records over 4 images of different shapes, in `records.jsonl` beside the images."""
    folder = tmp_path_factory.mktemp("shapes")
    for i, (name, size) in enumerate(SHAPES.items()):
        Image.new("RGB", size, (40 * i, 200 - 40 * i, 90)).save(folder / name)
    records = [{"id": f"r{i}", "image": name, "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": "a small pleural effusion " * (1 + i % 3)}]}
        for i, name in enumerate(list(SHAPES) * 2)]
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.fixture(scope="module", params=["tiny-next", "tiny-onevision"])
def grid_model(request):
    model, processor = build_model(ModelConfig(name_or_path=request.param))
    set_trainable(model, "align")
    return request.param, model, processor


@pytest.fixture()
def batch(grid_model, shaped):
    """The model and one batch of the 4 shaped images: (name, model, image keys, model inputs)."""
    name, model, processor = grid_model
    rows = [json.loads(line) for line in (shaped / "records.jsonl").read_text().splitlines()][:4]
    dataset = EncodedDataset(rows, Encoder(processor, image_root=shaped, template=TEMPLATES[name]))
    out = Collator(processor.tokenizer.pad_token_id, image_keys=True)([dataset[i] for i in range(4)])
    out.pop("example_ids"), out.pop("skipped")
    return name, model, out.pop("image_keys"), out


def loss_and_connector_grads(model, inputs):
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_tiles_per_image_is_the_models_own_count():
    next_config = build_model(ModelConfig(name_or_path="tiny-next"))[0].config
    next_family = FAMILIES["llava_next"]
    sizes = [[h, w] for w, h in SHAPES.values()]
    assert next_family.tiles_per_image(next_config, sizes) == list(NEXT_TILES.values())
    assert next_family.tiles_per_image(next_config, torch.tensor(sizes)) == list(NEXT_TILES.values())
    assert next_family.max_tiles(next_config) == 5
    assert FAMILIES["llava"].tiles_per_image(None, sizes) == [1] * 4 and FAMILIES["llava"].max_tiles(None) == 1
    assert all(not FAMILIES[name].feature_cache for name in ("llava", "llava_next", "llava_onevision"))


def test_cached_tiles_give_the_same_loss_and_connector_gradients(batch, tmp_path):
    name, model, keys, inputs = batch
    tiles = model_family(model).tiles_per_image(model.config, inputs["image_sizes"])
    assert len(set(tiles)) > 1 and inputs["pixel_values"].shape[1] == max(tiles)  # padded to the most tiles
    ref_loss, ref_grads = loss_and_connector_grads(model, inputs)
    assert {n.split(".")[1] for n in ref_grads} == {"multi_modal_projector", "image_newline"}
    tower_rows = []  # rows of pixels the real tower's embeddings see, per run
    embeddings = next(m for n, m in model.model.vision_tower.named_modules() if n.endswith("embeddings"))
    hook = embeddings.register_forward_pre_hook(lambda m, args: tower_rows.append(args[0].shape[0]))
    try:
        for folder in (None, tmp_path / "features"):
            cache = VisionFeatureCache(model, folder).attach()
            for expected in ([sum(tiles)], []):  # the first pass runs the tower on every real tile, once
                tower_rows.clear()
                with cache.batch(keys, inputs["image_sizes"]):
                    loss, grads = loss_and_connector_grads(model, inputs)
                assert tower_rows == expected
                assert torch.allclose(loss, ref_loss, atol=1e-6)
                assert all(torch.allclose(grads[n], ref_grads[n], atol=1e-6) for n in ref_grads)
            assert cache.stats()["tiles_computed"] == sum(tiles) and cache.stats()["tiles_served"] == sum(tiles)
            assert cache.stats()["images_computed"] == cache.stats()["images_served"] == 4
            cache.detach()
    finally:
        hook.remove()
    # A new cache over the same folder (a resumed run) reads one safetensors file per tile.
    files = sorted(p for p in (tmp_path / "features").rglob("*") if p.is_file())
    assert len(files) == sum(tiles)
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata()["image"] in keys and int(f.metadata()["tile"]) < max(tiles)
    reloaded = VisionFeatureCache(model, tmp_path / "features").attach()
    with reloaded.batch(keys, inputs["image_sizes"]):
        loss, _ = loss_and_connector_grads(model, inputs)
    assert reloaded.computed == 0 and reloaded.served == sum(tiles) and torch.allclose(loss, ref_loss, atol=1e-6)
    with pytest.raises(ValueError, match="tiled by their size"), reloaded.batch(keys, None):
        model(**inputs)
    with reloaded.batch(keys[:3], inputs["image_sizes"][:3]), pytest.raises(ValueError, match="tiles but"):
        model(**inputs)
    reloaded.detach()
    assert "forward" not in vars(model.model.vision_tower)


def test_a_cache_of_another_grid_or_tower_is_not_read(grid_model, tmp_path):
    _, model, _ = grid_model
    folder = VisionFeatureCache(model, tmp_path).folder
    assert VisionFeatureCache(model, tmp_path).folder == folder
    other = copy.deepcopy(model)
    other.config.image_grid_pinpoints = other.config.image_grid_pinpoints[:-1]
    assert VisionFeatureCache(other, tmp_path).folder != folder
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.model.vision_tower.parameters()).add_(1.0)
    assert VisionFeatureCache(other, tmp_path).folder != folder
    per_tile = VisionFeatureCache(model).bytes_per_image() // model_family(model).max_tiles(model.config)
    vision = model.config.vision_config
    assert per_tile == ((vision.image_size // vision.patch_size) ** 2 + 1) * vision.hidden_size * 4


def cached_stage(shaped: Path, **overrides) -> StageConfig:
    cfg = {"data": {"path": str(shaped / "records.jsonl"), "image_root": str(shaped), "template": "vicuna_v1"},
           "epochs": 2, "global_batch_size": 4, "per_device_batch_size": 2, "save_steps": 100, "logging_steps": 100,
           "dataloader_workers": 0, "gradient_checkpointing": False, "cache_vision_features": "disk"}
    cfg.update(overrides)
    return from_dict(StageConfig, cfg)


@pytest.mark.slow
def test_a_disk_cached_stage_reads_every_tile_in_its_second_epoch_and_resumes_from_disk(shaped, tmp_path, capsys):
    model = ModelConfig(name_or_path="tiny-next")
    out = tmp_path / "align"
    record = run_stage("align", cached_stage(shaped), model, RUN, out)
    tiles = sum(NEXT_TILES.values())  # each image computed once: 8 records x 2 epochs read 16 images
    assert record["vision_cache"] | {"folder": None} == {
        "mode": "disk", "images_computed": 4, "images_served": 16 - 4, "tiles_computed": tiles,
        "tiles_served": 2 * 2 * tiles - tiles, "folder": None}
    assert len([p for p in (out / "vision_features").rglob("*") if p.is_file()]) == tiles
    assert "MiB per image at most (5 tiles of" in capsys.readouterr().out
    # A run stopped after step 1 with a complete checkpoint, then started again: the images of step 1 come
    # back from disk, the rest run through the tower.
    resumed_out = tmp_path / "resumed"
    run_stage("align", cached_stage(shaped, max_steps=1, save_steps=1), model, RUN, resumed_out)
    (resumed_out / "stage_complete.json").unlink()
    resumed = run_stage("align", cached_stage(shaped), model, RUN, resumed_out)
    assert read_trace(resumed_out / "data_order.jsonl") == read_trace(out / "data_order.jsonl")
    images = {json.loads(line)["id"]: json.loads(line)["image"]
              for line in (shaped / "records.jsonl").read_text().splitlines()}
    seen = {images[i] for i in read_trace(resumed_out / "data_order.jsonl")[1]}
    assert resumed["vision_cache"]["images_computed"] == 4 - len(seen)
    assert resumed["vision_cache"]["tiles_computed"] == sum(NEXT_TILES[n] for n in set(SHAPES) - seen)
