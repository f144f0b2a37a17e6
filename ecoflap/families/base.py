"""What every model family describes about itself, and the encoding most of them share.

A family says how its models are loaded (config `model_type`, transformers class,
processor), where its block stacks are in forward order (`Stack`), which positions of
each stack's inputs are real tokens, and how an image with a question and a target
answer becomes a batch whose labels are the answer's tokens only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch
import transformers
from torch import nn

IGNORE = -100
# Keys of a processor's output that run along the language model's sequence.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
# What a chat model is asked for a caption (the question is empty): LLaVA-1.5's own
# instruction for short captions.
CAPTION_REQUEST = "Provide a one-sentence caption for the provided image."

# Which positions of a batch are real tokens, as a (rows, positions) bool mask; None: all.
Positions = Callable[[dict], "torch.Tensor | None"]


def every_position(batch: dict) -> None:
    return None


def text_positions(batch: dict) -> torch.Tensor:
    """Positions of the language model's input sequence that are not padding (image
    tokens spliced into the sequence are real)."""
    return batch["attention_mask"].bool()


def target_positions(batch: dict) -> torch.Tensor:
    """Positions of an encoder-decoder's decoder sequence: the target tokens (labels)."""
    return batch["labels"] != IGNORE


@dataclass
class Stack:
    """A run of transformer blocks executed one after another inside `container`.

    `container` is the module whose output everything downstream depends on; once the
    stack is done its output can be replayed instead of recomputed. Where a family runs
    the blocks inline in a larger forward (Qwen2-VL's vision blocks, followed by the
    merger in the same method), there is no such module: `container` is None and a
    finished stack is replayed by every block returning the last block's output.

    `positions` says which positions of the blocks' inputs are real for a batch; `rows`
    overrides it for linear layers that read another sequence (cross-attention keys).
    `unused` names what the family computes but never uses (module -> why): blocks
    there are left out of `blocks`, linear layers there are not prunable.
    """

    name: str
    modality: str
    container: nn.Module | None
    blocks: list[nn.Module]
    positions: Positions = every_position
    transformer: bool = True
    rows: dict[nn.Module, Positions] = field(default_factory=dict)
    unused: dict[nn.Module, str] = field(default_factory=dict)

    @property
    def output(self) -> nn.Module:
        """The module whose output stands for the whole stack once it is done."""
        return self.container if self.container is not None else self.blocks[-1]

    @property
    def replayed_when_done(self) -> list[nn.Module]:
        """What returns the cached output of a finished stack."""
        return [self.container] if self.container is not None else list(self.blocks)


def submodule(root: nn.Module, *paths: str) -> nn.Module:
    """The first of `paths` that exists under `root` (layouts differ between versions)."""
    for path in paths:
        try:
            return root.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(f"{type(root).__name__} has none of the modules {', '.join(paths)}")


def continuation(tokenizer, context: str, text: str) -> list[int]:
    """The tokens of `text` as the tokenizer splits it right after `context`.

    Tokenizing the two together and dropping the context's tokens keeps the split a
    model saw in training (a leading space attached to the first word, say); where the
    context's tokens are not a prefix of the joint ones, `text` is tokenized alone.
    """
    head = tokenizer(context, add_special_tokens=False)["input_ids"]
    joint = tokenizer(context + text, add_special_tokens=False)["input_ids"]
    if joint[: len(head)] == head and len(joint) > len(head):
        return joint[len(head):]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pad_rows(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of right-padded rows."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), value, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def with_targets(encoded: dict, targets: list[list[int]] | None, pad_id: int,
                 target_types: dict[str, int] | None = None) -> dict:
    """A processor's prompt encoding with each row's target tokens after its real tokens.

    Rows are taken apart at their real positions (wherever the processor put its
    padding), the target appended, and padded again on the right; labels are the target
    tokens, everything else IGNORE. Without targets the prompts are only re-padded.
    `target_types` gives the value the target takes in other sequence keys (PaliGemma
    marks its suffix with token_type_ids 1); by default 0.
    """
    target_types = target_types or {}
    keys = [k for k in SEQUENCE_KEYS if k in encoded]
    columns = {k: [] for k in keys}
    labels = []
    for i in range(encoded["input_ids"].shape[0]):
        real = encoded["attention_mask"][i].bool()
        target = targets[i] if targets is not None else []
        for k in keys:
            if k == "input_ids":
                tail = target
            else:
                tail = [1 if k == "attention_mask" else target_types.get(k, 0)] * len(target)
            columns[k].append(encoded[k][i][real].tolist() + tail)
        labels.append([IGNORE] * int(real.sum()) + target)
    result = {k: v for k, v in encoded.items() if k not in keys and k != "labels"}
    result["input_ids"], result["attention_mask"] = pad_rows(columns["input_ids"], pad_id)
    for k in keys:
        if k not in ("input_ids", "attention_mask"):
            result[k] = pad_rows(columns[k], 0)[0]
    if targets is not None:
        result["labels"] = pad_rows(labels, IGNORE)[0]
    return result


# config model_type -> the language model's name in the model line
LANGUAGE_MODELS = {"llama": "Llama", "mistral": "Mistral", "gemma": "Gemma", "gemma2": "Gemma 2", "qwen2": "Qwen2",
                   "qwen2_vl_text": "Qwen2", "qwen2_5_vl_text": "Qwen2.5", "t5": "T5", "opt": "OPT"}


class Family(ABC):
    """One model family: how it loads, where its stacks are, how it reads examples."""

    name = ""  # as the family is known, for messages ("LLaVA-1.5")
    short = ""  # for the model line ("LLaVA")
    model_types: tuple[str, ...] = ()  # config.json's model_type
    model_class = ""  # the transformers class that loads it
    chat_template = ""  # used where a checkpoint comes without one
    answer_separator = " "  # what comes between the prompt and the answer
    end_token: str | None = None  # the token that ends an answer; None: the tokenizer's eos
    target_types: dict[str, int] = {}  # see `with_targets`
    # Prefixes of module names and how checkpoints spell them (save_pretrained writes the
    # layout transformers loads from, which can differ from the module tree).
    checkpoint_prefixes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # loading

    def model_loader(self):
        return getattr(transformers, self.model_class)

    def load_processor(self, source: str):
        return transformers.AutoProcessor.from_pretrained(source)

    def label(self, config) -> str:
        """Shown as the model's family: the family and its language model."""
        kind = config.text_config.model_type
        return f"{self.short} ({LANGUAGE_MODELS.get(kind, kind)})"

    def decoder_only(self, config) -> bool:
        return True

    def refuses_float16(self, config) -> str | None:
        """Why float16 cannot be used, or None."""
        return None

    def gpu_dtype(self, config) -> torch.dtype:
        """The dtype on an accelerator when none is asked for: the checkpoint's own half
        precision, bfloat16 where it was saved in float32."""
        saved = getattr(config, "dtype", None) or getattr(config.text_config, "dtype", None)
        return saved if saved in (torch.float16, torch.bfloat16) else torch.bfloat16

    def checkpoint_names(self, name: str) -> list[str]:
        """Other spellings a checkpoint may use for a module named `name`."""
        return [spelling + name[len(prefix):] for prefix, spellings in self.checkpoint_prefixes
                if name.startswith(prefix) for spelling in spellings]

    # anatomy

    @abstractmethod
    def stacks(self, model) -> list[Stack]:
        """The model's block stacks in forward order."""

    # encoding

    def prompt(self, processor, question: str) -> str:
        """The text a question (empty: a caption) becomes before the processor expands the
        image placeholder: the model's chat template with the image first."""
        request = (question or "").strip() or CAPTION_REQUEST
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request}]}]
        template = processor.chat_template or self.chat_template
        return processor.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)

    def answer_context(self, prompt: str) -> str:
        """The text the answer directly follows."""
        return prompt

    def process(self, processor, images: list, prompts: list[str]) -> dict:
        """The processor's encoding of images with their prompts, padded."""
        return dict(processor(images=images, text=prompts, padding=True, return_tensors="pt"))

    def target_ids(self, tokenizer, prompt: str, answer: str) -> list[int]:
        """The answer's tokens as they follow the prompt, then the end token."""
        end = tokenizer.convert_tokens_to_ids(self.end_token) if self.end_token else tokenizer.eos_token_id
        return continuation(tokenizer, self.answer_context(prompt), self.answer_separator + answer.strip()) + [end]

    def encode(self, processor, config, examples, with_target: bool = True) -> dict:
        """Tensors for a batch of examples; with a target, labels on the answer's tokens only."""
        prompts = [self.prompt(processor, ex.question) for ex in examples]
        encoded = self.process(processor, [ex.image for ex in examples], prompts)
        tokenizer = processor.tokenizer
        targets = [self.target_ids(tokenizer, p, ex.answer) for p, ex in zip(prompts, examples)] if with_target else None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return with_targets(encoded, targets, pad, self.target_types)

    @abstractmethod
    def max_image_tokens(self, processor, config) -> int:
        """At most how many language-model positions one image takes."""


def image_only(processor_class: type) -> type:
    """`processor_class` without its video processor, which needs torchvision.

    transformers type-checks every processor attribute named in `__init__`, None
    included, against a video-processor class that it does not define without
    torchvision. A subclass whose `__init__` names only the image processor and the
    tokenizer has only those two attributes, loads only those two from a folder, and
    saves a folder the full class reads. Every other keyword must be spelled out in
    the signature: loading keeps only the names it finds there.
    """

    class ImageOnly(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    return ImageOnly
