"""Real vocabularies for the families' tests, read offline from ../shared/tokenizers/ (llama.cpp's GGUF vocabulary
files): the ids, merges and pre-tokenisation of the real checkpoints' tokenizers, so label spans and image-token
counts are checked on the tokens a real model reads.

`qwen2_vl_tokenizer()` is Qwen2's vocabulary (ggml-vocab-qwen2.gguf) as a Qwen2-VL / Qwen2.5-VL / Qwen3-VL
checkpoint's tokenizer holds it: the GGUF file leaves ids 151646-151935 as `[PAD...]` placeholders, and the ones a
Qwen-VL tokenizer names (vision start and end, image and video pads, boxes) are renamed and made special at their
real ids. Tests that need it call `require_qwen2_vocabulary()` first, which skips with the reason when the file or
the `gguf` package is absent.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest

TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
"""The shared folder of real vocabularies (/work/shared/tokenizers beside the checkout)."""
QWEN2_GGUF = "ggml-vocab-qwen2.gguf"

QWEN2_VL_ADDED = {
    151646: "<|object_ref_start|>", 151647: "<|object_ref_end|>", 151648: "<|box_start|>", 151649: "<|box_end|>",
    151650: "<|quad_start|>", 151651: "<|quad_end|>", 151652: "<|vision_start|>", 151653: "<|vision_end|>",
    151654: "<|vision_pad|>", 151655: "<|image_pad|>", 151656: "<|video_pad|>",
}
"""The special tokens of Qwen2-VL's tokenizer.json past `<|im_end|>` (151645), at their ids."""


def qwen2_vocabulary_problem() -> str | None:
    """Why the real Qwen2 vocabulary cannot be read here, or None when it can."""
    if not (TOKENIZERS / QWEN2_GGUF).is_file():
        return f"the real Qwen2 vocabulary {TOKENIZERS / QWEN2_GGUF} is absent"
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package (which transformers reads GGUF vocabularies with) is not installed"
    return None


def require_qwen2_vocabulary() -> None:
    """Skip the calling test, with the reason, where the real Qwen2 vocabulary cannot be read."""
    if problem := qwen2_vocabulary_problem():
        pytest.skip(problem)


@functools.lru_cache(maxsize=1)
def _qwen2_vl_json() -> str:
    """The backend tokenizer JSON of Qwen2's vocabulary with Qwen-VL's specials named, read once per session
    (loading the GGUF file takes a few seconds)."""
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer.from_pretrained(str(TOKENIZERS), gguf_file=QWEN2_GGUF)
    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    by_id = {i: token for token, i in vocab.items()}
    for i, name in QWEN2_VL_ADDED.items():
        placeholder = by_id[i]
        assert placeholder == f"[PAD{i}]", f"id {i} holds {placeholder!r}, not a placeholder"
        vocab[name] = vocab.pop(placeholder)
    # transformers 5.25 lists the placeholders among the added tokens, 5.17 does not: rename or add them.
    added = {entry["id"]: entry for entry in data["added_tokens"]}
    for i, name in QWEN2_VL_ADDED.items():
        added[i] = dict(added.get(i, {"id": i, "single_word": False, "lstrip": False, "rstrip": False,
                                      "normalized": False}), content=name, special=True)
    data["added_tokens"] = sorted(added.values(), key=lambda entry: entry["id"])
    return json.dumps(data)


def qwen2_vl_tokenizer():
    """A fresh Qwen2-VL tokenizer on the real Qwen2 vocabulary: no BOS, `<|im_end|>` the EOS (it ends each chat
    turn), `<|endoftext|>` the pad, the vision tokens special at their real ids (151652-151656)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    require_qwen2_vocabulary()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_qwen2_vl_json()), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", *QWEN2_VL_ADDED.values()], padding_side="right",
        model_max_length=32768)
    assert all(tokenizer.convert_tokens_to_ids(name) == i for i, name in QWEN2_VL_ADDED.items())
    return tokenizer
