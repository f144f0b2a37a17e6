"""The knobs of a pruning run, their defaults (the reference scripts'), and their checks.

Every check runs before any weight is touched, so a bad setting never costs a model.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from .allocation import AGGREGATES
from .anatomy import DEFAULT_INCLUDE, GRANULARITIES, INCLUDE_CHOICES
from .echo import shown
from .losses import LOSSES
from .methods import Method
from .owl import DEFAULT_LAMBDA, DEFAULT_M
from .pruners.masks import parse_nm

OWL_M_RANGE = (1.0, 100.0)
OWL_LAMBDA_MAX = 0.5


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


def check(method: Method, sparsity: float, options: PruneOptions) -> tuple[int, int] | None:
    """Reject bad settings before any weight is touched; returns the parsed N:M."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1) (got {sparsity})")
    nm = parse_nm(options.nm)
    if nm and not method.allows_nm:
        raise ValueError(f"N:M mode fixes every layer's sparsity, so it does not combine with {method.label}'s allocation")
    bad = set(options.include) - set(INCLUDE_CHOICES)
    if bad or not options.include:
        raise ValueError(f"modules to prune must be chosen from {', '.join(INCLUDE_CHOICES)}")
    if options.loss not in LOSSES:
        raise ValueError(f"unknown calibration loss {options.loss!r}: use one of {', '.join(LOSSES)}")
    if options.batch_size < 1:
        raise ValueError(f"batch size must be at least 1 (got {options.batch_size})")
    if not 0 <= options.seed < 2**31:
        raise ValueError(f"the seed must be a whole number in [0, 2^31) (got {options.seed})")
    if method.allocation == "ecoflap":
        if options.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {options.granularity!r}: use one of {', '.join(GRANULARITIES)}")
        if options.aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {options.aggregate!r}: use one of {', '.join(AGGREGATES)}")
        cap = options.cap(sparsity)
        if cap < sparsity:
            raise ValueError(f"max per-layer sparsity ({cap}) is below the target sparsity ({sparsity})")
        if cap > 1:
            raise ValueError(f"max per-layer sparsity must be at most 1 (got {cap})")
        if not (math.isfinite(options.eps) and 0 < options.eps <= 0.1):
            raise ValueError(f"eps must be positive and at most 0.1; the paper's is 1e-3 (got {options.eps})")
        if options.noise_samples < 1:
            raise ValueError(f"noise samples must be at least 1 (got {options.noise_samples})")
    if method.allocation == "owl":
        if not (isinstance(options.owl_m, (int, float)) and OWL_M_RANGE[0] <= options.owl_m <= OWL_M_RANGE[1]):
            raise ValueError(f"OWL's M (outliers are scores above M times the block's mean) must be from "
                             f"{OWL_M_RANGE[0]:g} to {OWL_M_RANGE[1]:g} (got {options.owl_m})")
        if not (isinstance(options.owl_lambda, (int, float)) and 0 <= options.owl_lambda <= OWL_LAMBDA_MAX):
            raise ValueError(f"OWL's lambda (how far a block's sparsity may be from the target) must be from 0 to "
                             f"{OWL_LAMBDA_MAX:g} (got {options.owl_lambda})")
    if method.allocation == "modality" and options.vision_sparsity is not None:
        v = options.vision_sparsity
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ValueError(f"the vision sparsity must be in [0, 1) (got {v})")
    return nm


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


# Values typed by a person or sent by a stranger through an API: checked one by one, each
# refused with a message that names the setting and the allowed range.
MAX_SPARSITY = 0.95
MAX_BATCH_SIZE = 64


def number(value, what: str, low: float, high: float, whole: bool = False):
    """A finite number (int or float, or its text) in [low, high], or a ValueError saying so."""
    kind = "a whole number" if whole else "a number"
    try:
        if isinstance(value, bool) or value is None:
            raise TypeError
        parsed = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{what} must be {kind} from {low:g} to {high:g} (got {shown(value)})") from None
    if not math.isfinite(parsed) or not low <= parsed <= high or (whole and parsed != int(parsed)):
        raise ValueError(f"{what} must be {kind} from {low:g} to {high:g} (got {shown(value)})")
    return int(parsed) if whole else parsed + 0.0  # -0.0 is 0.0


def sparsity_value(value) -> float:
    return number(value, "sparsity", 0.0, MAX_SPARSITY)


def sparsity_list(text, limit: int) -> list[float]:
    """'0.1,0.3,0.5' -> [0.1, 0.3, 0.5]: plain decimals in [0, MAX_SPARSITY], each once, at most `limit`."""
    if not isinstance(text, str):
        raise ValueError("sparsities must be text: numbers separated by commas, e.g. 0.1,0.3,0.5")
    entries = [e.strip() for e in text.split(",")]
    if not text.strip() or any(not e for e in entries):
        raise ValueError("sparsities are numbers separated by single commas, e.g. 0.1,0.3,0.5 (an entry is empty)")
    values = []
    for entry in entries:
        if not re.fullmatch(r"(0|0?\.\d{1,4})", entry):
            raise ValueError(f"each sparsity is a plain decimal from 0 to {MAX_SPARSITY} with at most 4 "
                             f"decimals, like 0.5 (got {shown(entry, 16)})")
        values.append(sparsity_value(entry))
    if len(set(values)) != len(values):
        raise ValueError("each sparsity may appear only once")
    if len(values) > limit:
        raise ValueError(f"a sweep takes at most {limit} points (methods x sparsities) on this deployment")
    return values


def seed_list(text) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: whole numbers in [0, 2^31), each once."""
    entries = [e.strip() for e in str(text).split(",")]
    if any(not e for e in entries):
        raise ValueError("seeds are whole numbers separated by single commas, e.g. 0,1,2 (an entry is empty)")
    seeds = [number(e, "each seed", 0, 2**31 - 1, whole=True) for e in entries]
    if len(set(seeds)) != len(seeds):
        raise ValueError("each seed may appear only once")
    return seeds


def choice(value, what: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)} (got {shown(value, 30)})")
    return value


DEFAULTS = PruneOptions()  # the one place defaults are written: the CLI's and the app's come from here


def from_settings(sparsity: float, nm=None, modules=None, samples=DEFAULTS.samples, stage1_samples=None,
                  batch_size=DEFAULTS.batch_size, granularity=DEFAULTS.granularity, aggregate=DEFAULTS.aggregate,
                  max_sparsity=None, eps=DEFAULTS.eps, noise_samples=DEFAULTS.noise_samples, seed=DEFAULTS.seed,
                  owl_m=DEFAULTS.owl_m, owl_lambda=DEFAULTS.owl_lambda, vision_sparsity=None,
                  loss=DEFAULTS.loss) -> PruneOptions:
    """PruneOptions from settings as a form or an API sends them (text, None, 0 for "default";
    the vision sparsity: None or empty for "the target", since 0 means a dense encoder)."""
    if nm in (None, "", "off", "none"):
        nm = None
    elif not isinstance(nm, str):
        raise ValueError("N:M must be text like 2:4, or off")
    parsed_nm = parse_nm(nm)
    if parsed_nm and abs(parsed_nm[0] / parsed_nm[1] - sparsity) > 1e-9:
        n, m = parsed_nm
        raise ValueError(f"{n}:{m} zeroes {n} of every {m} weights, a sparsity of {n / m:.2f}: set the sparsity "
                         f"to {n / m:.2f} or turn N:M off (the sparsity is {sparsity:.2f})")
    if modules is None:
        include = DEFAULT_INCLUDE
    elif isinstance(modules, (list, tuple)) and all(isinstance(m, str) for m in modules):
        include = tuple(dict.fromkeys(choice(m, "each module set", INCLUDE_CHOICES) for m in modules))
        if not include:
            raise ValueError("choose at least one module set to prune")
    else:
        raise ValueError(f"modules must be a list of module sets from {', '.join(INCLUDE_CHOICES)}")
    cap = None if max_sparsity in (None, 0, "0", "") else number(max_sparsity, "max per-layer sparsity", 0, 1)
    first = None if stage1_samples in (None, 0, "0", "") else number(stage1_samples, "stage-1 samples", 1, 10_000, True)
    unset = vision_sparsity is None or (isinstance(vision_sparsity, str) and not vision_sparsity.strip())
    vision = None if unset else number(vision_sparsity, "vision sparsity", 0, MAX_SPARSITY)
    return PruneOptions(
        nm=nm,
        include=include,
        samples=number(samples, "calibration samples", 1, 10_000, True),
        batch_size=number(batch_size, "batch size", 1, MAX_BATCH_SIZE, True),
        granularity=choice(granularity, "granularity", GRANULARITIES),
        aggregate=choice(aggregate, "aggregate", AGGREGATES),
        max_sparsity=cap,
        eps=number(eps, "eps (the zeroth-order step)", 1e-8, 0.1),
        noise_samples=number(noise_samples, "noise samples", 1, 64, True),
        stage1_samples=first,
        seed=number(seed, "seed", 0, 2**31 - 1, True),
        owl_m=number(owl_m, "OWL's M", *OWL_M_RANGE),
        owl_lambda=number(owl_lambda, "OWL's lambda", 0, OWL_LAMBDA_MAX),
        vision_sparsity=vision,
        loss=choice(loss, "the calibration loss", LOSSES),
    )
