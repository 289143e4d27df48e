"""Reuse a frozen vision tower's features: each image goes through the tower once, later epochs read
its features back.

Nothing of the model is re-implemented: `LlavaForConditionalGeneration` runs as usual, and only the
vision tower's `forward` is swapped (on the instance, so weights, names and checkpoints are untouched)
for one that answers from the cache and runs the real tower on the images it has not seen. The
model's own code then selects the feature layer, drops CLS and runs the trainable projector, so loss
and gradients are those of the uncached model.

The tower cannot tell which image a row of `pixel_values` is, so the batch names them: the collator
adds `image_keys` (image paths, `Collator(image_keys=True)`) and the trainer opens `cache.batch(keys)`
around the forward pass. Features are kept per image for the layers the model reads
(`config.vision_feature_layer`), in host memory or as one safetensors file per image under a folder
named by a fingerprint of the tower (config, feature layers, dtype and weights), so a cache made by a
different tower is never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from medllava.io import atomic_open


class VisionFeatureCache:
    """Cached outputs of the vision tower of `model` (a Llava model, or a PEFT model around one).

    `folder`: keep features as safetensors files under `folder/<fingerprint>/` instead of in memory.
    Counters: `computed` (images run through the tower) and `served` (images answered from the cache).
    """

    def __init__(self, model, folder: Path | None = None):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.tower = base.model.vision_tower
        config = base.config
        self.n_states = config.vision_config.num_hidden_layers + 1  # embeddings + every layer
        layers = config.vision_feature_layer
        self.layers = sorted({i % self.n_states for i in ([layers] if isinstance(layers, int) else layers)})
        self.folder = folder / self.fingerprint(config) if folder is not None else None
        self.memory: dict[str, dict[int, torch.Tensor]] = {}
        self.computed = 0
        self.served = 0
        self._keys: list[str] | None = None
        self._original = None

    def fingerprint(self, config) -> str:
        """A digest of what the features depend on: vision config, feature layers, dtype, weights."""
        vision = {k: v for k, v in config.vision_config.to_dict().items()
                  if not k.startswith("_") and k != "transformers_version"}
        digest = hashlib.sha256(json.dumps([vision, self.layers, str(self.tower.dtype)], sort_keys=True,
                                           default=str).encode())
        for name, tensor in sorted(self.tower.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def bytes_per_image(self) -> int:
        """Size of one image's cached features: (patches + CLS) x hidden per cached layer."""
        vision = self.tower.config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        return len(self.layers) * tokens * vision.hidden_size * self.tower.dtype.itemsize

    def attach(self) -> VisionFeatureCache:
        """Route the tower's forward through the cache (undo with `detach`)."""
        if self._original is None:
            self._original = self.tower.forward
            self.tower.forward = self.forward
        return self

    def detach(self) -> None:
        if self._original is not None:
            del self.tower.forward  # the instance attribute; the class's forward shows again
            self._original = None

    @contextlib.contextmanager
    def batch(self, keys: list[str] | None):
        """Name the images of the next forward pass, in `pixel_values` order."""
        self._keys = keys
        try:
            yield
        finally:
            self._keys = None

    @torch.compiler.disable  # dictionary lookups and file reads: nothing for the compiler to fuse
    def forward(self, pixel_values, **kwargs):
        """The tower's output for `pixel_values` `(n_images, 3, H, W)`, with `hidden_states` holding
        `(n_images, tokens, hidden)` at the cached layers (the only ones the Llava model reads)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        keys = self._keys
        if keys is None:
            raise RuntimeError("vision feature cache: the batch names no images (build the Collator with "
                               "image_keys=True and run the forward pass inside cache.batch(keys))")
        if len(keys) != pixel_values.shape[0]:
            raise ValueError(f"vision feature cache: {pixel_values.shape[0]} images but {len(keys)} image keys")
        found = [self._lookup(key) for key in keys]
        missing = [i for i, feats in enumerate(found) if feats is None]
        if missing:
            found = self._compute(pixel_values, keys, missing, found, kwargs)
        self.served += len(keys) - len({keys[i] for i in missing})
        hidden: list[torch.Tensor | None] = [None] * self.n_states
        for layer in self.layers:
            hidden[layer] = torch.stack([feats[layer] for feats in found]).to(pixel_values.device)
        return BaseModelOutputWithPooling(hidden_states=tuple(hidden))

    def _compute(self, pixel_values, keys, missing, found, kwargs):
        """Run the real tower once on each distinct image among rows `missing`, store and fill in."""
        first = {}
        for i in missing:
            first.setdefault(keys[i], i)
        rows = list(first.values())
        kwargs = {**kwargs, "output_hidden_states": True, "return_dict": True}
        with torch.no_grad():  # frozen: nothing upstream of the features needs a gradient
            out = self._original(pixel_values[rows], **kwargs)
        if len(out.hidden_states) != self.n_states:
            raise ValueError(f"vision feature cache: the tower returned {len(out.hidden_states)} hidden states, "
                             f"expected {self.n_states} (num_hidden_layers + 1)")
        computed = {}
        for row, (key, _) in enumerate(first.items()):
            computed[key] = {layer: out.hidden_states[layer][row].detach() for layer in self.layers}
            self._store(key, computed[key])
        self.computed += len(rows)
        return [computed[keys[i]] if feats is None else feats for i, feats in enumerate(found)]

    def _path(self, key: str) -> Path:
        name = hashlib.sha256(key.encode()).hexdigest()
        return self.folder / name[:2] / f"{name}.safetensors"

    def _lookup(self, key: str) -> dict[int, torch.Tensor] | None:
        if self.folder is None:
            return self.memory.get(key)
        from safetensors import safe_open

        path = self._path(key)
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            if f.metadata().get("image") != key:
                raise ValueError(f"{path}: cached features of {f.metadata().get('image')!r}, not {key!r}")
            return {layer: f.get_tensor(f"hidden_states.{layer}") for layer in self.layers}

    def _store(self, key: str, feats: dict[int, torch.Tensor]) -> None:
        on_host = {layer: t.to("cpu", copy=True) for layer, t in feats.items()}
        if self.folder is None:
            self.memory[key] = on_host
            return
        from safetensors.torch import save

        tensors = {f"hidden_states.{layer}": t.contiguous() for layer, t in on_host.items()}
        with atomic_open(self._path(key), "wb") as f:
            f.write(save(tensors, metadata={"image": key}))

    def stats(self) -> dict:
        """Counts for the stage record."""
        return {"mode": "disk" if self.folder else "memory", "images_computed": self.computed,
                "images_served": self.served, **({"folder": str(self.folder)} if self.folder else {})}


def attach_stage_cache(stage_name: str, where: str, model, out_dir: Path, n_examples: int) -> VisionFeatureCache:
    """A cache attached to `model` for stage `stage_name`, in host memory (`where`=memory) or under
    `out_dir/vision_features` (`where`=disk); the main process prints its size per image and at most."""
    from medllava.finetune.trainer import is_main_process

    cache = VisionFeatureCache(model, out_dir / "vision_features" if where == "disk" else None).attach()
    if is_main_process():
        size = cache.bytes_per_image()
        print(f"[{stage_name}] caching vision features in {cache.folder or 'host memory'}: {size / 2**20:.3g} MiB per"
              f" image, at most {size * n_examples / 2**30:.3g} GiB for {n_examples} examples", flush=True)
    return cache
