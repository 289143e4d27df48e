"""Heads trained for nothing: a LoRA adapter (with its own projector) of random but non-zero updates,
saved with a head.json, for tests of loading, switching and evaluating heads."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from medllava.heads import HeadInfo, write_head_info
from medllava.model import ModelConfig, build_model


def make_head(base_dir: Path, out: Path, seed: int, info: HeadInfo | None = None) -> Path:
    """Write a random head for the checkpoint in `base_dir` to `out`; `info` defaults to task `task<seed>`."""
    model, _ = build_model(ModelConfig(name_or_path=str(base_dir)))
    peft_model = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)$",
        modules_to_save=["multi_modal_projector"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(out)
    write_head_info(out, info or HeadInfo(task=f"task{seed}", base=str(base_dir)))
    return out
