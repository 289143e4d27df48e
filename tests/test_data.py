"""Encoding and batching: padded and packed batches give the same loss; skipped examples are
dropped from the batch and reported with it."""

from __future__ import annotations

import json

import pytest
import torch

from medllava.tiny import demo_data
from medllava.data import Collator, EncodedDataset, Encoder

DATA, IMAGES = demo_data()


@pytest.fixture(scope="module")
def trained_like(tiny):
    """The tiny model with larger random weights, so logits differ clearly between positions."""
    import copy

    model = copy.deepcopy(tiny[0])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model, tiny[1]


def batch_loss(model, batch):
    batch = {k: v for k, v in batch.items() if k not in ("example_ids", "skipped")}
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    return total / (labels != -100).sum()


def test_packed_and_padded_batches_give_the_same_loss(trained_like):
    model, processor = trained_like
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:4]
    dataset = EncodedDataset(rows, Encoder(processor, image_root=IMAGES))
    features = [dataset[i] for i in range(len(rows))]
    padded = Collator(processor.tokenizer.pad_token_id)(features)
    packed = Collator(processor.tokenizer.pad_token_id, pack=True)(features)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] == sum(len(f["input_ids"]) for f in features) < padded["input_ids"].numel()
    loss_padded, loss_packed = batch_loss(model, padded), batch_loss(model, packed)
    assert torch.allclose(loss_padded, loss_packed, atol=1e-5), (loss_padded, loss_packed)
    # The model's own loss agrees as well (transformers shifts the labels itself).
    with torch.no_grad():
        own = model(**{k: v for k, v in packed.items() if k not in ("example_ids", "skipped")}).loss
    assert torch.allclose(own, loss_padded, atol=1e-5)


def test_skipped_examples_travel_with_the_batch(tiny):
    _, processor = tiny
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:2]
    rows.append(dict(rows[0], id="gone", image="missing.jpg"))
    dataset = EncodedDataset(rows, Encoder(processor, image_root=IMAGES))
    for pack in (False, True):
        batch = Collator(processor.tokenizer.pad_token_id, pack=pack)([dataset[i] for i in range(3)])
        assert batch["example_ids"] == [rows[0]["id"], rows[1]["id"]]
        assert batch["skipped"] == [("missing image", str(IMAGES / "missing.jpg"))]
        assert batch["pixel_values"].shape[0] == 2


def test_a_conversation_the_template_cannot_render_is_skipped_with_its_record_named(tiny):
    _, processor = tiny
    one_round, several = [json.loads(line) for line in DATA.read_text().splitlines()][:2]
    one_round = dict(one_round, conversations=one_round["conversations"][:2])
    dataset = EncodedDataset([one_round, several], Encoder(processor, template="plain", image_root=IMAGES))
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["example_ids"] == [one_round["id"]]
    [(reason, detail)] = batch["skipped"]
    assert reason == "unusable conversation" and detail.startswith(f"record {several['id']}: template 'plain'")


@pytest.mark.parametrize("pack", [False, True])
def test_sparse_logits_give_the_models_own_loss_and_gradients(trained_like, pack):
    import copy

    from medllava.loss import supervised_loss

    model, processor = trained_like
    model = copy.deepcopy(model)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:3]
    dataset = EncodedDataset(rows, Encoder(processor, image_root=IMAGES))
    features = [dataset[i] for i in range(len(rows))]
    dense = Collator(processor.tokenizer.pad_token_id, pack=pack)(features)
    sparse = Collator(processor.tokenizer.pad_token_id, pack=pack, sparse_logits=True)(features)
    for batch in (dense, sparse):
        batch.pop("example_ids"), batch.pop("skipped")
    reference = model(**dense).loss
    reference.backward()
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    labels = sparse.pop("labels")
    out = model(**sparse)
    assert out.logits.shape[1] == len(sparse["logits_to_keep"]) < labels.shape[1] / 2
    loss = supervised_loss(out, labels)
    loss.backward()
    assert torch.allclose(loss, reference, atol=1e-5)
    assert torch.allclose(model.lm_head.weight.grad, grad, atol=1e-6)


def test_the_chunked_loss_equals_one_pass_and_never_holds_float32_logits_of_every_position():
    from medllava.loss import supervised_loss

    torch.manual_seed(0)
    vocab, width = 50, 40
    labels = torch.randint(0, vocab, (2, width))
    labels[:, :7] = -100  # prompt
    labels[1, 30:] = -100  # padding of the shorter row
    positions = (labels[:, 1:] != -100).any(dim=0).nonzero().squeeze(1)
    base = torch.randn(2, len(positions), vocab, dtype=torch.bfloat16)
    reference_logits = base.clone().requires_grad_()
    targets = labels[:, 1:][:, positions]
    reference = torch.nn.functional.cross_entropy(reference_logits.float().reshape(-1, vocab), targets.reshape(-1),
                                                  ignore_index=-100, reduction="sum") / (targets != -100).sum()
    reference.backward()
    for chunk in (1, 7, 10_000):
        logits = base.clone().requires_grad_()
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = supervised_loss(type("Out", (), {"logits": logits})(), labels, chunk=chunk)
        loss.backward()
        assert torch.allclose(loss, reference, atol=1e-6), chunk
        assert torch.equal(logits.grad, reference_logits.grad), chunk
        widest = max((t.numel() for t in saved if t.dtype == torch.float32 and t.dim() == 2), default=0)
        # Held from forward to backward: no float32 logits when chunked (each chunk is recomputed in the
        # backward pass), every row of them in one pass.
        assert widest == (0 if chunk < targets.numel() else targets.numel() * vocab), chunk
    empty = torch.zeros(1, 0, vocab, requires_grad=True)
    assert supervised_loss(type("Out", (), {"logits": empty})(), torch.full((1, 5), -100)).requires_grad
