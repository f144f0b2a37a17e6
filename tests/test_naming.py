"""Readable module names, for every family's real paths (read off the tiny models)."""

from __future__ import annotations

import pytest

from conftest import tiny_model
from ecoflap.anatomy import prunable_layers
from ecoflap.naming import friendly, friendly_text


@pytest.mark.parametrize("name,shown", [
    ("vision_model.encoder.layers.0.self_attn.qkv", "vision block 1 · attention"),
    ("vision_model.encoder.layers.11.mlp.fc2", "vision block 12 · feed-forward"),
    ("qformer.encoder.layer.1.crossattention.attention.query", "Q-Former block 2 · cross-attention"),
    ("qformer.encoder.layer.0.attention.output.dense", "Q-Former block 1 · attention"),
    ("qformer.encoder.layer.2.intermediate_query.dense", "Q-Former block 3 · feed-forward"),
    ("language_projection", "projection"),
    ("language_model.model.decoder.layers.3.self_attn.q_proj", "language block 4 · attention"),
    ("language_model.encoder.block.0.layer.0.SelfAttention.q", "language encoder block 1 · attention"),
    ("language_model.decoder.block.1.layer.1.EncDecAttention.o", "language decoder block 2 · cross-attention"),
    ("model.visual.blocks.2.attn.qkv", "vision block 3 · attention"),
    ("not a module", "not a module"),
])
def test_friendly_names(name, shown):
    assert friendly(name) == shown


def test_every_prunable_layer_of_a_family_gets_its_modality_and_block(family):
    loaded = tiny_model(family)
    for layer in prunable_layers(loaded.model, include=("vision", "qformer", "projection", "language")):
        shown = friendly(layer.name)
        expected = {"vision": "vision", "qformer": "Q-Former", "projection": "projection",
                    "language": "language"}[layer.modality]
        assert shown.startswith(expected), (layer.name, shown)
        if layer.modality != "projection":
            assert f" block {layer.block + 1}" in shown and " · " in shown, (layer.name, shown)


def test_progress_lines_keep_their_words():
    line = "point 1 of 4: Wanda @ 0.30 · magnitude: vision_model.encoder.layers.1.mlp.fc1"
    assert friendly_text(line) == "point 1 of 4: Wanda @ 0.30 · magnitude: vision block 2 · feed-forward"
    assert friendly_text("stage 2 (wanda): vision block 1") == "stage 2 (wanda): vision block 1"
