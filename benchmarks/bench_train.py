"""Training throughput: medllava's batches against the plain-transformers way, in one process.

    python benchmarks/bench_train.py --stage align --model tiny --steps 20            # CPU, tiny model
    python benchmarks/bench_train.py --stage instruct-lora --model llava-7b --device cuda --batch 16

Both paths train the same model from the same encoded examples with `transformers.Trainer`:
- baseline: padded batches, the model's own loss over full-vocabulary logits at every position
  (what a user writes with Trainer + PEFT);
- sparse: padded batches, logits only at supervised positions (`Collator(sparse_logits=True)` +
  `supervised_loss`);
- packed: as sparse, and packed rows (no padding; attention kept inside each example through position
  ids: block-diagonal masks under sdpa, varlen kernels under flash-attention or flex).
Data loading is outside the timed region (examples are encoded once), so the figures are the model's.

Lengths: stage 1 examples are an image plus a caption of 20-80 tokens, stage 2 examples an image plus
100-600 text tokens (uniform), or the real token lengths of a conversation file (`--lengths-from`).
FLOPs per token: 2N forward for the language model (N = its parameters, embeddings excluded), x2 with
gradients flowing through a frozen LLM (stage 1, LoRA: 4N), x3 when it is trained (6N); plus the vision
tower's forward, 2 x its parameters per image patch token.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune.stages import apply_lora  # noqa: E402
from finetune.config import LoraConfig  # noqa: E402
from medllava.data import Collator, supervised_loss  # noqa: E402
from medllava.model import ModelConfig, build_model, num_image_tokens, set_trainable  # noqa: E402
from medllava.templates import IGNORE_INDEX  # noqa: E402

WORDS = "the chest radiograph shows a right lower lobe opacity with a small pleural effusion and no pneumothorax".split()


def llava_7b_shape(dtype):
    """LLaVA-1.5-7B's shape with random weights: CLIP ViT-L/14-336, 32-layer 4096-wide Llama, MLP projector."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from medllava.tiny import build_tiny

    _, tiny_processor = build_tiny("tiny")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
        image_token_index=32000, image_seq_length=576,
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlavaForConditionalGeneration(config).to(dtype)
    return model, tiny_processor, 576, 32064


def synthetic_examples(n, n_image_tokens, lengths, vocab, image_token_id, image_size, seed=0):
    """Encoded examples: BOS, image tokens, a prompt of 8 tokens, then `length` supervised tokens."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        length = rng.choice(lengths)
        prompt = [1] + [image_token_id] * n_image_tokens + [rng.randrange(5, vocab) for _ in range(8)]
        answer = [rng.randrange(5, vocab) for _ in range(length)] + [2]
        examples.append({
            "id": str(i),
            "input_ids": prompt + answer,
            "attention_mask": [1] * (len(prompt) + len(answer)),
            "labels": [IGNORE_INDEX] * len(prompt) + answer,
            "pixel_values": torch.randn(1, 3, image_size, image_size),
        })
    return examples


def lengths_for(stage, path):
    if path is None:
        return list(range(20, 81)) if stage == "align" else list(range(100, 601))
    from medllava.records import iter_records

    words = [sum(len(t["value"].split()) for t in r["conversations"]) for r in iter_records(path, skip_bad=True)]
    return [max(1, int(w * 1.3)) for w in words]  # about 1.3 tokens per English word


def run(model, examples, collator, args, loss_func):
    """Train `args.steps` steps; returns (seconds per step after warm-up, peak GPU bytes)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    class Bench(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs.pop("example_ids"), inputs.pop("skipped")
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    targs = TrainingArguments(
        output_dir="/tmp/medllava-bench", per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=1e-5, report_to=[], save_strategy="no", logging_strategy="no", remove_unused_columns=False,
        bf16=args.dtype == "bfloat16", gradient_checkpointing=args.gradient_checkpointing,
        dataloader_num_workers=0, use_cpu=args.device == "cpu", disable_tqdm=True,
    )
    trainer = Bench(model=model, args=targs, train_dataset=examples, data_collator=collator,
                    compute_loss_func=loss_func, callbacks=[Clock()])
    trainer.train()
    warm = min(2, len(marks) - 1)
    per_step = (marks[-1] - marks[warm - 1]) / (len(marks) - warm) if warm else (marks[-1] - marks[0])
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return per_step, peak


def flops_per_example(model, stage, text_tokens, n_image_tokens):
    lm = model.model.language_model
    n_llm = sum(p.numel() for n, p in lm.named_parameters() if "embed" not in n)
    n_vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    factor = {"align": 4, "instruct-lora": 4, "instruct-full": 6}[stage]
    tokens = text_tokens + n_image_tokens
    return factor * n_llm * tokens + 2 * n_vision * (n_image_tokens + 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=["align", "instruct-lora", "instruct-full"], default="align")
    p.add_argument("--model", default="tiny", help="tiny, small, llava-7b (random weights) or a checkpoint folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lengths-from", type=Path, help="draw text lengths from this conversation file")
    args = p.parse_args()

    results = {}
    paths = {
        "baseline": dict(pack=False, sparse_logits=False),
        "sparse": dict(pack=False, sparse_logits=True),
        "packed": dict(pack=True, sparse_logits=True),
    }
    for name, options in paths.items():
        torch.manual_seed(0)
        if args.model == "llava-7b":
            model, processor, n_img, vocab = llava_7b_shape(getattr(torch, args.dtype))
            image_size = 336
        else:
            model, processor = build_model(ModelConfig(name_or_path=args.model, dtype=args.dtype))
            n_img, vocab = num_image_tokens(processor), len(processor.tokenizer)
            image_size = model.config.vision_config.image_size
        set_trainable(model, "align" if args.stage == "align" else "instruct")
        if args.stage == "instruct-lora":
            model = apply_lora(model, LoraConfig(enabled=True, r=128, alpha=256), ("multi_modal_projector", "language_model"))
        lengths = lengths_for("align" if args.stage == "align" else "instruct", args.lengths_from)
        examples = synthetic_examples(args.batch * (args.steps + 2), n_img, lengths, vocab,
                                      model.config.image_token_index, image_size)
        pad = processor.tokenizer.pad_token_id
        collator = Collator(pad, **options)
        loss = supervised_loss if options["sparse_logits"] else None
        per_step, peak = run(model, examples, collator, args, loss)
        text = sum(len(e["input_ids"]) - n_img for e in examples) / len(examples)
        flops = flops_per_example(model if args.stage != "instruct-lora" else model.base_model.model, args.stage, text, n_img)
        results[name] = {
            "samples/s": args.batch / per_step,
            "tokens/s": args.batch * (text + n_img) / per_step,
            "TFLOP/s": flops * args.batch / per_step / 1e12,
            "peak GiB": peak / 2**30 if peak is not None else float("nan"),
        }
        del model
    print(f"stage {args.stage}, model {args.model}, device {args.device}, dtype {args.dtype}, batch {args.batch}, "
          f"{args.steps} steps; text lengths {min(lengths)}-{max(lengths)} tokens"
          f"{' from ' + str(args.lengths_from) if args.lengths_from else ' (uniform)'}, {n_img} image tokens")
    print(f"{'path':<10}{'samples/s':>12}{'tokens/s':>12}{'TFLOP/s':>10}{'peak GiB':>10}")
    for name, r in results.items():
        print(f"{name:<10}{r['samples/s']:>12.2f}{r['tokens/s']:>12.0f}{r['TFLOP/s']:>10.3f}{r['peak GiB']:>10.2f}")
    for name in ("sparse", "packed"):
        print(f"{name} / baseline samples/s: {results[name]['samples/s'] / results['baseline']['samples/s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
