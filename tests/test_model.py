"""Model assembly: named tiny models, safetensors round trip with identical logits, the freeze table,
and refusal of folders that are not llava-hf checkpoints (or that hold only pickle weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medllava.families import fixed_image_token_count, model_family
from medllava.model import (
    MODULES, TRAINABLE, CheckpointError, ModelConfig, build_model, module_of, save_model, set_trainable,
)


def batch(processor):
    image = Image.fromarray((np.random.RandomState(1).rand(24, 20, 3) * 255).astype("uint8"))
    return processor(text="USER: <image>\nWhat is shown? ASSISTANT: a CT", images=image, return_tensors="pt")


def test_tiny_model_shape(tiny):
    model, processor = tiny
    assert model.config.text_config.hidden_size == 32 and model.config.text_config.num_hidden_layers == 2
    assert fixed_image_token_count(processor) == model.config.image_seq_length == 16
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")


def test_named_models_are_seeded():
    a, _ = build_model(ModelConfig(name_or_path="tiny", seed=3))
    b, _ = build_model(ModelConfig(name_or_path="tiny", seed=3))
    c, _ = build_model(ModelConfig(name_or_path="tiny", seed=4))
    wa, wb, wc = (m.lm_head.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_save_load_round_trip_gives_identical_logits(tiny, tiny_checkpoint):
    model, processor = tiny
    files = {p.name for p in tiny_checkpoint.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert not any(p.name.endswith(".tmp") for p in tiny_checkpoint.parent.iterdir())
    loaded, loaded_processor = build_model(ModelConfig(name_or_path=str(tiny_checkpoint)))
    x, y = batch(processor), batch(loaded_processor)
    assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["pixel_values"], y["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**x).logits, loaded(**y).logits)


def test_save_replaces_an_existing_checkpoint_whole(tiny, tmp_path):
    model, processor = tiny
    out = tmp_path / "ck"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_model(model, processor, out)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize("named", ["tiny", "tiny-next"])
@pytest.mark.parametrize("stage", sorted(TRAINABLE))
def test_freeze_table(tiny, stage, named):
    # The projector stands for the family's connector (LLaVA-NeXT: with image_newline).
    model = tiny[0] if named == "tiny" else build_model(ModelConfig(name_or_path=named))[0]
    family = model_family(model)
    expected = family.trainable(TRAINABLE[stage])
    names = set(set_trainable(model, stage))
    try:
        all_names = [n for n, _ in model.named_parameters()]
        assert names == {n for n in all_names if module_of(n, family.modules) in expected}
        assert {module_of(n, family.modules) for n in names} == set(expected)
        assert not any(module_of(n, family.modules) == "vision_tower" for n in names)
        assert all(p.requires_grad == (n in names) for n, p in model.named_parameters())
    finally:
        set_trainable(model, MODULES)


def test_align_trains_only_the_projector(tiny):
    model, _ = tiny
    names = set_trainable(model, "align")
    set_trainable(model, MODULES)
    assert names and all(n.startswith("model.multi_modal_projector.") for n in names)


def test_integer_weights_stay_frozen(tiny):
    # A 4-bit (QLoRA) language model stores its linear weights as uint8, which cannot require grad.
    import copy

    import torch

    model = copy.deepcopy(tiny[0])
    layer = model.model.language_model.layers[0].mlp.down_proj
    layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.shape, dtype=torch.uint8), requires_grad=False)
    names = set_trainable(model, "instruct")
    assert not layer.weight.requires_grad and "model.language_model.layers.0.mlp.down_proj.weight" not in names
    assert "model.language_model.layers.0.mlp.up_proj.weight" in names


def test_set_trainable_refuses_unknown_names(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="unknown stage"):
        set_trainable(model, "pretrain")
    with pytest.raises(ValueError, match="unknown modules"):
        set_trainable(model, ["projector"])


def test_folders_that_are_not_checkpoints_are_refused(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="not a folder"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "nope")))
    with pytest.raises(CheckpointError, match="config.json is missing"):
        build_model(ModelConfig(name_or_path=str(tmp_path)))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(CheckpointError, match="pickle files are not loaded"):
        build_model(ModelConfig(name_or_path=str(pickled)))
    original = tmp_path / "original"
    original.mkdir()
    (original / "config.json").write_text(json.dumps({"model_type": "llava_mistral"}))
    (original / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="llava_mistral"):
        build_model(ModelConfig(name_or_path=str(original)))


def test_unknown_named_model_and_dtype(tmp_path):
    with pytest.raises(CheckpointError):
        build_model(ModelConfig(name_or_path="huge"))
    with pytest.raises(ValueError, match="unknown dtype"):
        build_model(ModelConfig(name_or_path="tiny", dtype="fp8"))
