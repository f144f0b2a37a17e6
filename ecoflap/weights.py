"""The full weights, kept so that any pruning can be undone bit for bit, and pruned variants.

Only prunable matrices ever change. Where the model was loaded from safetensors files
whose tensors equal the loaded weights (checked once, tensor by tensor), the originals
are read back from those files when needed, so the process never holds a second copy of
the model; otherwise they are copied to CPU memory (so that an accelerator holds one
model). A pruned variant that only zeroed weights (Magnitude, Wanda and the allocations
in front of them) is stored as a bit mask, 1/32 of a float32 matrix; one that also
changed the surviving weights (SparseGPT) is stored whole.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open

from . import families
from .anatomy import INCLUDE_CHOICES, PrunableLayer, prunable_layers
from .offload import read_weight, write_weight

log = logging.getLogger(__name__)


class WeightStore:
    """Original values of a set of layers, and the means to put them back.

    `spellings(name)` gives other names a checkpoint may store a layer under (the
    layout transformers loads from can differ from the module tree).
    """

    def __init__(self, layers: list[PrunableLayer], files: list[Path] | None = None,
                 spellings: Callable[[str], list[str]] | None = None):
        self.layers = {layer.name: layer.module for layer in layers}
        self.in_file = _verified_file_keys(self.layers, files or [], spellings or (lambda name: []))
        self.copies = {name: read_weight(m).detach().to("cpu", copy=True)
                       for name, m in self.layers.items() if name not in self.in_file}

    @classmethod
    def of(cls, loaded) -> "WeightStore":
        """The store of every layer any method may prune (all module sets) of a loaded model,
        or of a bare model (always copied)."""
        model = getattr(loaded, "model", loaded)
        return cls(prunable_layers(model, INCLUDE_CHOICES), checkpoint_files(getattr(loaded, "source", None)),
                   families.of(model).checkpoint_names)

    @property
    def copied_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.copies.values())

    def originals(self, names) -> dict[str, torch.Tensor]:
        """The original weights of some layers (CPU tensors, in the file's dtype or the model's)."""
        names = list(names)
        result = {n: self.copies[n] for n in names if n in self.copies}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n in self.in_file:
                by_file.setdefault(self.in_file[n][0], []).append(n)
        for path, members in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for n in members:
                    result[n] = f.get_tensor(self.in_file[n][1])
        return result

    @torch.no_grad()
    def restore(self, names=None):
        """Put the original weights back (all layers, or the named ones)."""
        names = list(self.layers) if names is None else list(names)
        for name, tensor in self.originals(names).items():
            write_weight(self.layers[name], tensor)

    def is_original(self) -> bool:
        originals = self.originals(self.layers)
        return all(torch.equal(read_weight(m).detach().cpu(), originals[n].to(m.weight.dtype))
                   for n, m in self.layers.items())


def checkpoint_files(source: str | None) -> list[Path]:
    """The safetensors files a model was loaded from: a local folder's, or the hub cache's."""
    if not source:
        return []
    folder = Path(source).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, allow_patterns=["*.safetensors"], local_files_only=True))
        except Exception as err:  # not cached, offline, gated: the store falls back to copies
            log.info("no local checkpoint files for %s (%s); full weights are copied", source, type(err).__name__)
            return []
    return sorted(folder.glob("*.safetensors"))


@torch.no_grad()
def _verified_file_keys(layers: dict[str, torch.nn.Module], files: list[Path],
                        spellings: Callable[[str], list[str]]) -> dict[str, tuple[Path, str]]:
    """Layer name -> (file, key) of a tensor under that name (or another spelling of it)
    bit-identical to the loaded weight."""
    found: dict[str, tuple[Path, str]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                for name in [n for n in layers if n not in found]:
                    weight = read_weight(layers[name])
                    for key in [f"{spelled}.weight" for spelled in (name, *spellings(name))]:
                        if key not in keys:
                            continue
                        stored = f.get_tensor(key)
                        if stored.shape == weight.shape and torch.equal(stored.to(weight.device, weight.dtype),
                                                                        weight):
                            found[name] = (path, key)
                            break
        except (OSError, RuntimeError, ValueError) as err:
            log.info("checkpoint file %s not usable for restores (%s)", path.name, type(err).__name__)
    return found


class RunWeights:
    """A pruned variant of some layers: a packed zero mask per layer whose surviving weights
    are the originals, the whole matrix (on CPU) where they are not."""

    def __init__(self, masks: dict[str, tuple[np.ndarray, tuple[int, ...]]], dense: dict[str, torch.Tensor]):
        self.masks = masks
        self.dense = dense

    @classmethod
    @torch.no_grad()
    def capture(cls, store: WeightStore, names) -> "RunWeights":
        """The current weights of the named layers, as the store can re-create them."""
        names = list(names)
        originals = store.originals(names)
        masks, dense = {}, {}
        for name in names:
            weight = read_weight(store.layers[name]).detach()
            original = originals[name].to(weight.device, weight.dtype)
            zero = weight == 0
            if torch.equal(torch.where(zero, torch.zeros_like(original), original), weight):
                masks[name] = (np.packbits(zero.cpu().numpy().reshape(-1)), tuple(weight.shape))
            else:
                dense[name] = weight.to("cpu", copy=True)
        return cls(masks, dense)

    @property
    def names(self) -> list[str]:
        return [*self.masks, *self.dense]

    @property
    def nbytes(self) -> int:
        return (sum(bits.nbytes for bits, _ in self.masks.values())
                + sum(t.numel() * t.element_size() for t in self.dense.values()))

    def mask(self, name: str) -> torch.Tensor:
        bits, shape = self.masks[name]
        count = int(np.prod(shape))
        return torch.from_numpy(np.unpackbits(bits, count=count).astype(bool)).reshape(shape)

    @contextlib.contextmanager
    def applied(self, store: WeightStore):
        """Within the block the model holds this variant; afterwards its original weights."""
        saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        try:
            with torch.no_grad():
                for name in self.masks:
                    weight = read_weight(store.layers[name])
                    zero = self.mask(name).to(weight.device)
                    saved[name] = (zero, weight[zero].clone())
                    weight[zero] = 0
                    write_weight(store.layers[name], weight)
                for name, tensor in self.dense.items():
                    write_weight(store.layers[name], tensor)
            yield
        finally:
            with torch.no_grad():
                for name, (zero, values) in saved.items():
                    weight = read_weight(store.layers[name])
                    weight[zero] = values
                    write_weight(store.layers[name], weight)
                if self.dense:
                    store.restore(self.dense)
