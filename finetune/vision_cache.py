"""Reuse a frozen vision tower's features: each image goes through the tower once, later epochs read
its features back.

Nothing of the model is re-implemented: `LlavaForConditionalGeneration` runs as usual, and only the
vision tower's `forward` is swapped (on the instance, so weights, names and checkpoints are untouched)
for one that answers from the cache and runs the real tower on the images it has not seen. The
model's own code then selects the feature layer, drops CLS and runs the trainable projector, so loss
and gradients are those of the uncached model.

The tower cannot tell which image a row of `pixel_values` is, so the batch names them: the collator
adds `image_keys` (image paths, `Collator(image_keys=True)`) and the trainer opens
`cache.batch(keys, image_sizes)` around the forward pass. Features are kept per tower row for the layers
the model reads (`config.vision_feature_layer`), in host memory or as one safetensors file per row under
a folder named by a fingerprint of the tower (config, feature layers, dtype and weights), so a cache made
by a different tower is never read.

In a fixed-resolution family (LLaVA-1.5) a row is an image. In a grid family (LLaVA-NeXT, OneVision) the
model's `get_image_features` runs the tower on every real tile of the batch's images at once, so a row is
a tile, cached under (image key, tile index): an image's tiling follows from its size and the grid
(`Family.tiles_per_image`, transformers' own count), so the same key always names the same tiles, and the
grid pinpoints and tile size join the fingerprint. What the model does after the tower (projector,
unpadding, image_newline, OneVision's pooling) runs as usual on the cached features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from medllava.families import model_family
from medllava.io import atomic_open


class VisionFeatureCache:
    """Cached outputs of the vision tower of `model` (a model of a `medllava.families` family, or a PEFT
    model around one).

    `folder`: keep features as safetensors files under `folder/<fingerprint>/` instead of in memory.
    Counters: `computed` (tower rows run through the tower: images, or a grid family's tiles) and `served`
    (rows answered from the cache); `images_computed` and `images_served` count images (an image is
    computed when any of its tiles is).
    """

    def __init__(self, model, folder: Path | None = None):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.tower = base.model.vision_tower
        config = base.config
        self.family, self.config = model_family(base), config
        self.n_states = config.vision_config.num_hidden_layers + 1  # embeddings + every layer
        layers = config.vision_feature_layer
        self.layers = sorted({i % self.n_states for i in ([layers] if isinstance(layers, int) else layers)})
        self.folder = folder / self.fingerprint(config) if folder is not None else None
        self.memory: dict[str, dict[int, torch.Tensor]] = {}
        self.computed = self.served = self.images_computed = self.images_served = 0
        self._keys: list | None = None
        self._image_of: list[int] = []
        self._original = None

    def fingerprint(self, config) -> str:
        """A digest of what the features depend on: vision config, feature layers, dtype, weights, and in
        a grid family what decides the tiling (grid pinpoints, tile size)."""
        vision = {k: v for k, v in config.vision_config.to_dict().items()
                  if not k.startswith("_") and k != "transformers_version"}
        described = [vision, self.layers, str(self.tower.dtype)]
        if not self.family.fixed_image_tokens:
            described.append({"image_grid_pinpoints": config.image_grid_pinpoints,
                              "tile_size": config.vision_config.image_size})
        digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.tower.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def bytes_per_image(self) -> int:
        """Size of one image's cached features at most: (patches + CLS) x hidden per cached layer, per tile,
        times the most tiles an image can take (1 in a fixed-resolution family)."""
        vision = self.tower.config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        per_tile = len(self.layers) * tokens * vision.hidden_size * self.tower.dtype.itemsize
        return per_tile * self.family.max_tiles(self.config)

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
    def batch(self, keys: list[str] | None, image_sizes=None):
        """Name the images of the next forward pass, in `pixel_values` order; a grid family also needs their
        `image_sizes` `(N_images, 2)`, which decide each image's tiles."""
        self._keys, self._image_of = self._row_keys(keys, image_sizes)
        try:
            yield
        finally:
            self._keys, self._image_of = None, []

    def _row_keys(self, keys, image_sizes) -> tuple[list | None, list[int]]:
        """The cache key of every tower row (the image key, or a grid family's (image key, tile index)) and
        the image each row belongs to."""
        if keys is None or self.family.fixed_image_tokens:
            return keys, list(range(len(keys or ())))
        if image_sizes is None:
            raise ValueError(f"vision feature cache: {self.family.model_type} images are tiled by their size; "
                             "open cache.batch(keys, image_sizes)")
        tiles = self.family.tiles_per_image(self.config, image_sizes)
        if len(tiles) != len(keys):
            raise ValueError(f"vision feature cache: {len(keys)} image keys but {len(tiles)} image sizes")
        rows = [((key, t), i) for i, (key, n) in enumerate(zip(keys, tiles)) for t in range(n)]
        return [r for r, _ in rows], [i for _, i in rows]

    @torch.compiler.disable  # dictionary lookups and file reads: nothing for the compiler to fuse
    def forward(self, pixel_values, **kwargs):
        """The tower's output for `pixel_values` `(rows, 3, H, W)` (one row per image, or per tile in a grid
        family), with `hidden_states` holding `(rows, tokens, hidden)` at the cached layers (the only ones
        the model reads)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        keys = self._keys
        if keys is None:
            raise RuntimeError("vision feature cache: the batch names no images (build the Collator with "
                               "image_keys=True and run the forward pass inside cache.batch(keys, image_sizes))")
        if len(keys) != pixel_values.shape[0]:
            if self.family.fixed_image_tokens:
                raise ValueError(f"vision feature cache: {pixel_values.shape[0]} images but {len(keys)} image keys")
            raise ValueError(f"vision feature cache: {pixel_values.shape[0]} tiles but {len(keys)} from the image "
                             f"keys and sizes ({len(set(self._image_of))} images)")
        found = [self._lookup(key) for key in keys]
        missing = [i for i, feats in enumerate(found) if feats is None]
        if missing:
            found = self._compute(pixel_values, keys, missing, found, kwargs)
        self.served += len(keys) - len({keys[i] for i in missing})
        # An image is computed when any of its tiles is; as with rows, a key repeated in the batch once.
        computed_images = {_image_key(keys[i]) for i in missing}
        self.images_computed += len(computed_images)
        self.images_served += len(set(self._image_of)) - len(computed_images)
        hidden: list[torch.Tensor | None] = [None] * self.n_states
        for layer in self.layers:
            hidden[layer] = torch.stack([feats[layer] for feats in found]).to(pixel_values.device)
        return BaseModelOutputWithPooling(hidden_states=tuple(hidden))

    def _compute(self, pixel_values, keys, missing, found, kwargs):
        """Run the real tower once on each distinct image (or tile) among rows `missing`, store and fill in."""
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

    def _path(self, key: str | tuple[str, int]) -> Path:
        name = hashlib.sha256((key if isinstance(key, str) else json.dumps(list(key))).encode()).hexdigest()
        return self.folder / name[:2] / f"{name}.safetensors"

    def _lookup(self, key: str | tuple[str, int]) -> dict[int, torch.Tensor] | None:
        if self.folder is None:
            return self.memory.get(key)
        from safetensors import safe_open

        path = self._path(key)
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            found, expected = f.metadata(), _metadata(key)
            if any(found.get(name) != value for name, value in expected.items()):
                raise ValueError(f"{path}: cached features of {found!r}, not {expected!r}")
            return {layer: f.get_tensor(f"hidden_states.{layer}") for layer in self.layers}

    def _store(self, key: str | tuple[str, int], feats: dict[int, torch.Tensor]) -> None:
        on_host = {layer: t.to("cpu", copy=True) for layer, t in feats.items()}
        if self.folder is None:
            self.memory[key] = on_host
            return
        from safetensors.torch import save

        tensors = {f"hidden_states.{layer}": t.contiguous() for layer, t in on_host.items()}
        with atomic_open(self._path(key), "wb") as f:
            f.write(save(tensors, metadata=_metadata(key)))

    def stats(self) -> dict:
        """Counts for the stage record (a grid family's tiles as well as its images)."""
        tiles = {} if self.family.fixed_image_tokens else {"tiles_computed": self.computed, "tiles_served": self.served}
        return {"mode": "disk" if self.folder else "memory", "images_computed": self.images_computed,
                "images_served": self.images_served, **tiles, **({"folder": str(self.folder)} if self.folder else {})}


def _image_key(key: str | tuple[str, int]) -> str:
    """The image a row's cache key belongs to."""
    return key if isinstance(key, str) else key[0]


def _metadata(key: str | tuple[str, int]) -> dict[str, str]:
    """What a cached file says it holds: its image, and a grid family's tile index."""
    return {"image": key} if isinstance(key, str) else {"image": key[0], "tile": str(key[1])}


def attach_stage_cache(stage_name: str, where: str, model, out_dir: Path, n_examples: int) -> VisionFeatureCache:
    """A cache attached to `model` for stage `stage_name`, in host memory (`where`=memory) or under
    `out_dir/vision_features` (`where`=disk); the main process prints its size per image and at most (in a
    grid family, per image taking the most tiles)."""
    from medllava.finetune.trainer import is_main_process

    cache = VisionFeatureCache(model, out_dir / "vision_features" if where == "disk" else None).attach()
    if is_main_process():
        size, tiles = cache.bytes_per_image(), cache.family.max_tiles(cache.config)
        per = "image" if tiles == 1 else f"image at most ({tiles} tiles of {size / tiles / 2**20:.3g} MiB)"
        print(f"[{stage_name}] caching vision features in {cache.folder or 'host memory'}: {size / 2**20:.3g} MiB per"
              f" {per}, at most {size * n_examples / 2**30:.3g} GiB for {n_examples} examples", flush=True)
    return cache
