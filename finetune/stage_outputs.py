"""What a finished stage saves (the layout is in `finetune.stages`' docstring): the model or LoRA
adapter, the merged model, the projector alone; each written atomically, on every rank as ZeRO-3 needs."""

from __future__ import annotations

from pathlib import Path

from medllava.families import Family
from medllava.finetune.config import LoraConfig
from medllava.finetune.trainer import is_main_process
from medllava.model import module_of, save_model


def save_outputs(trainer, processor, lora: LoraConfig, out_dir: Path, projector_of: Family | None = None) -> None:
    """Save what the stage produced (see the module docstring for the layout), each atomically: the model
    or adapter, the merged model (`lora.merge`), and with `projector_of` (the model's family, for a stage
    that saves its projector) that family's connector alone.

    Called on every rank: under ZeRO-3 the Trainer's save gathers the sharded weights, and only the
    main process writes. Weights go to a staging folder first and are renamed into place whole.
    """
    target = save_trained(trainer, processor, lora, out_dir)
    if lora.enabled and lora.merge and is_main_process():
        save_model(trainer.model.merge_and_unload(), processor, out_dir / "model")
    if projector_of is not None and not lora.enabled and is_main_process():
        save_projector(target, out_dir / "projector.safetensors", projector_of)



def save_trained(trainer, processor, lora: LoraConfig, out_dir: Path) -> Path:
    """Save the trained model (`model/`) or, with LoRA, the adapter (`adapter/`); returns that folder."""
    from medllava.io import replace_dir

    target = out_dir / ("adapter" if lora.enabled else "model")
    staging = out_dir / f".{target.name}.staging"
    trainer.save_final_model(str(staging))  # the model, or the PEFT adapter (+ modules to save)
    if is_main_process():
        if not lora.enabled:
            processor.save_pretrained(staging)
        replace_dir(staging, target)
    barrier()
    return target



def save_projector(model_dir: Path, path: Path, family: Family) -> None:
    """Write the family's connector alone (the projector; LLaVA-NeXT: with image_newline), read back from
    the saved (gathered, possibly sharded) weights in `model_dir`, under their names there."""
    from safetensors import safe_open
    from safetensors.torch import save

    from medllava.io import atomic_open

    projector = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            projector.update({k: f.get_tensor(k) for k in f.keys()
                              if module_of(k, family.modules, family.saved_prefixes) in family.connector})
    with atomic_open(path, "wb") as f:
        f.write(save(projector))



def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
