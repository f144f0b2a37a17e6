"""Module names a class can read: "vision block 1 · attention" for
`vision_model.encoder.layers.0.self_attn.qkv`.

Only for display (progress lines, chart hovers), beside the real name where there is
room for it; the reports keep the real names. Blocks count from 1, as people count.
"""

from __future__ import annotations

import re

# the part of the model, by the first matching word of the path
PARTS = (("qformer", "Q-Former"), ("vision", "vision"), ("visual", "vision"), ("language_projection", "projection"),
         ("multi_modal_projector", "projection"), ("projector", "projection"), ("language", "language"),
         ("text", "language"), ("decoder", "language"), ("encoder", "language"), ("model", "language"))
# what the layer does inside its block, by the first matching word
ROLES = (("crossattention", "cross-attention"), ("encdecattention", "cross-attention"),
         ("cross_attn", "cross-attention"), ("encoder_attn", "cross-attention"), ("attn", "attention"),
         ("attention", "attention"), ("mlp", "feed-forward"), ("densereludense", "feed-forward"),
         ("fc1", "feed-forward"), ("fc2", "feed-forward"), ("intermediate", "feed-forward"),
         ("output", "feed-forward"))
MODULE_PATH = re.compile(r"\b[A-Za-z_][\w]*(?:\.[\w]+){2,}\b")


def friendly(name: str) -> str:
    """'vision_model.encoder.layers.0.self_attn.qkv' -> 'vision block 1 · attention';
    a path it cannot read is returned as it is."""
    lower = name.lower()
    part = next((label for word, label in PARTS if word in lower), None)
    if part is None:
        return name
    if part == "projection":
        return "projection"
    if re.search(r"\.block\.\d+\.", lower):  # T5: the language model has an encoder and a decoder
        part = "language decoder" if ".decoder." in lower else "language encoder" if part == "language" else part
    block = re.search(r"\.(\d+)\.", name)
    words = lower.replace("_", "")
    role = next((label for word, label in ROLES if word.replace("_", "") in words), None)
    text = part + (f" block {int(block.group(1)) + 1}" if block else "")
    return text + (f" · {role}" if role else "")


def friendly_text(text: str) -> str:
    """Every module path in a line of text (a progress line) made readable."""
    return MODULE_PATH.sub(lambda m: friendly(m.group(0)), text)
