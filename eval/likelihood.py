"""Closed questions answered by likelihood: each candidate answer (yes/no, or the question's
options) is scored by its total log-probability given the prompt and the image, and the
best one is the answer.

A candidate is scored as the whole assistant reply the template would render for it, the
end-of-turn token included, so "no" is scored as a complete answer and not as the start of
"normal". All candidates of a batch of questions go through the model in one forward pass.
Rows are left-padded with position ids taken from the attention mask, so every row ends
at the last column and sees the positions it would see alone; only the logits of the last
few columns (the longest reply) are computed: (rows, reply tokens, vocabulary), however
long the prompts are.
"""

from __future__ import annotations

from collections.abc import Sequence

from medllava.records import GPT, HUMAN, IMAGE_PLACEHOLDER
from medllava.templates import get_template, prompt_text, render

from medllava.eval.generate import encode
from medllava.families import image_markup, model_family


def reply_text(question: str, answer: str, template: str, processor) -> str:
    """The text the template adds after the generation prompt when the assistant says `answer`."""
    prompt = prompt_text(question, template, processor)
    turns = [{"from": HUMAN, "value": IMAGE_PLACEHOLDER + "\n" + question}, {"from": GPT, "value": answer}]
    full = render(turns, template, processor.tokenizer.eos_token or "", image_markup(processor), None, processor).text
    if not full.startswith(prompt):
        raise ValueError(f"template {template!r} does not render a reply after its generation prompt; "
                         "likelihood scoring needs one (use --closed-scoring generate)")
    return full[len(prompt):]


def reply_token_count(tokenizer, prompt: str, full: str, add_special_tokens: bool) -> int:
    """Tokens of `full` past the tokens it shares with `prompt` (tokenised as the model sees them)."""
    a = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    b = tokenizer(full, add_special_tokens=add_special_tokens)["input_ids"]
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    if shared == len(b):
        raise ValueError(f"the reply adds no tokens to the prompt: {full[-40:]!r}")
    return len(b) - shared


def sequence_log_likelihoods(model, batch, reply_lengths: Sequence[int]) -> list[float]:
    """Sum of log p(token) over the last `reply_lengths[j]` tokens of each left-padded row j.

    batch: input_ids, attention_mask (rows, T) and one image per row in the family's pixel inputs
    (`medllava.eval.generate.encode`: pixel_values (rows, 3, H, W), or (rows, tiles, 3, H, W) with
    image_sizes (rows, 2) in a grid family).
    """
    import torch

    keep = max(reply_lengths) + 1  # the logit before a token predicts it
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if keep > ids.shape[1]:
        raise ValueError(f"replies of {keep - 1} tokens in rows of {ids.shape[1]} tokens")
    # Left padding shifts each row; the positions restart at its first real token. A family with 3-D
    # rope positions computes them itself from the attention mask.
    positions = {} if model_family(model).rope_3d else {"position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)}
    with torch.inference_mode():
        logits = model(**batch, **positions, logits_to_keep=keep, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (rows, keep - 1, vocab)
    targets = ids[:, ids.shape[1] - keep + 1:]
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (rows, keep - 1)
    lengths = torch.tensor(list(reply_lengths), device=ids.device)
    steps = torch.arange(keep - 1, device=ids.device)
    in_reply = steps.unsqueeze(0) >= (keep - 1 - lengths).unsqueeze(1)
    return (token_logp * in_reply).sum(-1).tolist()


def score_candidates(model, processor, questions: Sequence[str], images: Sequence,
                     candidates: Sequence[Sequence[str]], template: str) -> list[dict[str, float]]:
    """For each question, {candidate: total log-likelihood of answering it}, in one forward pass.

    `questions[i]` is the human-turn text (no image placeholder), asked about `images[i]`
    with candidate answers `candidates[i]`. Every candidate is one row holding its question's image,
    so the processor builds each row's pixel inputs (and, in a grid family, its image-token count)
    exactly as for that question asked alone.
    """
    tok = processor.tokenizer
    add_special = not get_template(template).writes_bos
    texts, row_images, lengths = [], [], []
    for question, image, options in zip(questions, images, candidates, strict=True):
        if not options:
            raise ValueError(f"no candidate answers for question {question!r}")
        prompt = prompt_text(question, template, processor)
        for option in options:
            full = prompt + reply_text(question, option, template, processor)
            texts.append(full)
            row_images.append(image)
            lengths.append(reply_token_count(tok, prompt, full, add_special))
    batch = encode(processor, texts, row_images, model.device, model.dtype, add_special_tokens=add_special)
    scores = iter(sequence_log_likelihoods(model, batch, lengths))
    return [{option: next(scores) for option in options} for options in candidates]


def best(scores: dict[str, float]) -> str:
    """The candidate with the highest log-likelihood (the first listed on a tie)."""
    return max(scores, key=scores.__getitem__)
