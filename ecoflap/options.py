"""The knobs of a pruning run, their defaults (the reference scripts'), and their checks.

Every check runs before any weight is touched, so a bad setting never costs a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .allocation import AGGREGATES
from .anatomy import DEFAULT_INCLUDE, GRANULARITIES, INCLUDE_CHOICES
from .methods import Method
from .pruners.masks import parse_nm


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

    def stage1_sample_count(self, method: Method) -> int:
        """32 for zeroth-order, 128 for first-order, as in the reference scripts."""
        if self.stage1_samples is not None:
            return self.stage1_samples
        return 32 if method.estimator == "zeroth" else 128

    def cap(self, sparsity: float) -> float:
        """The largest sparsity any group may get: the reference scripts' target + 0.1."""
        return min(1.0, round(sparsity + 0.1, 10)) if self.max_sparsity is None else self.max_sparsity


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
        if options.eps <= 0:
            raise ValueError(f"eps must be positive (got {options.eps})")
        if options.noise_samples < 1:
            raise ValueError(f"noise samples must be at least 1 (got {options.noise_samples})")
    return nm


def as_report(method: Method, sparsity: float, options: PruneOptions) -> dict:
    """Every option the run used, with the method's fixed choices and the defaults resolved."""
    report = asdict(options)
    report["include"] = list(options.include)
    report.update(allocation=method.allocation, stage2=method.stage2)
    if method.allocation == "ecoflap":
        report.update(estimator=method.estimator, perturb=method.perturb, max_sparsity=options.cap(sparsity),
                      stage1_samples=options.stage1_sample_count(method))
    return report
