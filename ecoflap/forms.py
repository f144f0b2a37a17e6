"""The edge: values a person types or a stranger sends (a form, the API, the command line)
turned into checked settings, each with its bound from `options` and its one message.

Text is read here ("0.5", " 7 ", "" or 0 for "the default"); the library below takes
numbers and objects only, and `PruneOptions.check` refuses with the same words.
"""

from __future__ import annotations

import math
import re

from .anatomy import DEFAULT_INCLUDE
from .echo import shown
from .options import (BOUNDS, CHOICE_NAMES, CHOICES, DEFAULTS, MAX_SPARSITY, SEED, SPARSITY, UNSET_MEANS_DEFAULT,
                      Bound, PruneOptions, check_include, choice)
from .pruners.masks import parse_nm


def parse(bound: Bound, value):
    """A number or its text, as a form or an API sends it, checked against its bound; an
    int where whole, and -0.0 as 0.0. A refusal quotes the value as it was sent."""
    try:
        if isinstance(value, bool) or value is None:
            raise TypeError
        parsed = float(value.strip()) if isinstance(value, str) else float(value)
        if bound.whole and math.isfinite(parsed) and parsed == int(parsed):
            parsed = int(parsed)
        return bound.check(parsed) + 0
    except (TypeError, ValueError, OverflowError):
        raise bound.refusal(value) from None


def number(value, what: str, low: float, high: float, whole: bool = False):
    """A finite number (int or float, or its text) in [low, high], or a ValueError saying so."""
    return parse(Bound(what, low, high, whole), value)


def sparsity_value(value) -> float:
    return parse(SPARSITY, value)


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
    """'0,1,2' -> [0, 1, 2]: seeds within SEED's bounds, each once."""
    entries = [e.strip() for e in str(text).split(",")]
    if any(not e for e in entries):
        raise ValueError("seeds are whole numbers separated by single commas, e.g. 0,1,2 (an entry is empty)")
    seeds = [parse(SEED, e) for e in entries]
    if len(set(seeds)) != len(seeds):
        raise ValueError("each seed may appear only once")
    return seeds


def from_settings(nm=None, modules=None, samples=DEFAULTS.samples, stage1_samples=None,
                  batch_size=DEFAULTS.batch_size, granularity=DEFAULTS.granularity, aggregate=DEFAULTS.aggregate,
                  max_sparsity=None, eps=DEFAULTS.eps, noise_samples=DEFAULTS.noise_samples, seed=DEFAULTS.seed,
                  owl_m=DEFAULTS.owl_m, owl_lambda=DEFAULTS.owl_lambda, vision_sparsity=None,
                  loss=DEFAULTS.loss) -> PruneOptions:
    """PruneOptions from settings as a form or an API sends them (text, None, 0 for "default";
    the vision sparsity: None or empty for "the target", since 0 means a dense encoder).
    Each value is parsed with its bound; what depends on the method and the sparsity (N:M,
    the cap against the target) is `PruneOptions.check`'s, which the callers run next."""
    if nm in (None, "", "off", "none"):
        nm = None
    elif not isinstance(nm, str):
        raise ValueError("N:M must be text like 2:4, or off")
    parse_nm(nm)
    if modules is None:
        include = DEFAULT_INCLUDE
    else:
        include = tuple(dict.fromkeys(check_include(modules)))
    values = dict(samples=samples, stage1_samples=stage1_samples, batch_size=batch_size, max_sparsity=max_sparsity,
                  eps=eps, noise_samples=noise_samples, seed=seed, owl_m=owl_m, owl_lambda=owl_lambda,
                  vision_sparsity=vision_sparsity)
    parsed = {}
    for name, value in values.items():
        blank = value is None or (isinstance(value, str) and not value.strip())
        zero_is_default = name != "vision_sparsity" and value in (0, "0")  # a dense encoder is 0
        if name in UNSET_MEANS_DEFAULT and (blank or zero_is_default):
            parsed[name] = None
        else:
            parsed[name] = parse(BOUNDS[name], value)
    for name, value in dict(granularity=granularity, aggregate=aggregate, loss=loss).items():
        parsed[name] = choice(value, CHOICE_NAMES[name], CHOICES[name])
    return PruneOptions(nm=nm, include=include, **parsed)
