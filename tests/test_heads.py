"""Heads: several LoRA heads (with their own projector) share one base in memory and each gives its
own outputs; the base itself is unchanged; a folder that is not a head is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medllava.heads import head_name, load_with_heads, read_head_info, use_head
from medllava.model import ModelConfig, build_model
from random_heads import make_head


def logits(model, processor):
    image = Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype("uint8"))
    batch = processor(text="USER: <image>\nIs it normal? ASSISTANT:", images=image, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits[0, -1]


def test_two_heads_share_one_base_and_answer_differently(tmp_path, tiny_checkpoint):
    a = make_head(tiny_checkpoint, tmp_path / "head_a", 1)
    b = make_head(tiny_checkpoint, tmp_path / "head_b", 2)
    base, processor = build_model(ModelConfig(name_or_path=str(tiny_checkpoint)))
    plain = logits(base, processor)
    model, processor, infos = load_with_heads(ModelConfig(name_or_path=str(tiny_checkpoint)), [a, b])
    assert list(infos) == ["head_a", "head_b"] and infos["head_b"].task == "task2"
    use_head(model, "head_a")
    out_a = logits(model, processor)
    use_head(model, "head_b")
    out_b = logits(model, processor)
    use_head(model, "head_a")
    assert torch.equal(logits(model, processor), out_a)  # switching back gives the same answers
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, plain)
    with model.disable_adapter():
        assert torch.allclose(logits(model, processor), plain, atol=1e-6)  # one base, untouched


def test_not_a_head_is_refused(tmp_path, tiny_checkpoint):
    with pytest.raises(ValueError, match="not a head folder"):
        read_head_info(tiny_checkpoint)
    with pytest.raises(ValueError, match="not a head folder"):
        load_with_heads(ModelConfig(name_or_path=str(tiny_checkpoint)), [tmp_path])


def test_head_names_come_from_folders(tmp_path):
    assert head_name(tmp_path / "vqa-rad.v2") == "vqa-rad_v2"
