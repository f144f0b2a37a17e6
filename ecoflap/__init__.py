"""ecoflap: prune vision-language models with Magnitude, Wanda, SparseGPT, OWL and ECoFLaP.

One model in a notebook or a script:

    loaded = ecoflap.load_model("Salesforce/blip2-opt-2.7b")
    store = ecoflap.WeightStore.of(loaded)              # the full weights, for a bit-identical restore
    result = ecoflap.prune(loaded, "ecoflap_zeroth", 0.6)
    ecoflap.ask(loaded, [image], ["what is in the picture?"]); store.restore()

Many people on one deployment (what the app does): a `Server` and a `Session` each.
"""

from . import curves, lessons, naming, plots, quality, sweep
from .allocation import allocate_sparsity
from .anatomy import DEFAULT_INCLUDE, GRANULARITIES, INCLUDE_CHOICES, MODALITIES, parameter_counts, prunable_layers
from .answers import MAX_QUESTION_CHARS, ask
from .data import EXAMPLES, Example, example_prompts, load_examples
from .images import MAX_IMAGE_PIXELS, open_image, prepare_image
from .memory import return_freed_memory_to_the_system
from .methods import METHODS, Method, get_method
from .models import DEFAULT_MODEL, LoadedModel, ModelLoadError, load_model
from .options import MAX_SPARSITY, PruneOptions
from .pipeline import prune
from .recover import RecoverOptions, Recovery, recover, recover_options
from .report import PruneResult, save_pruned, write_json
from .serve.server import Busy, ConfigError, Limits, Server, client_address
from .serve.session import Answers, Comparison, Run, Session
from .weights import WeightStore
from .workbench import Cancelled, Workbench

__all__ = [
    "DEFAULT_INCLUDE",
    "DEFAULT_MODEL",
    "EXAMPLES",
    "GRANULARITIES",
    "INCLUDE_CHOICES",
    "MAX_IMAGE_PIXELS",
    "MAX_QUESTION_CHARS",
    "MAX_SPARSITY",
    "METHODS",
    "MODALITIES",
    "Answers",
    "Busy",
    "Cancelled",
    "Comparison",
    "ConfigError",
    "Example",
    "Limits",
    "LoadedModel",
    "Method",
    "ModelLoadError",
    "PruneOptions",
    "PruneResult",
    "RecoverOptions",
    "Recovery",
    "Run",
    "Server",
    "Session",
    "WeightStore",
    "Workbench",
    "allocate_sparsity",
    "curves",
    "lessons",
    "naming",
    "ask",
    "client_address",
    "example_prompts",
    "get_method",
    "load_examples",
    "load_model",
    "open_image",
    "parameter_counts",
    "plots",
    "prepare_image",
    "prunable_layers",
    "prune",
    "quality",
    "recover",
    "recover_options",
    "return_freed_memory_to_the_system",
    "save_pruned",
    "sweep",
    "write_json",
]
