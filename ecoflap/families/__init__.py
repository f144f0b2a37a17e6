"""Every vision-language model family the workbench knows, and which one a model is.

One module per family knows its module names, its token rules, its prompts and how its
processor loads; the rest of the library asks `of(model)` (or `for_model_type`) and
works on what the family returns.
"""

from __future__ import annotations

from .base import (
    IGNORE,
    Family,
    Positions,
    Stack,
    every_position,
    target_positions,
    text_positions,
)
from .blip2 import Blip2, InstructBlip
from .idefics3 import Idefics3, SmolVLM
from .llava import Llava, LlavaNext
from .paligemma import PaliGemma
from .qwen2_vl import Qwen2_5VL, Qwen2VL

FAMILIES: tuple[Family, ...] = (Blip2(), InstructBlip(), Llava(), LlavaNext(), Qwen2VL(), Qwen2_5VL(), PaliGemma(),
                                Idefics3(), SmolVLM())
_BY_MODEL_TYPE = {t: family for family in FAMILIES for t in family.model_types}
SUPPORTED = ", ".join(f.name for f in FAMILIES[:-1]) + f" or {FAMILIES[-1].name}"


class UnsupportedFamily(ValueError):
    """A model of a family the workbench does not know."""


def for_model_type(model_type) -> Family:
    """The family of a config's model_type, or UnsupportedFamily naming what is supported."""
    family = _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        shown = model_type if isinstance(model_type, str) and len(model_type) <= 40 else "unknown"
        raise UnsupportedFamily(f"a {shown!r} model, not {SUPPORTED} (the families this workbench supports)")
    return family


def of(model) -> Family:
    """The family of a loaded or built model."""
    return for_model_type(model.config.model_type)


__all__ = [
    "FAMILIES",
    "IGNORE",
    "SUPPORTED",
    "Family",
    "Positions",
    "Stack",
    "UnsupportedFamily",
    "every_position",
    "for_model_type",
    "of",
    "target_positions",
    "text_positions",
]
