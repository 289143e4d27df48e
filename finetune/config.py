"""Configs of the curriculum: typed dataclasses whose field docstrings become `--help` and the
comments of the `config.yaml` written into every run directory.

Defaults are LLaVA-Med's recipe: stage 1 trains the projector only (lr 2e-3, 1 epoch, global batch
128, 3% warmup, cosine, no weight decay); stage 2 trains projector + language model (lr 2e-5,
3 epochs, global batch 128); max length 2048; bf16.

Two tables say how stages differ. `StageConfig` holds what a YAML config sets (data, schedule, LoRA,
speed options); `STAGE_DEFINITIONS` holds what medllava fixes for each stage name (what it trains by
default, which stage's model it starts from, what it saves besides its model). Stage code reads both and
never branches on a stage's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medllava.model import TRAINABLE, ModelConfig
from medllava.templates import DEFAULT_TEMPLATE

LLM_LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DataConfig:
    path: str = ""
    """Conversation file in LLaVA format (JSON array or JSONL), e.g. llava_med_alignment_500k.json."""

    image_root: str = ""
    """Folder the records' image paths are relative to."""

    template: str = DEFAULT_TEMPLATE
    """Conversation template (medllava.templates.TEMPLATES): vicuna_v1, mistral_instruct, plain or chat_template."""

    max_length: int = 2048
    """Token limit per example; longer examples are cut after the first reply, or skipped."""

    exclude_burned_in: bool = False
    """Skip DICOM images whose header says BurnedInAnnotation YES (identifiers drawn into the pixels), each
    listed in skipped.jsonl; off, they train with a warning naming the file."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train low-rank adapters on the language model instead of all its weights."""

    r: int = 128
    """Adapter rank."""

    alpha: int = 256
    """Adapter scaling numerator (scale = alpha / r)."""

    dropout: float = 0.05
    """Dropout on the adapter input."""

    target_modules: list[str] = field(default_factory=lambda: list(LLM_LINEAR_LAYERS))
    """Linear layers of the language model that get adapters."""

    quantize_4bit: bool = False
    """QLoRA: load the frozen language model in 4-bit NF4 (needs a CUDA GPU and bitsandbytes)."""

    merge: bool = False
    """Also save a checkpoint with the adapters merged into the weights."""


@dataclass
class StageConfig:
    data: DataConfig = field(default_factory=DataConfig)
    """The stage's training data."""

    train_modules: list[str] = field(default_factory=list)
    """Modules to train, the model family's (vision_tower, multi_modal_projector, language_model, lm_head;
    LLaVA-NeXT adds image_newline), taken as written; empty = the stage's entry in STAGE_DEFINITIONS
    (medllava.model.TRAINABLE), with the family's connector for the projector (LLaVA-NeXT: with
    image_newline). image_newline is one parameter, not a module: full training trains it, LoRA cannot and
    leaves it frozen (listed with lora.enabled, it is refused)."""

    learning_rate: float = 2e-5
    """Peak learning rate."""

    epochs: float = 3.0
    """Passes over the data."""

    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run all epochs)."""

    global_batch_size: int = 128
    """Examples per optimizer step over all devices; gradient accumulation makes up the difference."""

    per_device_batch_size: int = 16
    """Examples per forward pass on one device."""

    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up linearly."""

    lr_scheduler: str = "cosine"
    """Learning-rate schedule after warmup (a transformers scheduler name)."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    gradient_checkpointing: bool | Literal["auto"] = True
    """Recompute activations in the backward pass to save memory. `auto`: one trial forward and backward
    pass of the stage's heaviest micro-batch decides, on the training GPU, whether it fits without (with
    room for the optimizer's states); not under DeepSpeed."""

    save_steps: int = 500
    """Save a resumable checkpoint every this many optimizer steps."""

    save_total_limit: int = 2
    """Keep at most this many resumable checkpoints."""

    logging_steps: int = 10
    """Log loss and learning rate every this many steps."""

    dataloader_workers: int = 4
    """Processes decoding images and tokenising in the background."""

    packing: bool = False
    """Pack each micro-batch's examples into one row (no padding; attention kept inside each example).
    Pays off with flash-attention or flex attention; under sdpa the mask is dense."""

    sparse_logits: bool = True
    """Compute vocabulary logits only at supervised positions (same loss, far less memory)."""

    group_by_length: bool = False
    """Batch examples of similar token length together (padded batches, packing off): less compute spent
    on padding. Order stays seeded per epoch, so resuming replays it; every example is still seen once."""

    cache_vision_features: Literal["none", "memory", "disk"] = "none"
    """Run the frozen vision tower once per image and reuse its features in later epochs: `none`,
    `memory` (host RAM, about 1.2 MB per image for CLIP ViT-L/336 in bf16) or `disk` (safetensors under
    the stage folder's vision_features/, kept across resumes). A grid family (LLaVA-NeXT, OneVision) caches
    each tile, so an image takes up to its largest grid's tiles. Needs the vision tower frozen and no
    ZeRO-3; pays off only from the second epoch on, and the memory it takes grows with the number of
    distinct images."""

    torch_compile: bool | Literal["auto"] = False
    """Compile the model with torch.compile (inductor). The first steps are slow while it compiles; varying
    sequence lengths recompile a few times before shapes settle. After the first step the stage checks that
    dynamo really compiled something: with `true` a model that ran eager stops the stage with the reason,
    with `auto` it goes on eager with a warning (both kept in stage_complete.json, `compilation`)."""

    compile_layers: bool | Literal["auto"] = False
    """Compile each decoder layer of the language model on its own (torch.compile with dynamic shapes: one
    compiled layer serves every layer and length). Fuses small kernels and keeps fewer activations: on an
    H100, packed under flex attention, stage 1 ran 2.43x the plain way (1.85x uncompiled) and LoRA 2.56x
    (1.71x), and twice the examples per pass fit (docs/benchmarks.md). Not with torch_compile. Checked
    after the first step as torch_compile is: `true` stops a stage whose layers ran eager, `auto` warns."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters (LoRA / QLoRA) instead of full training of the language model."""


@dataclass(frozen=True)
class StageDefinition:
    """What a stage is, besides its settings: fixed by medllava for each stage name, not set in a config."""

    trains: tuple[str, ...]
    """Modules trained when the stage's `train_modules` is empty. `multi_modal_projector` stands for the
    model family's connector (`Family.trainable`: LLaVA-NeXT's is the projector and image_newline); under
    LoRA the family's bare parameters (image_newline) stay frozen, since PEFT trains only adapters and whole
    submodules (`modules_to_save`)."""

    starts_from: str = ""
    """The stage whose saved `model/` this stage starts from when that folder exists; empty: the run's model."""

    saves_projector: bool = False
    """Also write `projector.safetensors`, the family's connector alone (the projector; LLaVA-NeXT: with
    image_newline), when the stage trains without LoRA."""


STAGE_DEFINITIONS: dict[str, StageDefinition] = {
    "align": StageDefinition(trains=TRAINABLE["align"], saves_projector=True),
    "instruct": StageDefinition(trains=TRAINABLE["instruct"], starts_from="align"),
    "finetune": StageDefinition(trains=TRAINABLE["finetune"]),
}

CURRICULUM: tuple[str, ...] = ("align", "instruct")
"""The stages `medllava adapt` runs, in order; each is a StageConfig field of AdaptConfig."""


def stage_definition(name: str) -> StageDefinition:
    """The table entry of stage `name`; a stage outside the table trains only what its config names."""
    return STAGE_DEFINITIONS.get(name, StageDefinition(trains=()))


def _align_defaults() -> StageConfig:
    return StageConfig(
        data=DataConfig(template="plain"),
        learning_rate=2e-3,
        epochs=1.0,
        gradient_checkpointing=False,
    )


@dataclass
class AdaptConfig:
    run_dir: str = "runs/adapt"
    """Run directory: align/ and instruct/ are written inside it, with config.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The starting point: a general llava-hf checkpoint folder of a supported family (LLaVA-1.5 or
    LLaVA-NeXT, medllava.families), or a named tiny model for trials."""

    seed: int = 42
    """Seed for weights of new modules, data order and dropout."""

    bf16: bool = True
    """Train in bfloat16 mixed precision (ignored on a CPU without bf16 support)."""

    deepspeed: str | None = None
    """DeepSpeed JSON config (e.g. finetune/configs/zero2.json) for several GPUs or nodes."""

    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where training metrics go (tensorboard, none, ...)."""

    align: StageConfig = field(default_factory=_align_defaults)
    """Stage 1: concept alignment on figure-caption pairs."""

    instruct: StageConfig = field(default_factory=StageConfig)
    """Stage 2: instruction tuning on teacher-written conversations."""


@dataclass
class RunSettings:
    """Run-wide settings a stage needs besides its own config."""

    seed: int = 42
    bf16: bool = True
    deepspeed: str | None = None
    report_to: tuple[str, ...] = ("tensorboard",)
