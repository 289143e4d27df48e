"""From records to model batches: encode one record (image + conversation), pad a batch.

An example whose image is missing or unreadable, or that does not fit `max_length`, is never
trained on as a blank: the encoder raises `SkipExample` with the reason, the dataset returns a
`{"skip": reason, "detail": ...}` marker in its place (a map dataset cannot shrink), and the
collator drops and counts the markers, so a long run reports what it skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medllava.loss import supervised_positions
from medllava.families import (image_inputs, image_placeholder, max_image_tokens, pad_and_concat,
                               processor_family)
from medllava.records import image_paths
from medllava.templates import DEFAULT_TEMPLATE, IGNORE_INDEX, TooLongError, UnusableConversation, encode_conversation


class SkipExample(Exception):
    """An example that cannot be used; `reason` is a short category for counting."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Encoder:
    """Encodes records for one model: its processor, template and image settings."""

    processor: object
    template: str = DEFAULT_TEMPLATE
    image_root: Path | None = None
    max_length: int | None = 2048
    image_options: dict = field(default_factory=dict)

    def __post_init__(self):
        self.family = processor_family(self.processor)
        # Every image's token count in a fixed-resolution family; otherwise the most any image can take.
        self.n_image_tokens = max_image_tokens(self.processor)
        self.type_key, self.image_type_ids = token_types(self.processor)

    def __call__(self, record: dict) -> dict:
        """Return `input_ids`, `attention_mask`, `labels` (lists, length T), and for a record with
        images `pixel_values` (tensor `(n_images, 3, H, W)`; a grid family: `(n_images, tiles, 3, H, W)`
        with `image_sizes`) and `image_keys` (each image's path, the key under which its vision features
        may be cached)."""
        from medllava.images import ImageLoadError, load_image

        # Under an image root, a path that a symlink leads out of it is refused, as `../` is.
        options = {"root": self.image_root, **self.image_options} if self.image_root else self.image_options
        images, keys = [], []
        for rel in image_paths(record):
            path = (self.image_root or Path(".")) / rel
            if not path.is_file():
                raise SkipExample("missing image", str(path))
            keys.append(str(path))
            try:
                images.append(load_image(path, **options))
            except (ImageLoadError, OSError, ValueError) as e:
                raise SkipExample("unreadable image", f"{path} ({e})") from None
        inputs = image_inputs(self.processor, images) if images else None
        try:
            enc = encode_conversation(record["conversations"], self.processor, self.template,
                                      max_length=self.max_length, image_texts=inputs.texts if inputs else [])
        except TooLongError as e:
            raise SkipExample("too long", f"record {record['id']}: {e}") from None
        except UnusableConversation as e:
            raise SkipExample("unusable conversation", f"record {record['id']}: {e}") from None
        if self.type_key:
            enc[self.type_key] = [int(i in self.image_type_ids) for i in enc["input_ids"]]
        if images:
            enc.update(inputs.pixels)
            enc["image_keys"] = keys
        return enc


TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")
"""Per-token inputs some processors add, 1 on image tokens: Gemma 3's model attends both ways among the
tokens of one image by them; Qwen2.5-VL's (transformers 5.25) places its 3-D rope positions by them."""


def token_types(processor) -> tuple[str | None, frozenset[int]]:
    """`(key, ids)`: the per-token type input the processor adds (None where it adds none) and the token
    ids it marks 1, read from the processor's own output for one image, so the types match inference."""
    from PIL import Image

    family = processor_family(processor)
    if family.pixel_layout != "rows":
        return None, frozenset()
    batch = processor(text=[image_placeholder(processor)], images=[Image.new("RGB", (64, 64))],
                      add_special_tokens=False)
    key = next((k for k in TOKEN_TYPE_KEYS if k in batch), None)
    if key is None:
        return None, frozenset()
    ids = [i for i, t in zip(batch["input_ids"][0], batch[key][0]) if t == 1]
    return key, frozenset(int(i) for i in ids)


class EncodedDataset:
    """A torch-style map dataset over records (a `datasets.Dataset` or a list) that encodes lazily.

    Items that cannot be used come back as a `{"skip": reason, "detail": ...}` marker.
    """

    def __init__(self, records, encoder: Encoder):
        self.records = records
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        record = self.records[i]
        if "images" in record and "image" not in record:
            record = dict(record, image=record["images"])
        try:
            return dict(self.encoder(record), id=record["id"])
        except SkipExample as e:
            return {"id": record["id"], "skip": e.reason, "detail": e.detail}

    def lengths(self, chunk: int = 1000) -> list[int]:
        """Approximate token length of every example, without reading images: the tokenizer's count
        of the conversation text, each `<image>` counted as the image tokens it expands to (in a grid
        family, the most it can expand to, so the estimate never falls short). Template
        words are left out (about the same for every example), so the counts rank examples by length,
        which is all length-grouped batching needs."""
        from tqdm import tqdm

        tokenizer = self.encoder.processor.tokenizer
        extra_per_image = self.encoder.n_image_tokens - 1  # the placeholder itself is one token
        out: list[int] = []
        starts = range(0, len(self.records), chunk)
        for start in tqdm(starts, desc="measuring lengths", unit="chunk", disable=len(starts) < 20 or None):
            rows = self.records[start:start + chunk]
            if isinstance(rows, dict):  # a datasets.Dataset slice: columns
                conversations, images = rows["conversations"], rows["images"]
            else:
                conversations = [r["conversations"] for r in rows]
                images = [image_paths(r) or r.get("images", []) for r in rows]
            texts = ["\n".join(turn["value"] for turn in conv) for conv in conversations]
            counts = tokenizer(texts, add_special_tokens=False)["input_ids"]
            out.extend(len(ids) + extra_per_image * len(imgs) for ids, imgs in zip(counts, images))
        return out


@dataclass
class Collator:
    """Pads a list of encoded examples into a batch, dropping skipped ones.

    Batch: `input_ids`, `attention_mask`, `labels` `(B, T)`; `pixel_values` `(N_images, 3, H, W)` in
    the order the `<image>` tokens appear (a grid family: `(N_images, tiles, 3, H, W)`, tiles zero-padded
    to the batch's most, with `image_sizes` `(N_images, 2)`); `example_ids` (the kept examples' ids) and `skipped`
    (`(reason, detail)` of the dropped ones), which travel with the batch so that counts survive
    dataloader worker processes. Pop those two before calling the model.
    """

    pad_token_id: int
    padding_side: str = "right"
    pack: bool = False
    """Concatenate the examples into one row with per-example position ids and no attention mask:
    no padding is computed, and transformers' attention keeps each example to itself (it reads the
    example boundaries from the position ids). The model must run with use_cache=False."""
    sparse_logits: bool = False
    """Add `logits_to_keep`: the positions whose next token is supervised, so the model computes
    vocabulary logits only there (see `supervised_loss`), not at every image and prompt token."""
    image_keys: bool = False
    """Add `image_keys`: the path of every image, in `pixel_values` order, for a vision feature cache.
    Pop it before calling the model, as `example_ids`."""

    def __call__(self, features: list[dict]) -> dict:
        import torch

        kept = [f for f in features if "skip" not in f]
        skipped = [(f["skip"], f["detail"]) for f in features if "skip" in f]
        if not kept:
            return {"input_ids": torch.empty(0, 0, dtype=torch.long), "example_ids": [], "skipped": skipped}
        out = self._packed(kept) if self.pack else self._padded(kept)
        for key in dict.fromkeys(k for f in kept for k, v in f.items() if isinstance(v, torch.Tensor)):
            out[key] = pad_and_concat([f[key] for f in kept if key in f])
        if self.image_keys:
            out["image_keys"] = [key for f in kept for key in f.get("image_keys", [])]
        if self.sparse_logits:
            out["logits_to_keep"] = supervised_positions(out["labels"])
        out["example_ids"] = [f.get("id") for f in kept]
        out["skipped"] = skipped
        return out

    @staticmethod
    def _packed(kept: list[dict]) -> dict:
        import torch

        ids = [t for f in kept for t in f["input_ids"]]
        # Each example's first label is -100 (a prompt token), so no loss crosses an example boundary.
        labels = [IGNORE_INDEX if i == 0 else lab for f in kept for i, lab in enumerate(f["labels"])]
        positions = [i for f in kept for i in range(len(f["input_ids"]))]
        out = {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
            "use_cache": False,
        }
        for key in TOKEN_TYPE_KEYS:
            if key in kept[0]:
                out[key] = torch.tensor([[t for f in kept for t in f[key]]])
        return out

    def _padded(self, kept: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in kept)
        pads = [("input_ids", self.pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)]
        pads += [(key, 0) for key in TOKEN_TYPE_KEYS if key in kept[0]]
        batch = {key: [] for key, _ in pads}
        for f in kept:
            pad = width - len(f["input_ids"])
            for key, value in pads:
                seq = list(f[key])
                batch[key].append(seq + [value] * pad if self.padding_side == "right" else [value] * pad + seq)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
