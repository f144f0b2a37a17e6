"""The one vocabulary of pruning methods, used by the library, the CLI, the app and reports.

A method is an allocation (how sparse each layer may be) followed by a layer-wise stage
2 (which weights of a layer become zero). Names are what code and reports use; labels
are only for display.

Allocations: `uniform` (every layer at the target), `modality` (one sparsity for the
vision encoder, the language model takes the rest of the budget), `global` (one |W|
threshold over every prunable weight), `owl` (outlier-weighted, per block) and `ecoflap`
(zeroth- or first-order importance of the whole model, per group).
"""

from __future__ import annotations

from dataclasses import dataclass

from .echo import shown

# Allocations decided from the weights alone, without calibration data.
DATA_FREE_ALLOCATIONS = ("uniform", "modality", "global")


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    allocation: str
    stage2: str
    estimator: str | None = None  # ECoFLaP's stage 1: "zeroth" or "first"
    # Zeroth-order perturbations: one per matrix (the paper's estimator), or "group": one joint
    # perturbation of all matrices of a group (fewer forward passes, a different estimate).
    perturb: str = "matrix"

    @property
    def calibrated(self) -> bool:
        """Whether the method reads calibration data (all but plain and global magnitude do)."""
        return self.allocation not in DATA_FREE_ALLOCATIONS or self.stage2 != "magnitude"

    @property
    def seeded(self) -> bool:
        """Whether the result depends on the seed (zeroth-order's random directions)."""
        return self.estimator == "zeroth"

    @property
    def allows_nm(self) -> bool:
        """N:M patterns fix every layer's sparsity, so they exclude a non-uniform allocation."""
        return self.allocation == "uniform"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("magnitude", "Magnitude", "uniform", "magnitude"),
        Method("wanda", "Wanda", "uniform", "wanda"),
        Method("sparsegpt", "SparseGPT", "uniform", "sparsegpt"),
        Method("per_modality", "Per-modality uniform", "modality", "wanda"),
        Method("per_modality_sparsegpt", "Per-modality uniform + SparseGPT", "modality", "sparsegpt"),
        Method("global_magnitude", "Global magnitude", "global", "magnitude"),
        Method("owl", "OWL", "owl", "wanda"),
        Method("owl_sparsegpt", "OWL + SparseGPT", "owl", "sparsegpt"),
        Method("ecoflap_zeroth", "ECoFLaP (zeroth-order)", "ecoflap", "wanda", "zeroth"),
        Method("ecoflap_zeroth_group", "ECoFLaP (zeroth-order, one perturbation per group)", "ecoflap", "wanda",
               "zeroth", "group"),
        Method("ecoflap_first", "ECoFLaP (first-order)", "ecoflap", "wanda", "first"),
        Method("ecoflap_sparsegpt", "ECoFLaP + SparseGPT", "ecoflap", "sparsegpt", "zeroth"),
    )
}
# The paper's ECoFLaP (zeroth-order scores, Wanda stage 2) also answers to its plain name.
ALIASES = {"ecoflap": "ecoflap_zeroth"}


# The two choices the paper makes, in the order a person meets them: where the sparsity
# goes, then which weights of a layer go. Names are Method.allocation and Method.stage2.
ALLOCATIONS = ("uniform", "ecoflap", "owl", "modality", "global")
STAGE2 = ("magnitude", "wanda", "sparsegpt")


def stage2_for(allocation: str) -> list[str]:
    """The stage-2 methods that exist after an allocation, in STAGE2's order."""
    made = {m.stage2 for m in METHODS.values() if m.allocation == allocation}
    return [s for s in STAGE2 if s in made]


def variants(allocation: str, stage2: str) -> list[Method]:
    """The methods made of one allocation and one stage 2: one, except ECoFLaP's stage-1
    estimators (zeroth-order per matrix or per group, first-order)."""
    return [m for m in METHODS.values() if m.allocation == allocation and m.stage2 == stage2]


def compose(allocation: str, stage2: str | None = None, variant: str | None = None) -> Method:
    """The method of these choices; a stage 2 or variant (a method name) that does not go with
    the allocation gives way to the first that does (Wanda first), so a choice is never refused."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {shown(allocation)}: use one of {', '.join(ALLOCATIONS)}")
    stages = stage2_for(allocation)
    stage = stage2 if stage2 in stages else "wanda" if "wanda" in stages else stages[0]
    made = variants(allocation, stage)
    return next((m for m in made if m.name == variant), made[0])


def get_method(name: str | Method) -> Method:
    """The method of a name (or alias), or a ValueError listing the names."""
    if isinstance(name, Method):
        return name
    key = ALIASES.get(name, name) if isinstance(name, str) else None
    if key not in METHODS:
        raise ValueError(f"unknown method {shown(name)}: use one of {', '.join(METHODS)} (or ecoflap)")
    return METHODS[key]


def method_names(text: str) -> list[str]:
    """Comma-separated method names, checked, each once."""
    names = [n.strip() for n in str(text).split(",")]
    if any(not n for n in names):
        raise ValueError("method names are separated by single commas, with no empty entries")
    methods = [get_method(n).name for n in names]
    if len(set(methods)) != len(methods):
        raise ValueError("each method may appear only once")
    return methods
