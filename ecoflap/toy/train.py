"""Train the shipped shapes BLIP-2 on CPU: python -m ecoflap.toy.train --out assets/shapes-blip2

A staged recipe, like real BLIP-2 (image encoder and Q-Former first, then the rest):
  A. perception: the ViT and the Q-Former, supervised by small linear heads (discarded
     after training): each patch predicts the colour, kind and left-to-right position
     of the shape under it, the class token the number of shapes, and the first three
     query outputs the colour and kind of the first, second and third shape from the
     left (or "none"), so the queries hand the language model an ordered object list;
  B. the whole model end to end on every question type and captions of each image,
     with the perception supervision kept on as an auxiliary loss.
Images are rendered once at random sizes (96 to 256 px) and resized by the model's own
processor, so training sees what inference sees.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..families.blip2 import encode_text
from ..synthetic import build_blip2, build_processor, small_blip2_config
from ..shapes.world import COLORS, KINDS, pixel_shape_labels, questions, random_scene, render
from ..shapes.tokenizer import build_tokenizer

log = logging.getLogger(__name__)


@dataclass
class Recipe:
    seed: int = 0
    image_size: int = 96
    patch_size: int = 12
    hidden: int = 128
    heads: int = 4
    vision_layers: int = 4
    qformer_layers: int = 2
    language_layers: int = 4
    query_tokens: int = 8
    scenes: int = 12_000
    vision_steps: int = 2000
    joint_steps: int = 2500
    batch_images: int = 48
    vision_lr: float = 2e-3
    joint_lr: float = 1e-3
    aux_weight: float = 0.5
    weight_decay: float = 0.01


SLOTS = 3  # at most three shapes, one supervised query each


class PerceptionHeads(nn.Module):
    """Linear probes that teach the ViT and the Q-Former what is where (training only)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.patch_color = nn.Linear(hidden, len(COLORS) + 1)
        self.patch_kind = nn.Linear(hidden, len(KINDS) + 1)
        self.patch_order = nn.Linear(hidden, SLOTS + 1)
        self.count = nn.Linear(hidden, 3)
        self.slot_color = nn.Linear(hidden, len(COLORS) + 1)
        self.slot_kind = nn.Linear(hidden, len(KINDS) + 1)

    def loss(self, vision_out: BaseModelOutputWithPooling, queries: torch.Tensor, batch: dict) -> torch.Tensor:
        patches = vision_out.last_hidden_state[:, 1:]
        slots = queries[:, :SLOTS]

        def ce(head, x, target):
            return nn.functional.cross_entropy(head(x).flatten(0, -2), target.flatten())

        return (
            ce(self.patch_color, patches, batch["patch_color"])
            + ce(self.patch_kind, patches, batch["patch_kind"])
            + ce(self.patch_order, patches, batch["patch_order"])
            + ce(self.count, vision_out.pooler_output, batch["count"])
            + ce(self.slot_color, slots, batch["slot_color"])
            + ce(self.slot_kind, slots, batch["slot_kind"])
        )


def perceive(model, pixel_values: torch.Tensor) -> tuple[BaseModelOutputWithPooling, torch.Tensor]:
    """The ViT outputs and the Q-Former query outputs, as BLIP-2 computes them."""
    vision_out = model.vision_model(pixel_values=pixel_values, return_dict=True)
    image_embeds = vision_out.last_hidden_state
    query = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    queries = model.qformer(query_embeds=query, encoder_hidden_states=image_embeds,
                            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long),
                            return_dict=True).last_hidden_state
    return vision_out, queries


def build_dataset(recipe: Recipe, processor, seed: int, scenes: int, progress: bool = True) -> dict:
    """Pixels (float16), patch labels, and every question of each scene."""
    rng = random.Random(seed)
    grid = recipe.image_size // recipe.patch_size
    pixels, colors, kinds, orders, counts, slot_colors, slot_kinds, qa = [], [], [], [], [], [], [], []
    color_names = list(COLORS)
    chunk: list = []
    bar = tqdm(total=scenes, desc="rendering", disable=not progress)
    for i in range(scenes):
        scene = random_scene(rng)
        chunk.append(render(scene, rng.randint(96, 256), rng))
        c, k, o = pixel_shape_labels(scene, grid)
        colors.append(c)
        kinds.append(k)
        orders.append(o)
        counts.append(len(scene.shapes) - 1)
        padding = [0] * (SLOTS - len(scene.shapes))
        slot_colors.append([color_names.index(s.color) + 1 for s in scene.shapes] + padding)
        slot_kinds.append([KINDS.index(s.kind) + 1 for s in scene.shapes] + padding)
        qa.append([(s.question, s.answer) for s in questions(scene, rng)])
        if len(chunk) == 256 or i == scenes - 1:
            pixels.append(processor.image_processor(chunk, return_tensors="pt")["pixel_values"].half())
            bar.update(len(chunk))
            chunk = []
    bar.close()
    return {
        "pixels": torch.cat(pixels),
        "patch_color": torch.tensor(colors),
        "patch_kind": torch.tensor(kinds),
        "patch_order": torch.tensor(orders),
        "count": torch.tensor(counts),
        "slot_color": torch.tensor(slot_colors),
        "slot_kind": torch.tensor(slot_kinds),
        "qa": qa,
    }


def _schedule(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _batch(data: dict, idx: torch.Tensor) -> dict:
    batch = {key: value[idx] for key, value in data.items() if key not in ("pixels", "qa")}
    batch["pixel_values"] = data["pixels"][idx].float()
    return batch


def joint_loss(model, heads: PerceptionHeads, tokenizer, recipe: Recipe, data: dict,
               idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Language-model loss over every question of each image, plus the perception loss."""
    batch = _batch(data, idx)
    vision_out, queries = perceive(model, batch["pixel_values"])
    aux = heads.loss(vision_out, queries, batch)
    features = model.language_projection(queries)
    qs, ans, owner = [], [], []
    for row, i in enumerate(idx.tolist()):
        for q, a in data["qa"][i]:
            qs.append(q)
            ans.append(a)
            owner.append(row)
    text = encode_text(tokenizer, recipe.query_tokens, qs, ans, decoder_only=True)
    owner_t = torch.tensor(owner)
    embeds = model.get_input_embeddings()(text["input_ids"])
    image_mask = (text["input_ids"] == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(image_mask, features[owner_t].reshape(-1, features.shape[-1]))
    logits = model.language_model(inputs_embeds=embeds, attention_mask=text["attention_mask"]).logits
    labels = text["labels"]
    lm = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    return lm, aux


def train(recipe: Recipe, out: Path, progress: bool = True) -> dict:
    torch.manual_seed(recipe.seed)
    tokenizer = build_tokenizer("opt")
    config = small_blip2_config(
        tokenizer, "opt", hidden=recipe.hidden, vision_layers=recipe.vision_layers,
        qformer_layers=recipe.qformer_layers, language_layers=recipe.language_layers,
        image_size=recipe.image_size, patch_size=recipe.patch_size, num_query_tokens=recipe.query_tokens,
        heads=recipe.heads,
    )
    config.text_config.max_position_embeddings = 64
    model = build_blip2(config, seed=recipe.seed)
    processor = build_processor(tokenizer, config)
    heads = PerceptionHeads(recipe.hidden)
    started = time.time()
    data = build_dataset(recipe, processor, recipe.seed + 1, recipe.scenes, progress)
    n = len(data["qa"])
    log_rows = []

    model.train()
    perception = [*model.vision_model.parameters(), *model.qformer.parameters(), model.query_tokens,
                  *heads.parameters()]
    opt = torch.optim.AdamW(perception, lr=recipe.vision_lr, weight_decay=recipe.weight_decay)
    bar = tqdm(range(recipe.vision_steps), desc="stage A: perception", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = recipe.vision_lr * _schedule(step, recipe.vision_steps)
        idx = torch.randint(0, n, (recipe.batch_images,))
        batch = _batch(data, idx)
        loss = heads.loss(*perceive(model, batch["pixel_values"]), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log_rows.append({"stage": "A", "step": step, "loss": loss.item()})

    perception_ids = {id(p) for p in perception}
    rest = [p for p in model.parameters() if id(p) not in perception_ids]
    opt = torch.optim.AdamW(
        [{"params": perception, "scale": 0.3}, {"params": rest, "scale": 1.0}],
        lr=recipe.joint_lr, weight_decay=recipe.weight_decay,
    )
    bar = tqdm(range(recipe.joint_steps), desc="stage B: end to end", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = recipe.joint_lr * g["scale"] * _schedule(step, recipe.joint_steps)
        idx = torch.randint(0, n, (recipe.batch_images,))
        lm, aux = joint_loss(model, heads, tokenizer, recipe, data, idx)
        loss = lm + recipe.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(lm=f"{lm.item():.3f}", aux=f"{aux.item():.3f}")
            log_rows.append({"stage": "B", "step": step, "lm": lm.item(), "aux": aux.item()})

    model.eval()
    seconds = time.time() - started
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {"recipe": asdict(recipe), "train_seconds": round(seconds, 1),
               "parameters": sum(p.numel() for p in model.parameters()), "log": log_rows}
    (out / "training.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/shapes-blip2")
    for field, value in asdict(Recipe()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = Path(args.pop("out"))
    torch.set_num_threads(2)
    summary = train(Recipe(**args), out)
    print(f"trained in {summary['train_seconds'] / 60:.1f} min; {summary['parameters']:,} parameters; saved to {out}")


if __name__ == "__main__":
    main()
