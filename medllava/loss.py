"""The training loss: cross-entropy on supervised tokens only, from logits at those positions.

The collator (`medllava.data.Collator` with `sparse_logits=True`) lets the model compute logits only
where a label is supervised; this is the loss over them, chunked so the float32 working set stays
small whatever the vocabulary.
"""

from __future__ import annotations

from medllava.templates import IGNORE_INDEX


def supervised_positions(labels):
    """Positions p (shared by the batch's rows) whose logits predict a supervised label at p + 1."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


LOSS_CHUNK = 1024
"""Supervised positions per chunk of `supervised_loss`: its float32 working set is LOSS_CHUNK x vocabulary."""


def supervised_loss(outputs, labels, num_items_in_batch=None, chunk: int = LOSS_CHUNK):
    """Cross-entropy over supervised tokens from logits computed only at `supervised_positions`.

    Matches the model's own shifted causal-LM loss: summed over supervised tokens and divided by
    `num_items_in_batch` (the Trainer's token count over accumulation steps) or by this batch's count.
    For `transformers.Trainer(compute_loss_func=...)` with a collator built with `sparse_logits=True`.

    Computed `chunk` positions at a time, each chunk recomputed in the backward pass: the float32 copy
    of the logits and its log-softmax exist for one chunk at a time, never for all of them (with
    LLaMA's 32K vocabulary, 8 GB for 64K supervised tokens; 4x that for a 128K vocabulary).
    """
    from torch.utils.checkpoint import checkpoint

    positions = supervised_positions(labels)
    logits = outputs.logits
    targets = labels[:, 1:][:, positions].reshape(-1).to(logits.device)
    logits = logits.reshape(-1, logits.shape[-1])
    total = logits[:0].float().sum()  # zero, and part of the graph even with nothing supervised
    for start in range(0, logits.shape[0], chunk):
        part, wanted = logits[start:start + chunk], targets[start:start + chunk]
        if logits.requires_grad and logits.shape[0] > chunk:
            # Cross-entropy draws no random numbers: no RNG state to save and restore per chunk.
            total = total + checkpoint(_summed_cross_entropy, part, wanted, use_reentrant=False,
                                       preserve_rng_state=False)
        else:
            total = total + _summed_cross_entropy(part, wanted)
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    return total / count


def _summed_cross_entropy(logits, targets):
    import torch

    return torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
