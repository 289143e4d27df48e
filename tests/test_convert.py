"""`medllava convert`: tiny checkpoints written in the original LLaVA / LLaVA-Med layout are converted,
and the converted llava-hf model must give the logits that the original model's forward gives.

The reference forward below follows the original LLaVA code: CLIP hidden_states[select_layer], CLS
dropped for `patch`, the mm_projector, image features spliced into the text embeddings where the
prompt had `<image>`, then the Llama / Mistral causal LM. Images go through the original
preprocessing (expand2square with the mean colour for `pad`, then the CLIP processor).

For `image_aspect_ratio: anyres` (LLaVA-NeXT) the reference follows the original's mm_utils and
llava_arch: the best grid of `image_grid_pinpoints` read as [width, height], the image resized into it
and padded black, cut into tiles, a squashed base view in front; per tile features merged by
`spatial_unpad` (grid unpadded to the image's aspect ratio, `model.image_newline` after every row).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from medllava.commands.convert import ConvertError, convert, image_processor_kwargs, read_source, resolve_vision
from medllava.commands.original_layout import ORIGINAL_TYPES
from medllava.model import ModelConfig, build_model
from medllava.families import fixed_image_token_count
from medllava.templates import TEMPLATES, render

IMAGE_MARK = -200  # the original code's IMAGE_TOKEN_INDEX
VISION_PREFIX = "model.vision_tower.vision_tower."
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
PROMPT = "USER: <image>\nWhat does the chest x-ray show? ASSISTANT:"


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """An original-style tokenizer: BOS added, no pad token, no `<image>` token."""
    from importlib import resources

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = resources.files("medllava").joinpath("assets/tiny_corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


def clip_folder(path: Path, seed: int, image_size: int = 16) -> Path:
    """A local CLIP vision folder in the hub layout (vision_model.* keys), with its preprocessor config."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=image_size, patch_size=4, projection_dim=32)
    torch.manual_seed(seed)
    model = CLIPVisionModel(cfg)
    path.mkdir(parents=True)
    save_file({"vision_model." + k: v.contiguous() for k, v in model.state_dict().items()},
              path / "model.safetensors", metadata={"format": "pt"})
    cfg.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": image_size, "size": image_size, "do_center_crop": True, "do_normalize": True,
        "do_resize": True, "image_mean": CLIP_MEAN, "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "image_processor_type": "CLIPImageProcessor",
    }))
    return path


def write_original(path: Path, tokenizer_files: Path, family: str = "llama", projector: str = "mlp2x_gelu",
                   vision_weights: Path | None = None, seed: int = 0, grid: list | None = None, **overrides) -> Path:
    """Write a tiny checkpoint in the original layout: flat config with mm_* fields, two safetensors shards.

    `grid` (image_grid_pinpoints, [width, height] pairs) makes it a LLaVA-NeXT one: anyres, spatial_unpad and
    a `model.image_newline` tensor; `overrides` are applied after.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, vocab_size=300,
                hidden_act="silu", bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    text.update(rope_theta=1e6, sliding_window=None) if family == "mistral" else text.update(rope_theta=1e4)
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **text))
    tensors = {k: v for k, v in lm.state_dict().items()}
    proj = (torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
            if projector == "mlp2x_gelu" else torch.nn.Linear(32, 32))
    tensors.update({f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()})
    if vision_weights is not None:
        tensors.update({VISION_PREFIX + k: v for k, v in load_file(vision_weights / "model.safetensors").items()})
    anyres = {}
    if grid is not None:
        tensors["model.image_newline"] = torch.randn(32)
        anyres = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": grid}
    # The fields of a released LLaVA-1.5 / LLaVA-Med v1.5 config.json.
    cfg = {"_name_or_path": "./checkpoints/base", "transformers_version": "4.36.2",
           "architectures": ["LlavaMistralForCausalLM" if family == "mistral" else "LlavaLlamaForCausalLM"],
           "model_type": "llava_mistral" if family == "mistral" else "llava", **text, "torch_dtype": "float16",
           "initializer_range": 0.02, "pretraining_tp": 1, "rope_scaling": None, "use_cache": True, "max_length": 4096,
           "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False, "unfreeze_mm_vision_tower": False,
           "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 32, "mm_projector_type": projector,
           "mm_projector_lr": None, "mm_resampler_type": None, "mm_patch_merge_type": "flat",
           "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
           "mm_use_im_patch_token": False, "image_aspect_ratio": "pad", "use_mm_proj": True,
           "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", **anyres, **overrides}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: tensors[k].contiguous() for k in part}, path / name, metadata={"format": "pt"})
    weight_map = {k: name for name, part in shards.items() for k in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in tokenizer_files.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return path


def expand2square(image: Image.Image, color: tuple) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), color)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def original_pixels(image: Image.Image, clip_dir: Path, pad: bool) -> torch.Tensor:
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(clip_dir)
    if pad:
        image = expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
    return processor(images=image, return_tensors="pt")["pixel_values"]


def original_ids(src: Path, prompt: str) -> list[int]:
    """Tokenise as the original tokenizer_image_token does: chunks around `<image>`, joined by the mark."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(src)
    before, after = prompt.split("<image>")
    return tok(before).input_ids + [IMAGE_MARK] + tok(after, add_special_tokens=False).input_ids


def best_grid(image_size: tuple, grid: list) -> tuple:
    """The original select_best_resolution: `image_size` and `grid` as (width, height); the most of the image
    kept, then the least canvas wasted."""
    w, h = image_size
    def score(wh):
        scale = min(wh[0] / w, wh[1] / h)
        kept = min(int(w * scale) * int(h * scale), w * h)
        return kept, -(wh[0] * wh[1] - kept)
    return tuple(max(grid, key=score))  # max keeps the first of equals, as the original's strict comparisons


def original_anyres_pixels(image: Image.Image, clip_dir: Path, grid: list) -> torch.Tensor:
    """The original process_anyres_image: (1 + tiles, 3, side, side), the squashed base view first."""
    import math

    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(clip_dir)
    (w, h), (gw, gh) = image.size, best_grid(image.size, grid)
    if gw / w < gh / h:
        size = (gw, min(math.ceil(h * gw / w), gh))
    else:
        size = (min(math.ceil(w * gh / h), gw), gh)
    canvas = Image.new("RGB", (gw, gh), (0, 0, 0))
    canvas.paste(image.resize(size), ((gw - size[0]) // 2, (gh - size[1]) // 2))  # PIL's default resample
    tile, side = processor.crop_size["height"], processor.size["shortest_edge"]
    tiles = [canvas.crop((x, y, x + tile, y + tile)) for y in range(0, gh, tile) for x in range(0, gw, tile)]
    views = [image.resize((side, side))] + tiles
    return torch.stack([processor(images=v, return_tensors="pt")["pixel_values"][0] for v in views])


def original_spatial_unpad(feats: torch.Tensor, image_size: tuple, grid: list, tile: int, newline) -> torch.Tensor:
    """The original merge of anyres features (1 + tiles, side * side, hidden) into (tokens, hidden)."""
    base, tiles = feats[0], feats[1:]
    side = int(base.shape[0] ** 0.5)
    gw, gh = (d // tile for d in best_grid(image_size, grid))
    x = tiles.view(gh, gw, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # (hidden, H, W)
    (w, h), (rows, cols) = image_size, x.shape[1:]
    if w / h > cols / rows:
        pad = (rows - int(h * (cols / w))) // 2
        x = x[:, pad:rows - pad]
    else:
        pad = (cols - int(w * (rows / h))) // 2
        x = x[:, :, pad:cols - pad]
    x = torch.cat([x, newline[:, None, None].expand(*x.shape[:-1], 1)], dim=-1)
    return torch.cat([base, x.flatten(1, 2).transpose(0, 1)])


def reference_logits(src: Path, clip_dir: Path, ids: list[int], pixel_values, tmp_path: Path,
                     image_size: tuple | None = None) -> torch.Tensor:
    """The original LLaVA forward, from the original files; anyres needs the image's (width, height)."""
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel

    cfg = json.loads((src / "config.json").read_text())
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    saved_vision = {k[len(VISION_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(VISION_PREFIX)}
    newline = tensors.pop("model.image_newline", None)  # built when the merge type unpads, read only by anyres
    if saved_vision:  # the original code loads the named tower, then the checkpoint's weights over it
        tower_dir = tmp_path / "saved_tower"
        tower_dir.mkdir(exist_ok=True)
        save_file(saved_vision, tower_dir / "model.safetensors", metadata={"format": "pt"})
        (tower_dir / "config.json").write_bytes((clip_dir / "config.json").read_bytes())
    tower = CLIPVisionModel.from_pretrained(tower_dir if saved_vision else clip_dir).eval()
    proj_sd = {k[len("model.mm_projector."):]: tensors.pop(k) for k in list(tensors) if "mm_projector" in k}
    proj = (torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
            if cfg["mm_projector_type"] == "mlp2x_gelu" else torch.nn.Linear(32, 32))
    proj.load_state_dict(proj_sd)
    family = "mistral" if cfg["model_type"] == "llava_mistral" else "llama"
    # The original config class subclasses the LM's and carries every field; the LM reads what it knows.
    fields = {k: v for k, v in cfg.items() if k not in ("model_type", "torch_dtype", "rope_scaling")}
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **fields)).eval()
    lm.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        feats = tower(pixel_values, output_hidden_states=True).hidden_states[cfg["mm_vision_select_layer"]]
        if cfg["mm_vision_select_feature"] == "patch":
            feats = feats[:, 1:]
        if cfg["image_aspect_ratio"] == "anyres":
            feats = original_spatial_unpad(proj(feats), image_size, cfg["image_grid_pinpoints"],
                                           tower.config.image_size, newline)
        else:
            feats = proj(feats)[0]
        cut = ids.index(IMAGE_MARK)
        embed = lm.get_input_embeddings()
        pieces = [embed(torch.tensor(ids[:cut])), feats, embed(torch.tensor(ids[cut + 1:]))]
        return lm(inputs_embeds=torch.cat(pieces)[None]).logits[0]


def check_logits_agree(src, out, clip_dir, tmp_path, pad=True, image_size=(20, 12)):
    """Convert-side and original-side forwards on the same image and prompt; returns the processor."""
    model, processor = build_model(ModelConfig(name_or_path=str(out)))
    image = Image.fromarray((np.random.RandomState(3).rand(image_size[1], image_size[0], 3) * 255).astype("uint8"))
    batch = processor(text=PROMPT, images=image, return_tensors="pt")
    ref_pixels = original_pixels(image, clip_dir, pad)
    assert torch.allclose(batch["pixel_values"], ref_pixels, atol=1e-6)

    ids = batch["input_ids"][0].tolist()
    image_id = model.config.image_token_index
    assert ids.count(image_id) == fixed_image_token_count(processor) == model.config.image_seq_length
    collapsed = [t for i, t in enumerate(ids) if t != image_id or ids[i - 1] != image_id]
    collapsed = [IMAGE_MARK if t == image_id else t for t in collapsed]
    assert collapsed == original_ids(src, PROMPT)  # the text tokenises as the original code tokenised it

    with torch.no_grad():
        after = model(**batch).logits[0]
    before = reference_logits(src, clip_dir, collapsed, ref_pixels, tmp_path)
    assert after.shape[0] == before.shape[0]
    after = after[:, : before.shape[1]]  # the padded vocabulary rows have no original counterpart
    assert torch.allclose(after, before, atol=1e-5), (after - before).abs().max()
    return processor


def test_llama_mlp2x_with_saved_tower(tokenizer_files, tmp_path):
    clip = clip_folder(tmp_path / "clip", seed=1)
    saved = clip_folder(tmp_path / "finetuned_tower", seed=2)  # differs from the folder: checkpoint weights win
    src = write_original(tmp_path / "src", tokenizer_files, vision_weights=saved, mm_vision_tower=str(clip))
    out = tmp_path / "hf"
    summary = convert(src, out, dtype="float32")
    assert summary["template"] == "vicuna_v1" and summary["pad_to_square"]
    processor = check_logits_agree(src, out, clip, tmp_path)

    from safetensors import safe_open

    config = json.loads((out / "config.json").read_text())
    rows = config["text_config"]["vocab_size"]
    tok = processor.tokenizer
    assert rows % 64 == 0 and rows >= len(tok) and config["image_token_index"] == tok.convert_tokens_to_ids("<image>")
    assert tok.pad_token == tok.unk_token == "<unk>" and tok.model_max_length == 2048
    model, _ = build_model(ModelConfig(name_or_path=str(out)))
    embed = model.get_input_embeddings().weight
    assert torch.allclose(embed[300:], embed[:300].mean(0).expand(rows - 300, -1), atol=1e-6)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())


def test_llava_med_mistral(tokenizer_files, tmp_path):
    clip = clip_folder(tmp_path / "clip", seed=1)
    src = write_original(tmp_path / "src", tokenizer_files, family="mistral", vision_weights=clip,
                         mm_vision_tower=str(clip), seed=5)
    out = tmp_path / "hf"
    assert convert(src, out, dtype="float32")["template"] == "mistral_instruct"
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["model_type"] == "mistral"
    assert config["text_config"]["rope_parameters"]["rope_theta"] == 1e6
    check_logits_agree(src, out, clip, tmp_path)


def test_linear_projector_tower_from_folder_without_pad(tokenizer_files, tmp_path):
    clip = clip_folder(tmp_path / "clip", seed=1)
    src = write_original(tmp_path / "src", tokenizer_files, projector="linear", seed=7,
                         mm_vision_select_feature="cls_patch", image_aspect_ratio="square")
    out = tmp_path / "hf"
    summary = convert(src, out, vision_tower=clip, dtype="float32")
    assert summary["vision_feature_select_strategy"] == "full" and not summary["pad_to_square"]
    processor = check_logits_agree(src, out, clip, tmp_path, pad=False)
    assert fixed_image_token_count(processor) == 17  # 4x4 patches and CLS


def test_every_template_an_original_checkpoint_uses_has_a_chat_template_to_write():
    assert {template for _, template in ORIGINAL_TYPES.values()} <= {n for n, t in TEMPLATES.items() if t.jinja}


@pytest.mark.parametrize("template", [name for name, t in TEMPLATES.items() if t.jinja])
@pytest.mark.parametrize("system", [None, "You are a radiologist."])
def test_chat_templates_render_as_the_project_templates(template, system):
    from jinja2 import Environment

    turns = [{"from": "human", "value": "<image>\nIs there an effusion?"},
             {"from": "gpt", "value": "Yes, on the left."},
             {"from": "human", "value": "How large?"}, {"from": "gpt", "value": "Small."}]
    messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []) + [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there an effusion?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes, on the left."}]},
        {"role": "user", "content": "How large?"},
        {"role": "assistant", "content": "Small."},
    ]
    jinja = Environment().from_string(TEMPLATES[template].jinja)
    text = jinja.render(messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=False)
    assert text == "<s>" + render(turns, template, "</s>", system=system).text
    prompt = jinja.render(messages=messages[:-1], bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
    assert prompt == "<s>" + render(turns[:-1], template, "</s>", system=system, add_generation_prompt=True).text


def test_refuses_pickle_only_checkpoint(tokenizer_files, tmp_path):
    src = write_original(tmp_path / "src", tokenizer_files)
    for f in src.glob("*.safetensors*"):
        f.rename(f.with_name(f.name.replace("model", "pytorch_model").replace("safetensors", "bin")))
    with pytest.raises(ConvertError, match=r"no \*\.safetensors.*pytorch_model-00001-of-00002\.bin.*never loaded"):
        convert(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("mm_use_im_start_end", True, "mm_use_im_start_end is true"),
    ("mm_projector_type", "mlp3x_gelu", "mm_projector_type 'mlp3x_gelu' cannot be represented"),
])
def test_refuses_what_llava_hf_cannot_represent(tokenizer_files, tmp_path, field, value, message):
    src = write_original(tmp_path / "src", tokenizer_files, **{field: value})
    with pytest.raises(ConvertError, match=message):
        convert(src, tmp_path / "hf")


# Original image_grid_pinpoints, [width, height]: three tiles across, two down, or one; not symmetric, so
# reading a pair the wrong way round picks another grid and the logits disagree.
GRID = [[48, 16], [16, 32], [16, 16]]
# (width, height) -> image tokens, by hand: base view 4x4 = 16, plus the unpadded grid with a newline per row.
# 100x10 in 3x1 tiles: 12x4 features, unpadded to 12x2 -> 16 + 2 * 13; 10x40 in 1x2 tiles: 4x8, unpadded to
# 2x8 -> 16 + 8 * 3; 10x10 in the base-resolution grid, one tile: 4x4, nothing to unpad -> 16 + 4 * 5.
ANYRES_IMAGES = {(100, 10): 42, (10, 40): 40, (10, 10): 36}


def random_image(width: int, height: int, seed: int = 3) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


def check_anyres_logits_agree(src: Path, out: Path, clip: Path, tmp_path: Path) -> None:
    """One batch of ANYRES_IMAGES through the converted model; each row against the original forward."""
    model, processor = build_model(ModelConfig(name_or_path=str(out)))
    images = [random_image(w, h, seed) for seed, (w, h) in enumerate(ANYRES_IMAGES)]
    batch = processor(text=[PROMPT] * len(images), images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    image_id = model.config.image_token_index
    for row, (image, tokens) in enumerate(zip(images, ANYRES_IMAGES.values())):
        pixels = original_anyres_pixels(image, clip, GRID)
        assert torch.allclose(batch["pixel_values"][row, : len(pixels)], pixels, atol=1e-6), image.size
        assert batch["image_sizes"][row].tolist() == [image.height, image.width]
        keep = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][keep].tolist()
        assert ids.count(image_id) == tokens, image.size
        collapsed = [IMAGE_MARK if t == image_id else t for i, t in enumerate(ids)
                     if t != image_id or ids[i - 1] != image_id]
        assert collapsed == original_ids(src, PROMPT)
        before = reference_logits(src, clip, collapsed, pixels, tmp_path, image.size)
        after = logits[row][keep][:, : before.shape[1]]
        assert after.shape == before.shape
        assert torch.allclose(after, before, atol=1e-5), (image.size, (after - before).abs().max())


def test_anyres_converts_to_llava_next(tokenizer_files, tmp_path):
    clip = clip_folder(tmp_path / "clip", seed=1)
    src = write_original(tmp_path / "src", tokenizer_files, vision_weights=clip, mm_vision_tower=str(clip), grid=GRID)
    out = tmp_path / "hf"
    summary = convert(src, out, dtype="float32")
    assert summary["architecture"] == "llava_next" and not summary["pad_to_square"]

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava_next"
    assert config["image_grid_pinpoints"] == [[16, 48], [32, 16], [16, 16]]  # [height, width]
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-2, "default")
    image_processor = json.loads((out / "processor_config.json").read_text())["image_processor"]
    assert image_processor["image_grid_pinpoints"] == config["image_grid_pinpoints"]
    assert image_processor["size"] == {"shortest_edge": 16} and image_processor["crop_size"] == {"height": 16, "width": 16}

    # Every source tensor is in the loaded model, unchanged, under its llava-hf name (the LM's rows beyond the
    # source vocabulary are the padding).
    source = {k: v for f in src.glob("*.safetensors") for k, v in load_file(f).items()}
    model, _ = build_model(ModelConfig(name_or_path=str(out)))
    converted = model.state_dict()
    renamed = {}
    for key, value in source.items():
        if key.startswith("model.mm_projector."):
            index, param = key.split(".")[2:]
            renamed[f"model.multi_modal_projector.linear_{1 + int(index) // 2}.{param}"] = value
        elif key.startswith(VISION_PREFIX):
            renamed["model.vision_tower." + key[len(VISION_PREFIX):].removeprefix("vision_model.")] = value
        elif key == "model.image_newline" or key == "lm_head.weight":
            renamed[key] = value
        else:
            renamed["model.language_model." + key[len("model."):]] = value
    assert set(renamed) == set(converted)
    for key, value in renamed.items():
        assert torch.equal(converted[key][: len(value)], value), key

    check_anyres_logits_agree(src, out, clip, tmp_path)


def test_pad_with_an_unpadding_merge_type_stays_llava(tokenizer_files, tmp_path):
    """Without anyres the original reads one image tensor and never mm_patch_merge_type: image_newline,
    built because the merge type unpads, is never used and is dropped."""
    clip = clip_folder(tmp_path / "clip", seed=1)
    src = write_original(tmp_path / "src", tokenizer_files, vision_weights=clip, mm_vision_tower=str(clip),
                         grid=GRID, image_aspect_ratio="pad")
    out = tmp_path / "hf"
    assert convert(src, out, dtype="float32")["architecture"] == "llava"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    check_logits_agree(src, out, clip, tmp_path)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"mm_patch_merge_type": "flat"}, "mm_patch_merge_type 'flat' with image_aspect_ratio 'anyres'"),
    ({"mm_patch_merge_type": "spatial"}, "mm_patch_merge_type 'spatial' with image_aspect_ratio 'anyres'"),
    ({"image_aspect_ratio": "anyres_max_9"}, "image_aspect_ratio 'anyres_max_9' is not LLaVA-NeXT's anyres"),
    ({"mm_vision_select_feature": "cls_patch"}, "mm_vision_select_feature 'cls_patch' with image_aspect_ratio"),
    ({"image_grid_pinpoints": None}, "image_grid_pinpoints None is not a list of \\[width, height\\]"),
    ({"image_grid_pinpoints": "(1x1),...,(3x3)"}, "image_grid_pinpoints '\\(1x1\\),...,\\(3x3\\)' is not a list"),
    ({"image_grid_pinpoints": [[24, 16]]}, "image_grid_pinpoints \\[24, 16\\] is not a whole number of the vision "
                                           "tower's 16px tiles"),
])
def test_refuses_anyres_that_llava_next_cannot_represent(tokenizer_files, tmp_path, overrides, message):
    clip = clip_folder(tmp_path / "clip", seed=1)
    src = write_original(tmp_path / "src", tokenizer_files, grid=GRID, **overrides)
    with pytest.raises(ConvertError, match=message) as error:
        convert(src, tmp_path / "hf", vision_tower=clip)
    assert "\n" not in str(error.value) and str(error.value).startswith(str(src / "config.json"))
    assert not (tmp_path / "hf").exists()


def test_refuses_anyres_with_a_resample_llava_next_would_apply_to_the_tiles(tokenizer_files, tmp_path):
    clip = clip_folder(tmp_path / "clip", seed=1)
    pre = json.loads((clip / "preprocessor_config.json").read_text())
    (clip / "preprocessor_config.json").write_text(json.dumps({**pre, "resample": 2}))
    src = write_original(tmp_path / "src", tokenizer_files, grid=GRID)
    with pytest.raises(ConvertError, match="preprocessor resample 2 with image_aspect_ratio 'anyres'"):
        convert(src, tmp_path / "hf", vision_tower=clip)


def test_anyres_without_image_newline_is_refused(tokenizer_files, tmp_path):
    clip = clip_folder(tmp_path / "clip", seed=1)
    src = write_original(tmp_path / "src", tokenizer_files, grid=GRID)
    for f in src.glob("*.safetensors"):
        tensors = load_file(f)
        tensors.pop("model.image_newline", None)
        save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ConvertError, match="anyres' with spatial_unpad but no model.image_newline tensor"):
        convert(src, tmp_path / "hf", vision_tower=clip)


def test_missing_vision_tower_names_both_options(tokenizer_files, tmp_path):
    src = write_original(tmp_path / "src", tokenizer_files)  # no tower saved, hub name only
    expected = r"openai/clip-vit-large-patch14-336.*--vision-tower DIR.*vision tower saved"
    with pytest.raises(ConvertError, match=expected):
        convert(src, tmp_path / "hf")


def test_refuses_a_llava_hf_checkpoint(tiny_checkpoint, tmp_path):
    with pytest.raises(ConvertError, match="already a llava-hf checkpoint"):
        convert(tiny_checkpoint, tmp_path / "hf")


def test_cli_end_to_end(tokenizer_files, tmp_path, monkeypatch, capsys):
    from safetensors import safe_open

    from medllava import cli

    clip = clip_folder(tmp_path / "clip", seed=1)
    src = write_original(tmp_path / "src", tokenizer_files)
    out = tmp_path / "hf"
    assert cli.main(["convert", "--src", str(src), "--out", str(out)]) == 1
    assert "--vision-tower DIR" in capsys.readouterr().err
    assert cli.main(["convert", "--src", str(src), "--out", str(out), "--vision-tower", str(clip)]) == 0
    assert "vicuna_v1" in capsys.readouterr().out
    with safe_open(out / "model.safetensors", "pt") as f:  # default dtype: the source's torch_dtype
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert cli.main(["convert", "--src", str(src), "--out", str(out), "--vision-tower", str(clip)]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_cli_anyres_end_to_end(tokenizer_files, tmp_path, capsys):
    from medllava import cli
    from medllava.families import checkpoint_family, image_inputs

    clip = clip_folder(tmp_path / "clip", seed=1)
    src = write_original(tmp_path / "src", tokenizer_files, grid=GRID)
    out = tmp_path / "hf"
    assert cli.main(["convert", "--src", str(src), "--out", str(out), "--vision-tower", str(clip)]) == 0
    printed = capsys.readouterr().out
    assert "llava_next" in printed and "[[16, 48], [32, 16], [16, 16]]" in printed
    assert checkpoint_family(out).model_type == "llava_next"
    _, processor = build_model(ModelConfig(name_or_path=str(out)))
    images = [random_image(w, h) for w, h in ANYRES_IMAGES]
    assert image_inputs(processor, images).counts == list(ANYRES_IMAGES.values())


def test_known_tower_shapes_when_its_weights_are_saved(tokenizer_files, tmp_path):
    from transformers import LlavaConfig

    src = write_original(tmp_path / "src", tokenizer_files)
    saved = {VISION_PREFIX + "vision_model.pre_layrnorm.weight": torch.ones(1024)}
    cfg, preprocessor, vision = resolve_vision(read_source(src), saved, None, torch.float32)
    reference = LlavaConfig().vision_config  # transformers' default tower is LLaVA-1.5's CLIP ViT-L/14-336
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                  "patch_size", "hidden_act"):
        assert getattr(cfg, field) == getattr(reference, field), field
    assert list(vision) == ["pre_layrnorm.weight"] and not saved
    assert image_processor_kwargs(preprocessor, cfg.image_size, pad=True)["crop_size"] == {"height": 336, "width": 336}


def test_a_tensor_without_a_place_is_refused(tokenizer_files, tmp_path):
    clip = clip_folder(tmp_path / "clip", seed=1)
    src = write_original(tmp_path / "src", tokenizer_files)
    save_file({"model.image_newline": torch.zeros(32)}, src / "extra.safetensors")
    (src / "model.safetensors.index.json").unlink()  # every *.safetensors file is read
    with pytest.raises(ConvertError, match=r"1 source tensors have no place.*'model.image_newline'"):
        convert(src, tmp_path / "hf", vision_tower=clip)
