"""The knobs of a pruning run, their defaults (the reference scripts'), their bounds and
the library's check.

Each bound is written once (`Bound`), with the one message that refuses a value: the edge
that parses what a person or an API sends (`forms`) and `PruneOptions.check`, which guards
the library, refuse alike. The check runs before any weight is touched, so a bad setting
never costs a model.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

from .allocation import AGGREGATES
from .anatomy import DEFAULT_INCLUDE, GRANULARITIES, INCLUDE_CHOICES
from .echo import shown
from .losses import LOSSES
from .methods import Method
from .owl import DEFAULT_LAMBDA, DEFAULT_M
from .pruners.masks import parse_nm


def _plain(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


@dataclass(frozen=True)
class Bound:
    """A number's range, both ends allowed, and the one message that refuses a value outside it."""

    what: str
    low: float
    high: float
    whole: bool = False

    def refusal(self, value) -> ValueError:
        kind = "a whole number" if self.whole else "a number"
        return ValueError(f"{self.what} must be {kind} from {_plain(self.low)} to {_plain(self.high)} "
                          f"(got {shown(value)})")

    def check(self, value):
        """The library's guard: `value` itself if it is a number in range (an integer where
        whole); text and bools are refused (parsing them is the edge's work: `forms`)."""
        kind = numbers.Integral if self.whole else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind) or not (
                (isinstance(value, numbers.Integral) or math.isfinite(value)) and self.low <= value <= self.high):
            raise self.refusal(value)
        return value


def choice(value, what: str, choices) -> str:
    """`value` if it is one of `choices`, or the one message that says which there are."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)} (got {shown(value, 30)})")
    return value


# Every bound of a pruning setting, for the edge and the check alike.
MAX_SPARSITY = 0.95
MAX_BATCH_SIZE = 64
SPARSITY = Bound("sparsity", 0, MAX_SPARSITY)
SEED = Bound("seed", 0, 2**31 - 1, whole=True)
BOUNDS = {
    "samples": Bound("calibration samples", 1, 10_000, whole=True),
    "stage1_samples": Bound("stage-1 samples", 1, 10_000, whole=True),
    "batch_size": Bound("batch size", 1, MAX_BATCH_SIZE, whole=True),
    "max_sparsity": Bound("max per-layer sparsity", 0, 1),
    "eps": Bound("eps (the zeroth-order step; the paper's is 1e-3)", 1e-8, 0.1),
    "noise_samples": Bound("noise samples", 1, 64, whole=True),
    "seed": SEED,
    "owl_m": Bound("OWL's M (outliers are scores above M times the block's mean)", 1, 100),
    "owl_lambda": Bound("OWL's lambda (how far a block's sparsity may be from the target)", 0, 0.5),
    "vision_sparsity": Bound("vision sparsity", 0, MAX_SPARSITY),
}
# None means "the default": the target + 0.1, the estimator's count, the target.
UNSET_MEANS_DEFAULT = ("stage1_samples", "max_sparsity", "vision_sparsity")
CHOICES = {"granularity": GRANULARITIES, "aggregate": AGGREGATES, "loss": LOSSES}
CHOICE_NAMES = {"granularity": "granularity", "aggregate": "aggregate", "loss": "the calibration loss"}


def check_include(include) -> tuple[str, ...]:
    """The module sets to prune: at least one, each from INCLUDE_CHOICES."""
    if not isinstance(include, (list, tuple)) or not all(isinstance(m, str) for m in include):
        raise ValueError(f"modules must be a list of module sets from {', '.join(INCLUDE_CHOICES)}")
    for m in include:
        choice(m, "each module set", INCLUDE_CHOICES)
    if not include:
        raise ValueError("choose at least one module set to prune")
    return tuple(include)


@dataclass
class PruneOptions:
    """Every knob of a pruning run; which method runs is not one of them."""

    nm: str | None = None
    include: tuple[str, ...] = DEFAULT_INCLUDE
    samples: int = 128
    batch_size: int = 8
    granularity: str = "block"
    aggregate: str = "sum"
    max_sparsity: float | None = None
    eps: float = 1e-3
    noise_samples: int = 1
    stage1_samples: int | None = None
    blocksize: int = 128
    percdamp: float = 0.01
    seed: int = 0
    owl_m: float = DEFAULT_M
    owl_lambda: float = DEFAULT_LAMBDA
    vision_sparsity: float | None = None
    loss: str = "answer"

    def samples_used(self, method: Method) -> int:
        """How many calibration examples the run reads: stage 2's, or stage 1's if more."""
        if not method.calibrated:
            return 0
        first = self.stage1_sample_count(method) if method.allocation == "ecoflap" else 0
        return max(self.samples, first)

    def stage1_sample_count(self, method: Method) -> int:
        """32 for zeroth-order, 128 for first-order, as in the reference scripts."""
        if self.stage1_samples is not None:
            return self.stage1_samples
        return 32 if method.estimator == "zeroth" else 128

    def cap(self, sparsity: float) -> float:
        """The largest sparsity any group may get: the reference scripts' target + 0.1."""
        return min(1.0, round(sparsity + 0.1, 10)) if self.max_sparsity is None else self.max_sparsity

    def check(self, method: Method, sparsity: float) -> tuple[int, int] | None:
        """Refuse bad settings before any weight is touched, with the edge's bounds and
        messages; every setting is checked, whether the method reads it or not. Returns the
        parsed N:M."""
        SPARSITY.check(sparsity)
        for name, bound in BOUNDS.items():
            value = getattr(self, name)
            if value is not None or name not in UNSET_MEANS_DEFAULT:
                bound.check(value)
        for name, choices in CHOICES.items():
            choice(getattr(self, name), CHOICE_NAMES[name], choices)
        check_include(self.include)
        nm = parse_nm(self.nm)
        if nm and not method.allows_nm:
            raise ValueError(f"N:M mode fixes every layer's sparsity, so it does not combine with "
                             f"{method.label}'s allocation")
        if nm and abs(nm[0] / nm[1] - sparsity) > 1e-9:
            n, m = nm
            raise ValueError(f"{n}:{m} zeroes {n} of every {m} weights, a sparsity of {n / m:.2f}: set the "
                             f"sparsity to {n / m:.2f} or turn N:M off (the sparsity is {sparsity:.2f})")
        if method.allocation == "ecoflap" and self.cap(sparsity) < sparsity:
            raise ValueError(f"max per-layer sparsity ({self.cap(sparsity)}) is below the target sparsity "
                             f"({sparsity})")
        return nm


def applicable(method: Method) -> set[str]:
    """The PruneOptions fields a method reads; changing any other leaves its result as it was."""
    used = {"include"}
    if method.calibrated:
        used |= {"batch_size", "loss", "seed"}  # the seed draws the prefix-LM loss's splits
    if method.stage2 != "magnitude" or method.allocation == "owl":
        used.add("samples")
    if method.stage2 == "sparsegpt":
        used |= {"blocksize", "percdamp"}
    if method.allows_nm:
        used.add("nm")
    if method.allocation == "ecoflap":
        used |= {"granularity", "aggregate", "max_sparsity", "stage1_samples"}
    if method.estimator == "zeroth":
        used |= {"eps", "noise_samples"}
    if method.allocation == "owl":
        used |= {"owl_m", "owl_lambda"}
    if method.allocation == "modality":
        used.add("vision_sparsity")
    return used


def as_report(method: Method, sparsity: float, options: PruneOptions) -> dict:
    """Every option the run used, with the method's fixed choices and the defaults resolved."""
    report = asdict(options)
    report["include"] = list(options.include)
    report.update(allocation=method.allocation, stage2=method.stage2)
    if method.allocation == "ecoflap":
        report.update(estimator=method.estimator, perturb=method.perturb, max_sparsity=options.cap(sparsity),
                      stage1_samples=options.stage1_sample_count(method))
    if method.allocation == "modality" and options.vision_sparsity is None:
        report.update(vision_sparsity=sparsity)
    return report


DEFAULTS = PruneOptions()  # the one place defaults are written: the CLI's and the app's come from here
