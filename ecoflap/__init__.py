"""ecoflap: prune BLIP-2 vision-language models with Magnitude, Wanda, SparseGPT and ECoFLaP."""

from .allocation import allocate_sparsity
from .anatomy import parameter_counts, prunable_layers
from .answers import ask, prepare_image
from .data import Example, load_examples
from .models import DEFAULT_MODEL, LoadedModel, ModelLoadError, load_model
from .pipeline import METHODS, PruneOptions, PruneResult, prune
from .report import save_pruned, write_json
from .weights import WeightStore

__all__ = [
    "DEFAULT_MODEL",
    "METHODS",
    "Example",
    "LoadedModel",
    "ModelLoadError",
    "PruneOptions",
    "PruneResult",
    "WeightStore",
    "allocate_sparsity",
    "ask",
    "load_examples",
    "load_model",
    "parameter_counts",
    "prepare_image",
    "prunable_layers",
    "prune",
    "save_pruned",
    "write_json",
]
