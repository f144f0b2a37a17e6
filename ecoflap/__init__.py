"""ecoflap: prune vision-language models with Magnitude, Wanda, SparseGPT and ECoFLaP."""

from .allocation import allocate_sparsity
from .anatomy import parameter_counts, prunable_layers
from .answers import ask, prepare_image
from .data import Example, load_examples
from .methods import METHODS, Method, get_method
from .models import DEFAULT_MODEL, LoadedModel, ModelLoadError, load_model
from .options import PruneOptions
from .pipeline import prune
from .report import PruneResult, save_pruned, write_json
from .weights import WeightStore

__all__ = [
    "DEFAULT_MODEL",
    "METHODS",
    "Example",
    "LoadedModel",
    "Method",
    "ModelLoadError",
    "PruneOptions",
    "PruneResult",
    "WeightStore",
    "allocate_sparsity",
    "ask",
    "get_method",
    "load_examples",
    "load_model",
    "parameter_counts",
    "prepare_image",
    "prunable_layers",
    "prune",
    "save_pruned",
    "write_json",
]
